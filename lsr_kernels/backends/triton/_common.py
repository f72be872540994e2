"""Pieces shared by the Triton kernel families: constants, the similarity-tile helper, launch plumbing.

Nothing here computes a loss; see :mod:`.softmax_ce` (``info_nce``, ``itc_soft_ce``) and
:mod:`.exp_gram` (``exp_gram_sum``) for the formulas and ``SPEC.md`` section 4 for what "fused" means.

Launch plumbing
    Every kernel has a plain ``@triton.jit`` version and an autotuned wrapper. A launcher calls the
    autotuned wrapper on a GPU, the plain kernel with :data:`INTERPRETER_CONFIG` under the Triton
    interpreter (autotuning there would run every config, very slowly), and the plain kernel with an
    explicit :class:`triton.Config` when a caller passes one (the GPU tests run each config).
    ``LSR_TRITON_AUTOTUNE=0`` (read at each launch) skips the autotuner on a GPU too: the smallest
    config that survives pruning runs, so a first call compiles one kernel instead of every config
    (the GPU test run uses it; timings should not).

    Scratch buffers are laid out by rows/columns, never by program id, so their shape does not depend
    on the config that the autotuner picks: row groups and column splits are multiples of a *granule*
    that every config's block sizes divide.
"""

import contextlib
import functools
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# ------------------------------------------------------------------------------------- constants
#: log2(e): logits are folded into base 2 once (``t = s * log2(e) * <q, k>``) so every exponential is
#: an ``exp2`` (one MUFU instruction on NVIDIA GPUs).
LOG2E = 1.4426950408889634
#: ln(2): converts a base-2 log-sum-exp back to natural units.
LN2 = 0.6931471805599453
#: LOG2E as a compile-time constant for the kernels (a plain float global is not visible in @triton.jit).
LOG2E_C = tl.constexpr(LOG2E)
#: A finite stand-in for -inf on masked logits: ``exp2(NEG_BIG - m)`` is exactly 0 for any real row
#: maximum ``m``, and unlike -inf it never produces ``-inf - (-inf) = NaN`` in padded rows.
NEG_BIG = tl.constexpr(-1.0e30)

#: The largest BLOCK_M / BLOCK_N of any GPU config: row groups and column splits are multiples of it.
GPU_GRANULE = 128
#: A backward program accumulates an fp32 ``[BLOCK_M, BLOCK_DO]`` slice of the gradient in registers
#: (a wider D takes several slices on grid axis 1, each recomputing the similarity tiles). Built for
#: sm_90 with 8 warps (ptxas resource usage): 64 x 256 with bf16/fp16 operands needs ~210 registers,
#: 64 x 512 spills ~0.2 KB per thread (no recompute at D = 512: the autotuner decides), larger
#: spills kilobytes. fp32/fp64 products run on the FMA units and need registers for their operands
#: too: 64 x 128 at most, and product tiles of at most 128 x 64 (128 x 128 spills 1-22 KB).
MAX_ACC_ELEMENTS = 64 * 512
MAX_ACC_ELEMENTS_FMA = 64 * 128
MAX_FMA_TILE = 128 * 64
#: Similarity tile of tensor-core products (fp16/bf16): 128 x 128 builds for sm_90 without spills with
#: 64-wide K slices (128-wide ones spill 64 B in the symmetric forward: the autotuner weighs that).
MAX_TENSOR_CORE_TILE = 128 * 128
#: Column splits of a backward (each adds an fp32 [N, D] partial gradient): at most 8, or up to 64
#: while all partials together stay within 2^24 fp32 values (64 MiB).
MAX_BACKWARD_SPLITS = 8
SPLIT_PARTIAL_ELEMENTS = 2**24

#: Interpreter: tiny blocks (tl.dot needs >= 16), small D slices and few programs, so tiny test shapes
#: still exercise several row groups, column splits and D slices.
#: (Kernels without a D slice or a FLATTEN switch ignore BLOCK_DO / FLATTEN: the interpreter drops
#: unknown keywords; it runs loops as written either way.)
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_DO": 32, "FLATTEN": False},
                                   num_warps=4, num_stages=1)
