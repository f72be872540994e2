"""Build the Triton kernels for sm_90 without a GPU and report registers, spills and shared memory.

    python scripts/triton_sm90_sweep.py                 # hot path: bf16, D = 512, first config of each kernel
    python scripts/triton_sm90_sweep.py --all           # every autotune config that survives pruning,
                                                        # every flag combination the launchers use
    python scripts/triton_sm90_sweep.py --all --dtypes bf16,fp32 --widths 128,512,1024

Triton's interpreter accepts kernels that its GPU compiler rejects, and a config that needs more
shared memory than an H100 block may have fails only at launch. This compiles with Triton's bundled
ptxas for ``GPUTarget("cuda", 90, 32)`` (no device needed), as the GPU runtime specialises for
contiguous inputs, and prints one line per build:

    BUILT <kernel> <dtype> D=<D_PADDED> <flags> <config> REG:<n> STACK:<bytes> SMEM:<bytes> MMA:<kind>
    FAILED <kernel> ... <error>

MMA says how the kernel's ``tl.dot`` products were lowered: ``wgmma`` (Hopper's warp-group MMA),
``mma`` (``mma.sync``: for fp16 / bf16 the sm_80 path, a fraction of the H100's warp-group rate; for
fp64 the double-precision tensor cores) or ``fma`` (no tensor cores: fp32 in IEEE precision).

Exit status 1 when a build fails or a config needs more than the sm_90 limit of shared memory.
Must run without TRITON_INTERPRET (the script clears it before importing Triton).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lsr_kernels.backends.triton import _common, exp_gram, softmax_ce  # noqa: E402

#: Shared memory one sm_90 thread block may use (227 KiB, opt-in).
SM90_MAX_SMEM = 232448
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
DTYPES = {"bf16": ("*bf16", torch.bfloat16), "fp16": ("*fp16", torch.float16),
          "fp32": ("*fp32", torch.float32), "fp64": ("*fp64", torch.float64)}


def _names(names, ty):
    return {n: ty for n in names}


def _signatures(ptr: str, acc_ptr: str):
    """Every kernel's runtime arguments with their types for one input dtype."""
    strides = _names(["stride_qn", "stride_qd", "stride_qmn", "stride_qmd", "stride_kn", "stride_kd"], "i32")
    ce_in = {**_names(["Q_ptr", "QM_ptr", "K_ptr"], ptr), "scale_ptr": acc_ptr}
    return {
        "softmax_ce_fwd": (softmax_ce._softmax_ce_fwd_kernel, {
            **ce_in, **_names(["row_max_ptr", "row_sum_ptr", "soft_max_ptr", "soft_sum_ptr", "soft_gap_ptr",
                               "col_max_ptr", "col_sum_ptr", "diag_ptr"], acc_ptr),
            **_names(["N", "M", "D", "pos_off", "N_BUCKET", "M_BUCKET"], "i32"), **strides,
            **_names(["rows_per_group", "cols_per_split"], "i32")}),
        "softmax_ce_bwd": (softmax_ce._softmax_ce_bwd_kernel, {
            **ce_in, **_names(["coef_ptr", "own_lse_ptr", "other_lse_ptr", "soft_lse_ptr"], acc_ptr), "DQ_ptr": ptr,
            "ds_rows_ptr": acc_ptr, "alpha_ptr": acc_ptr,
            **_names(["N", "M", "D", "pos_off", "N_BUCKET", "M_BUCKET"], "i32"), **strides,
            **_names(["stride_dqs", "stride_dqn", "stride_dqd", "cols_per_split"], "i32")}),
        "info_nce_fwd_grad": (softmax_ce._info_nce_fwd_grad_kernel, {
            "Q_ptr": ptr, "K_ptr": ptr, "scale_ptr": acc_ptr,
            **_names(["part_max_ptr", "part_sum_ptr", "part_dot_ptr", "diag2_ptr", "diag_raw_ptr", "ACC_ptr"],
                     acc_ptr),
            **_names(["N", "M", "D", "pos_off", "N_BUCKET", "M_BUCKET", "stride_qn", "stride_qd", "stride_kn",
                      "stride_kd", "stride_as", "stride_an", "stride_ad", "cols_per_split"], "i32")}),
        "exp_gram_fwd": (exp_gram._exp_gram_fwd_kernel, {
            "X_ptr": ptr, **_names(["sq_ptr", "row_part_ptr"], acc_ptr),
            **_names(["N", "D", "stride_xn", "stride_xd"], "i32"), "neg_t_log2e_ptr": acc_ptr, "N_BUCKET": "i32"}),
        "exp_gram_bwd": (exp_gram._exp_gram_bwd_kernel, {
            "X_ptr": ptr, **_names(["sq_ptr", "coef_ptr"], acc_ptr), "DX_ptr": ptr,
            **_names(["N", "D", "stride_xn", "stride_xd", "stride_dxs", "stride_dxn", "stride_dxd",
                      "cols_per_split"], "i32"), "neg_t_log2e_ptr": acc_ptr, "N_BUCKET": "i32"}),
    }


