"""Packaging for lsr-kernels (all metadata lives here; pyproject.toml only names the build backend).

The CUDA extension ``lsr_kernels._C`` (csrc/) is optional, chosen by ``LSR_BUILD_CUDA``:

- ``auto`` (default): build it when torch imports, is a CUDA build, and a CUDA toolkit (nvcc) of
  torch's CUDA major version is found; otherwise, or when the compile fails, install the pure-Python
  package (Triton and chunked backends) without failing.
- ``1``: build it (any machine with nvcc and a CUDA build of torch, GPU or not); fail if impossible.
- ``0``: never build it.

Building needs torch at build time, so use ``pip install --no-build-isolation``:

    LSR_BUILD_CUDA=1 pip install --no-build-isolation -e .

``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0+PTX``: A100, H100/H200, and PTX
for newer GPUs); ``MAX_JOBS`` the parallel nvcc jobs (default from free memory and cores); the
toolkit is ``CUDA_HOME`` (default: found from nvcc or /usr/local/cuda). Headers of the pip CUDA
wheels (site-packages/nvidia/cu*/include) are added after the toolkit's when present, which
completes a toolkit that lacks e.g. the cuBLAS headers torch's own headers include. Without a
build, ``lsr_kernels.backends.cuda.load_jit()`` compiles the same sources at run time: wheels carry
them as ``lsr_kernels/_csrc`` (build_py copies csrc/ there).

torch is imported only inside the build decision, never at module level, so the pure-Python path
works on machines without torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# One .cpp (schema, checks, dispatch) and one _kernels.cu per kernel family, plus the module entry.
CUDA_SOURCES = ["info_nce.cpp", "info_nce_kernels.cu", "exp_gram.cpp", "exp_gram_kernels.cu", "itc.cpp",
                "itc_kernels.cu", "extension.cpp"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CSRC_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")  # what the JIT and emulation builds read (as MANIFEST.in)
NVCC_JOB_BYTES = 2 * 1024**3  # peak memory of one nvcc job on these sources, roughly


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package as lsr_kernels/_csrc, so that an installed wheel built without
    the extension can still compile it with load_jit() (and its CPU emulation) from its own sources."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install compiles from the checkout's csrc/
        target = Path(self.build_lib) / "lsr_kernels" / "_csrc"
        for source in sorted((ROOT / "csrc").rglob("*")):
            if source.is_file() and source.suffix in CSRC_SUFFIXES:
                destination = target / source.relative_to(ROOT / "csrc")
                self.mkpath(str(destination.parent))
                self.copy_file(str(source), str(destination), preserve_mode=False)


def _say(message):
    print(f"lsr-kernels setup: {message}", file=sys.stderr)


def _build_mode():
    mode = os.environ.get("LSR_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"lsr-kernels setup: LSR_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _has_cuda_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _has_cuda_headers(home):
            return home
    # nvcc on PATH may be a wrapper script outside the toolkit (its parent has no headers).
    return "/usr/local/cuda" if _has_cuda_headers("/usr/local/cuda") else None


def _wheel_include_dirs():
    dirs = []
    for root in sys.path:
        dirs.extend(sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*", "include"))))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _nvcc_version(cuda_home):
    """The toolkit's ``major.minor`` from ``nvcc --version``, or None when it cannot be read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return cores
    return max(1, min(cores, int(free // NVCC_JOB_BYTES)))


def _cuda_build(mode):
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) when it is not built."""
    if mode == "0":
        _say("LSR_BUILD_CUDA=0: installing without the CUDA extension")
        return [], {}

    def skip(reason):
        if mode == "1":
            raise SystemExit(f"lsr-kernels setup: LSR_BUILD_CUDA=1 but {reason}")
        _say(f"{reason}; installing without the CUDA extension (lsr_kernels.backends.cuda.load_jit() can "
             f"build it later)")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension resolves its own guess
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # no torch, or a broken one: the pure-Python package still installs
        return skip(f"torch is not importable at build time ({type(exc).__name__}: {exc}); "
                    f"install torch first and use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if not CUDA_HOME or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip("no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)")
    toolkit = _nvcc_version(CUDA_HOME)
    if toolkit is None or toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        return skip(f"the CUDA toolkit at {CUDA_HOME} is {toolkit or 'of an unknown version'}, torch "
                    f"{torch.__version__} was built with CUDA {torch.version.cuda}: their major versions must "
                    f"match (set CUDA_HOME to a matching toolkit)")

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # The ninja of this interpreter's environment, even when its bin/ is not on PATH.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    include_dirs = [str(ROOT / "csrc")]
    if _has_cuda_headers(CUDA_HOME):
        include_dirs.append(os.path.join(CUDA_HOME, "include"))  # the toolkit's headers win
    include_dirs += _wheel_include_dirs()
    _say(f"building lsr_kernels._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} with "
         f"MAX_JOBS={os.environ['MAX_JOBS']}, CUDA_HOME={CUDA_HOME}")
    extension = CUDAExtension(
        name="lsr_kernels._C",
        sources=[f"csrc/{name}" for name in CUDA_SOURCES],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": ["-O3", "-DNDEBUG", "-lineinfo"]},
    )
    if mode == "1":
        return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    class BuildExtensionIfPossible(BuildExtension):
        """``auto``: a failed compile (another host compiler, a broken toolkit) installs the package
        without the extension, as the checks above do, instead of failing the install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # torch reports compile errors as RuntimeError
                skip(f"building the CUDA extension failed ({type(exc).__name__}: {str(exc)[:300]})")
                self.extensions = []  # nothing for the later steps (the editable install's copy) to find

    return [extension], {"build_ext": BuildExtensionIfPossible.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_build(_build_mode())

setup(
    name="lsr-kernels",
    version="0.1.0",
    description="Fused GPU kernels (Triton, CUDA C++) for contrastive training with latent modality "
                "structure regularisers (Jiang et al., CVPR 2023)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lsr_kernels", "lsr_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        # open_clip 2.32 is the first whose ClipLoss takes logit_bias; ninja builds the CUDA sources'
        # CPU emulation (torch.utils.cpp_extension.load needs it)
        "test": ["pytest>=7", "open-clip-torch>=2.32", "pytest-benchmark", "scikit-learn", "ninja", "matplotlib",
                 "pillow"],
        "bench": ["matplotlib"],
        "train": ["scikit-learn", "matplotlib", "pillow"],
        "triton": ["triton>=3.5"],  # backends.MIN_TRITON
    },
    entry_points={"console_scripts": ["lsr-train=lsr_kernels.train:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
    zip_safe=False,
)