INTERPRETER_GRANULE = 16
#: Row counts the kernels index in 32 bits (program id x block, plus a tile past the last row).
MAX_ROWS = 2**31 - 1024
INTERPRETER_TARGET_PROGRAMS = 4


# --------------------------------------------------------------------------------------- helpers
@triton.jit
def _similarity_tiles(q_ptr, q2_ptr, k_ptr, rows, cols, row_mask, col_mask, D,
                      stride_qn, stride_qd, stride_q2n, stride_q2d, stride_kn, stride_kd,
                      WITH_SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Raw dot products ``<q_i, k_j>`` of one ``[BLOCK_M, BLOCK_N]`` tile (and ``<q2_i, k_j>`` when
    ``WITH_SECOND``, sharing each loaded ``k`` slice), reduced over D in slices of ``BLOCK_K``."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    s2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        d_mask = offs_d < D
        # k is read transposed ([BLOCK_K, BLOCK_N]) straight from memory: no register transpose.
        kt = tl.load(k_ptr + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, kt, s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if WITH_SECOND:
            q2 = tl.load(q2_ptr + rows[:, None] * stride_q2n + offs_d[None, :] * stride_q2d,
                         mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            s2 = tl.dot(q2, kt, s2, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return s, s2


@triton.jit
def _row_slice_program(N, M, D, cols_per_split, BLOCK_M: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Where a program of a ``(row blocks, D slices, column splits)`` grid works: its rows (int64)
    and their mask, its slice of the D output columns and their mask, and its columns
    ``[col_lo, col_hi)`` of the ``M`` (``cols_per_split`` per split)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    col_lo = tl.program_id(2) * cols_per_split
    return rows, rows < N, outs, outs < D, col_lo, tl.minimum(col_lo + cols_per_split, M)


# ---------------------------------------------------------------------------- dtype and devices
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: float64 for float64 inputs (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_dtypes(dtype: torch.dtype) -> Dict[str, object]:
    """The ``ACC_DTYPE`` / ``DOT_PRECISION`` constexprs for an input dtype.

    fp32 products use ``input_precision="ieee"`` (no TF32 truncation) so fp32 parity is tight; fp16
    and bf16 products run on tensor cores with fp32 accumulation (the option only affects fp32).
    """
    if dtype == torch.float64:
        return {"ACC_DTYPE": tl.float64, "DOT_PRECISION": "ieee"}
    if dtype == torch.float32:
        return {"ACC_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}
    if dtype in (torch.float16, torch.bfloat16):
        return {"ACC_DTYPE": tl.float32, "DOT_PRECISION": "tf32"}
    raise TypeError(f"triton backend: expected float16, bfloat16, float32 or float64 features, got {dtype}")


def interpreting() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_similarity_tiles).__name__ == "InterpretedFunction"


def check_device(name: str, x: Tensor) -> None:
    if interpreting() and x.dtype == torch.bfloat16:
        # the interpreter runs the kernels in NumPy, which has no bfloat16: the numbers would be garbage
        raise TypeError(f"{name}: bfloat16 cannot run under the Triton interpreter (TRITON_INTERPRET=1 has no "
                        f"bfloat16 arithmetic), got shape {tuple(x.shape)}; use float16/float32 there, or "
                        f"backend='chunked', or run bfloat16 on a GPU without the interpreter")
    if x.is_cuda:
        return
    if x.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name}: the triton backend needs CUDA tensors, got device {x.device} (shape {tuple(x.shape)}); "
        f"CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before triton is "
        f"imported). On CPU use backend='chunked'.")


def check_matrix(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D [rows, D] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name}: at most {MAX_ROWS} rows (32-bit tile indices), got shape {tuple(x.shape)}")
    kernel_dtypes(x.dtype)
    check_device(name, x)


def check_same(name: str, x: Tensor, ref_name: str, ref: Tensor, *, same_rows: bool) -> None:
    if x.dtype != ref.dtype or x.device != ref.device:
        raise ValueError(f"{name}: dtype/device {x.dtype}/{x.device} differ from {ref_name}'s "
                         f"{ref.dtype}/{ref.device}")
    if x.shape[1] != ref.shape[1] or (same_rows and x.shape[0] != ref.shape[0]):
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match {ref_name}'s {tuple(ref.shape)}")


def check_scale(scale: Tensor, like: Tensor) -> Tensor:
    if not isinstance(scale, Tensor) or scale.numel() != 1 or not scale.is_floating_point():
        got = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(f"scale: expected a one-element floating tensor, got {got}")
    if scale.device != like.device:
        raise ValueError(f"scale: device {scale.device} differs from the features' {like.device}")
    return scale.reshape(())


# -------------------------------------------------------------------------------- launch plumbing
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch aims for: two per SM on a GPU (host query, cached; no sync)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_TARGET_PROGRAMS
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def granule() -> int:
    return INTERPRETER_GRANULE if interpreting() else GPU_GRANULE


def padded_width(d: int) -> int:
    """``D`` rounded up to a power of two (>= 16): an autotune key and the cap of BLOCK_K, BLOCK_DO."""
    return max(16, triton.next_power_of_2(d))


#: Autotune keys bucket N (and M) by powers of two up to here: past it every program runs many tiles
#: and the best config no longer moves with N, so a doubling search (benchmarks' largest N) or a
#: last short batch does not re-time every config at each new N.
TUNE_BUCKET_CAP = 65536


def tune_bucket(n: int) -> int:
    """The autotune key standing for ``n`` rows: the next power of two, at most :data:`TUNE_BUCKET_CAP`."""
    return min(triton.next_power_of_2(n), TUNE_BUCKET_CAP)


def split_range(extent: int, parts: int, unit: int) -> Tuple[int, int]:
    """Cut ``extent`` into at most ``parts`` ranges whose length is a multiple of ``unit``;
    return ``(length, count)``."""
    units = triton.cdiv(extent, unit)
    parts = max(1, min(parts, units))
    length = triton.cdiv(units, parts) * unit
    return length, triton.cdiv(extent, length)


def plan_forward(n_rows: int, n_cols: int, device: torch.device, with_col_stats: bool) -> Dict[str, int]:
    """Row groups x column splits of a forward pass over an ``n_rows x n_cols`` similarity matrix.

    Each program owns one (row group, column split) rectangle and writes per-row partial statistics
    (``[splits, n_rows]``) and, with column statistics, per-column ones (``[groups, n_cols]``): O(N)
    memory for a bounded number of programs. With column statistics the rectangle is kept square-ish
    (groups ~ splits ~ sqrt(programs)) to keep both buffers small; without, every row granule is its
    own group and columns are split only when there are too few rows to fill the GPU.
    """
    unit, target = granule(), target_programs(device)
    row_units = triton.cdiv(n_rows, unit)
    if with_col_stats:
        want_groups = max(1, int(math.isqrt(target)))
        want_splits = triton.cdiv(target, min(want_groups, row_units))
    else:
        want_groups = row_units
        want_splits = triton.cdiv(target, row_units)
    rows_per_group, groups = split_range(n_rows, want_groups, unit)
    cols_per_split, splits = split_range(n_cols, want_splits, unit)
    return {"rows_per_group": rows_per_group, "groups": groups,
            "cols_per_split": cols_per_split, "splits": splits}


def plan_backward(n_rows: int, n_cols: int, width: int, device: torch.device) -> Dict[str, int]:
    """Column splits of a backward over rows: 1 unless the row blocks alone cannot fill the GPU (a
    small batch against a long queue). Each extra split costs an fp32 ``[n_rows, width]`` partial
    gradient: at most :data:`MAX_BACKWARD_SPLITS`, or more while all partials fit in
    :data:`SPLIT_PARTIAL_ELEMENTS` (64 MiB) (up to 64)."""
    unit, target = granule(), target_programs(device)
    # Row blocks of a typical backward config (BLOCK_M = 64 on a GPU, 16 in the interpreter).
    row_blocks = triton.cdiv(n_rows, min(unit, 64))
    max_splits = max(MAX_BACKWARD_SPLITS, min(64, SPLIT_PARTIAL_ELEMENTS // (n_rows * width)))
    want = min(max_splits, triton.cdiv(target, row_blocks))
    cols_per_split, splits = split_range(n_cols, want, unit)
    return {"cols_per_split": cols_per_split, "splits": splits}


def tile_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, *,
                block_do: Optional[int] = None, flatten: Optional[bool] = None) -> triton.Config:
    """An autotune config; ``BLOCK_DO`` (a backward's D slice) and ``FLATTEN`` (one pipelined loop over
    tile and K slice) only for the kernels that take them."""
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    if block_do is not None:
        kwargs["BLOCK_DO"] = block_do
    if flatten is not None:
        kwargs["FLATTEN"] = flatten
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def prune_configs(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """Autotune pruning: ``BLOCK_K`` and ``BLOCK_DO`` never wider than the padded D; drop configs whose
    fp32 accumulator (``BLOCK_M x BLOCK_DO``) or FMA product tile (fp32/fp64) would spill, always
    keeping the smallest as a fallback. Duplicates left by clamping are removed.

    From the sm_90 build table (``scripts/triton_sm90_sweep.py --all``): the ITC forward holds two
    similarity tiles (``HAS_SOFT``), so its tile area is halved (128 x 128 spills 288-440 bytes in
    bf16; 128 x 64 in fp32 spills 3 KB); fp64 (the gradcheck path) keeps only the smallest config
    (its larger ones spill, or need more shared memory than an sm_90 block has)."""
    args = {**named_args, **kwargs}
    width = args["D_PADDED"]
    fma_products = args.get("DOT_PRECISION") == "ieee"
    acc_limit = MAX_ACC_ELEMENTS_FMA if fma_products else MAX_ACC_ELEMENTS
    tile_limit = MAX_FMA_TILE if fma_products else MAX_TENSOR_CORE_TILE
    if args.get("HAS_SOFT"):
        tile_limit //= 2
    smallest_only = args.get("ACC_DTYPE") == tl.float64

    def footprint(cfg):
        return cfg.kwargs["BLOCK_M"] * max(cfg.kwargs["BLOCK_N"], cfg.kwargs.get("BLOCK_DO", 0))

    seen, kept = set(), []
    for cfg in sorted(configs, key=footprint):
        kw = dict(cfg.kwargs)
        kw["BLOCK_K"] = min(kw["BLOCK_K"], width)
        if "BLOCK_DO" in kw:
            kw["BLOCK_DO"] = min(kw["BLOCK_DO"], width)
            if kept and kw["BLOCK_M"] * kw["BLOCK_DO"] > acc_limit:
                continue
        if kept and (smallest_only or kw["BLOCK_M"] * kw["BLOCK_N"] > tile_limit):
            continue
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key in seen:
            continue
        seen.add(key)
        kept.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return kept


def autotuned(configs: List[triton.Config], key: List[str]):
    """``triton.autotune`` over ``configs`` for each value of ``key`` (the tensors' dtypes are always
    part of Triton's key), pruned by :func:`prune_configs`."""
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune_configs})


AUTOTUNE_ENV = "LSR_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """``LSR_TRITON_AUTOTUNE``: ``1`` (default) autotunes on a GPU, ``0`` runs one fixed config."""
    value = os.environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def launch(kernel, tuned, grid, args: dict, config: Optional[triton.Config]) -> None:
    """Run ``kernel``: autotuned on a GPU, :data:`INTERPRETER_CONFIG` under the interpreter, or the
    explicit ``config`` a caller (the per-config GPU tests) passes; with ``LSR_TRITON_AUTOTUNE=0`` the
    smallest config that survives pruning instead of the autotuner."""
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is None and tuned is not None and not autotune_enabled():
        config = prune_configs(tuned.configs, args)[0]
    device = next(v.device for v in args.values() if isinstance(v, Tensor))
    # Triton launches on the current device: make it the tensors' one (cuda:1 while cuda:0 is current)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if config is None:
            tuned[grid](**args)
        else:
            kernel[grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def merge_partial_lse2(maxes: Tensor, sums: Tensor) -> Tuple[Tensor, Tensor]:
    """Combine partial base-2 log-sum-exp statistics ``[parts, L]`` (running max, sum of
    ``exp2(t - max)``): return ``(top, log2_sum)`` with ``log2 sum exp2 t = top + log2_sum``, kept apart
    so a caller can subtract a logit from ``top`` before adding the (small) ``log2_sum``."""
    top = maxes.amax(0)
    return top, torch.log2((sums * torch.exp2(maxes - top)).sum(0))