#: The constexpr flag combinations each launcher uses (info_nce symmetric / one-way, ITC).
FLAGS = {
    "softmax_ce_fwd": [dict(HAS_SOFT=False, HAS_COL=True), dict(HAS_SOFT=False, HAS_COL=False),
                       dict(HAS_SOFT=True, HAS_COL=False)],
    "softmax_ce_bwd": [dict(HAS_OWN=True, HAS_OTHER=True, HAS_SOFT=False, COMPUTE_DS=True),
                       dict(HAS_OWN=True, HAS_OTHER=True, HAS_SOFT=False, COMPUTE_DS=False),
                       dict(HAS_OWN=True, HAS_OTHER=False, HAS_SOFT=False, COMPUTE_DS=True),
                       dict(HAS_OWN=False, HAS_OTHER=True, HAS_SOFT=False, COMPUTE_DS=False),
                       dict(HAS_OWN=True, HAS_OTHER=False, HAS_SOFT=True, COMPUTE_DS=True)],
    "info_nce_fwd_grad": [{}],
    "exp_gram_fwd": [{}],
    "exp_gram_bwd": [dict(SPLIT_PRODUCT=True), dict(SPLIT_PRODUCT=False)],
}
CONFIGS = {"softmax_ce_fwd": softmax_ce.FORWARD_CONFIGS, "softmax_ce_bwd": softmax_ce.BACKWARD_CONFIGS,
           "info_nce_fwd_grad": softmax_ce.BACKWARD_CONFIGS,
           "exp_gram_fwd": exp_gram.FORWARD_CONFIGS, "exp_gram_bwd": exp_gram.BACKWARD_CONFIGS}


def build(fn, signature: dict, constexprs: dict, cfg: triton.Config):
    """Compile ``fn`` for sm_90; returns the compiled kernel."""
    constexprs = {**constexprs, **cfg.kwargs}
    # What the runtime specialiser sees for contiguous inputs: unit inner strides are constants,
    # pointers, row strides and sizes are multiples of 16.
    for name in signature:
        if name.startswith("stride_") and name.endswith("d"):
            constexprs[name] = 1
    sig = {k: ("constexpr" if k in constexprs else v) for k, v in signature.items()}
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v != "constexpr" and (v.startswith("*") or k.startswith("stride_")
                                      or k in ("N", "M", "D", "N_BUCKET", "M_BUCKET"))}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def mma_kind(kernel) -> str:
    """How the products were lowered, from the kernel's TritonGPU IR."""
    ttgir = kernel.asm["ttgir"]
    if "warp_group_dot" in ttgir:
        return "wgmma"
    return "mma" if "nvidia_mma<" in ttgir else "fma"


def resource_usage(kernel) -> str:
    usage = ""
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        usage = " ".join(w for w in out.split() if w.startswith(("REG:", "STACK:")))
    return f"{usage} SMEM:{kernel.metadata.shared} MMA:{mma_kind(kernel)}".strip()


def jobs(all_configs: bool, dtypes, widths):
    """(kernel name, dtype name, D_PADDED, flags, config) to build."""
    for kernel, configs in CONFIGS.items():
        for dtype in dtypes:
            torch_dtype = DTYPES[dtype][1]
            for width in widths:
                # the constexprs the launchers pass for this dtype
                base = dict(**_common.kernel_dtypes(torch_dtype), D_PADDED=width)
                if kernel.startswith("softmax_ce"):
                    base.update(softmax_ce.factored_exp_args(torch_dtype))
                flag_sets = FLAGS[kernel] if all_configs else FLAGS[kernel][:1]
                for flags in flag_sets:
                    pruned = _common.prune_configs(configs, {**base, **flags})
                    for cfg in (pruned if all_configs else [configs[0]]):
                        yield kernel, dtype, width, {**base, **flags}, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true", help="every pruned config and flag combination")
    p.add_argument("--dtypes", default=None, help="comma list of bf16, fp16, fp32, fp64 (default: bf16; --all: bf16,fp32)")
    p.add_argument("--widths", default="512", help="comma list of D_PADDED values (powers of two >= 16)")
    args = p.parse_args(argv)
    dtypes = (args.dtypes or ("bf16,fp32" if args.all else "bf16")).split(",")
    widths = [int(w) for w in args.widths.split(",")]
    bad = 0
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    for kernel, dtype, width, constexprs, cfg in jobs(args.all, dtypes, widths):
        fn, signature = _signatures(DTYPES[dtype][0], "*fp64" if dtype == "fp64" else "*fp32")[kernel]
        flags = ",".join(f"{k}={int(v)}" for k, v in constexprs.items()
                         if k not in ("ACC_DTYPE", "DOT_PRECISION", "D_PADDED", "FACTOR_SPREAD")) or "-"
        label = (f"{kernel} {dtype} D={width} {flags} "
                 f"{'x'.join(str(v) for k, v in cfg.kwargs.items() if k.startswith('BLOCK_'))}"
                 f"/w{cfg.num_warps}/s{cfg.num_stages}{'/flat' if cfg.kwargs.get('FLATTEN') else ''}")
        try:
            kernel_obj = build(fn, signature, constexprs, cfg)
        except Exception as exc:  # report and go on: the point is the whole table
            bad += 1
            print(f"FAILED {label} {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        usage = resource_usage(kernel_obj)
        if kernel_obj.metadata.shared > SM90_MAX_SMEM:
            bad += 1
            usage += f" (over the sm_90 limit of {SM90_MAX_SMEM})"
        print(f"BUILT {label} {usage}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
