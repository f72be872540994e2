"""Multi-process semantics of the losses on ``torch.distributed`` (SPEC section 5).

Each rank holds ``n`` rows of the global batch (``N = W n`` over ``W`` ranks, the same ``n`` on every
rank). Rank ``r`` computes its *share* ``l_r`` of the global objective ``L`` (the loss of one process
holding the whole batch), with ``mean_r l_r = L``:

- contrastive terms (SPEC 2.1, ``L_icon`` of 2.2): the rank's rows against every rank's columns, the
  positive of local row ``i`` at global column ``r n + i``; ``l_r`` is the mean over the local rows.
  No rank ever holds an ``N x N`` matrix; the blockwise engine not even ``n x N``: tiles of
  ``rows x cols`` are recomputed in the backward from O(n) saved row statistics (the ``reference``
  backend, the oracle, materialises its ``n x N`` rows).
- orthogonality, bridge, the pair term of ``L_gca``: row-wise, the mean over the local rows.
- uniformity: the global exp-Gram sum ``S = sum_r S_r`` (``S_r``: local rows against all columns) is
  one all-reduce of a scalar; every rank's share is ``log(S / N)`` itself.
- geometric consistency: the ``D x D`` Gram matrices of SPEC 2.4 are sums over ranks, one all-reduce;
  no feature is gathered for it.
- ITC (SPEC 2.6): the momentum features of every rank are gathered without gradient and form the
  bank with the queue; local rows against the whole bank: single-process ALBEF on the global batch
  (ALBEF's own DDP code uses only the local momentum features and gathers for the queue).

Gradients: the collectives carry gradients back to the rank that owns the rows (an all-gather's
backward is a reduce-scatter of the column gradients, an all-reduce's backward an all-reduce). Hence,
for ``local_loss=True, gather_with_grad=True`` (SPEC 5, open_clip's recommended flags) each rank's
feature gradient is ``W dL/dX_r`` and its scale gradient ``dl_r/ds`` with ``mean_r dl_r/ds = dL/ds``:
DDP's averaging of parameter gradients gives exactly the single-process update.

open_clip's flags (``ClipLoss`` matches open_clip's ``ClipLoss`` exactly for all four):

==========  ================  ===================  =====================  ============
local_loss  gather_with_grad  returned loss        feature grad, rank r   scale grad
==========  ================  ===================  =====================  ============
True        True              share ``l_r``        ``W dL/dX_r``          ``dl_r/ds``
False       True              ``L``, every rank    ``W dL/dX_r``          ``dL/ds``
False       False             ``L``, every rank    ``dL/dX_r``            ``dL/ds``
True        False             share ``l_r``        rows only (below)      ``dl_r/ds``
==========  ================  ===================  =====================  ============

``local_loss=False`` computes the same shares and all-reduces them (open_clip materialises the global
``N x N`` logits on every rank instead; the values and gradients are the same). With
``local_loss=False, gather_with_grad=False`` DDP's averaging gives ``1/W`` of the single-process
feature update (open_clip's default flags behave so). ``local_loss=True, gather_with_grad=False``
is open_clip's combination in which the gathered columns, the rank's own block included, are
constants: a feature gets only the gradient of its own rows' terms, which is not the gradient of
any objective. :func:`clip_loss` reproduces it for open_clip compatibility; :func:`lsr_loss` rejects
it (its uniformity and Gram terms have no "rows only" reading); for :func:`itc_loss` the bank never
carries a gradient, so it is the same as ``gather_with_grad=True``.

Two ways to see the columns (``mode``):

- ``"gather"``: one all-gather of every column feature set (``O(N D)`` memory per rank), one
  reduce-scatter of their gradients in the backward. Fewest messages; use it while ``N D`` fits.
- ``"ring"``: the column blocks travel around the ring of ranks (``batch_isend_irecv``, each block
  sent while the previous one is being used), an online log-sum-exp accumulating the row statistics
  (as Inf-CL does); the backward runs a second ring in which each block travels with its gradient
  accumulator and arrives back at its owner after ``W`` hops. Per-rank memory for the contrastive
  and uniformity terms stays ``O(n D)``: use it when the gathered features (several sets of
  ``N x D`` plus their fp32 gradients) do not fit, e.g. very large global batches or wide features.
  ``W - 1`` sequential hops per pass: latency-bound for small blocks. ITC always gathers (its
  momentum features carry no gradient and the queue already holds ``K`` rows on every rank).

Backends: ``"reference"`` in gather mode gathers with autograd and materialises the ``n x N`` local
logits (the oracle of the tests). The fast backends in gather mode run each contrastive pair as the
backend's fused ``info_nce`` of the ``n`` local rows against the ``N`` gathered columns with the
positives at offset ``r n`` (the primitive's rectangular form), so on a GPU the Triton or CUDA kernels
do the work, with O(n) saved statistics; its column gradient flows back through the gather's
reduce-scatter. The uniformity terms (a rectangular exp-Gram sum), and every term in ring mode, run
through this module's blockwise engine (PyTorch matmuls over tiles, fp32 statistics). ITC uses the
backend's own ``itc_soft_ce`` (positives first, by rotating the gathered bank: a column permutation
does not change a softmax).

Bad setups raise on every rank, never hang: before any other collective, every rank all-gathers a
small signature of its call (which loss, each input's presence, rows, width, dtype and
``requires_grad``, every setting, and whether its own validation failed). A rank whose inputs fail
validation raises its own error; the others raise a ``ValueError`` naming it. Different local batch
sizes, feature widths, queue lengths or settings raise a ``ValueError`` that lists each rank's value.
This costs one tiny collective and one host synchronisation per forward (none in the backward).

A training script under ``torchrun`` initialises the process group, builds the loss with
``rank=dist.get_rank(), world_size=dist.get_world_size(), local_loss=True, gather_with_grad=True``
(and ``distributed_mode="ring"`` for very large batches), wraps the model in DDP, and for ALBEF
enqueues the momentum features with :meth:`lsr_kernels.FeatureQueue.enqueue_gathered`.
:mod:`lsr_kernels.train` (``torchrun ... -m lsr_kernels.train``) is such a script.
"""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import backends, composite, reference
from . import _validation as V
from ._tiles import exp_sums, merge_exp_sums, take_positives

__all__ = ["MODES", "check_process_group", "agree_across_ranks", "gather_features", "all_reduce_sum",
           "clip_loss", "lsr_loss", "itc_loss"]

#: The ways the contrastive terms see the other ranks' columns (see the module docstring).
MODES = ("gather", "ring")

# One fp32 tile of a local-rows x column-block similarity matrix; the engine keeps ~3 alive. CPU: a
# cache-sized working set (as the chunked backend); accelerators: large enough that the Python loop
# over tiles costs little next to the matmuls.
_CPU_TILE_BYTES = 8 << 20
_ACCELERATOR_TILE_BYTES = 256 << 20
# Columns per tile; rows follow from the byte budget. Below 32 rows a matmul is too thin for BLAS.
_MAX_TILE_COLS = 8192
_MIN_TILE_ROWS = 32
#: ``(rows, cols)`` of every tile when set (tests use tiny tiles to cross tile borders); ``None``:
#: from the byte budgets above.
TILE_SHAPE: Optional[Tuple[int, int]] = None

# Point-to-point tags, so a gradient message can never be matched with a block message (gloo matches
# by source and tag; NCCL matches in issue order anyway).
_TAG_BLOCK = 11
_TAG_GRAD = 12


# ------------------------------------------------------------------------------- process groups
def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_process_group(world_size: int, group=None) -> Tuple[int, int]:
    """``(world size, rank)`` of ``group``; a clear error when there is no process group, or when it
    has another size than the loss was built for. Every rank reaches the same verdict (no hang)."""
    if not _initialised():
        raise ValueError(
            f"world_size = {world_size}: torch.distributed is not initialised. Call "
            f"torch.distributed.init_process_group(...) first (torchrun provides the environment), "
            f"or build the loss with world_size = 1")
    actual = dist.get_world_size(group)
    if actual != world_size:
        raise ValueError(f"world_size: the loss was built for world_size = {world_size} but the process "
                         f"group has {actual} ranks")
    return actual, dist.get_rank(group)


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def _comm_device(group, like) -> torch.device:
    """Where small collectives run: the features' device (gloo handles CPU and CUDA tensors, NCCL
    CUDA ones); the current CUDA device for NCCL when there is no usable tensor."""
    if isinstance(like, Tensor) and like.device.type != "meta":
        return like.device
    if _is_nccl(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _peer(group, group_rank: int) -> int:
    # P2P ops take global ranks.
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ---------------------------------------------------------------------- plain collectives (no grad)
def _all_gather(x: Tensor, group) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (``[W m, ...]``), no autograd."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    if _is_nccl(group):
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        single(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, 0)


def _reduce_scatter_sum(x: Tensor, group) -> Tensor:
    """This rank's ``[m, ...]`` block of the sum over ranks of ``x`` (``[W m, ...]``, contiguous;
    consumed: it may be overwritten)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    m = x.shape[0] // world
    if _is_nccl(group):
        out = x.new_empty((m,) + tuple(x.shape[1:]))
        single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        single(out, x, group=group)
        return out
    # gloo has no reduce-scatter on every version we support: all-reduce, keep our block.
    dist.all_reduce(x, group=group)
    return x[rank * m:(rank + 1) * m]


def _ring_exchange(send: Tensor, recv: Tensor, group, tag: int):
    """Post ``send`` to the next rank and ``recv`` from the previous one; returns the requests."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ops = [dist.P2POp(dist.isend, send, _peer(group, (rank + 1) % world), group, tag),
           dist.P2POp(dist.irecv, recv, _peer(group, (rank - 1) % world), group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


# ------------------------------------------------------------------- collectives with gradients
# The collectives' backwards run outside autograd (in-place NCCL/Gloo calls): no second derivatives.
_HIGHER_ORDER = "higher-order gradients need the single-process API with backend='reference'"


class _AllGatherWithGrad(torch.autograd.Function):
    """All ranks' rows; the backward sums every rank's gradient of this rank's block."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        V.refuse_double_backward("distributed", "all_gather", _HIGHER_ORDER)
        return _reduce_scatter_sum(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every rank; the backward is the same all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        V.refuse_double_backward("distributed", "all_reduce", _HIGHER_ORDER)
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity whose backward replaces the gradient by its mean over ranks (the logit scale when
    every rank returns the global loss: each rank then holds ``dL/ds``, as open_clip's)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        V.refuse_double_backward("distributed", "all_reduce", _HIGHER_ORDER)
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out / dist.get_world_size(ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def gather_features(x: Tensor, group=None, *, with_grad: bool) -> Tensor:
    """Every rank's rows of ``x`` in rank order, ``[W n, D]``.

    ``with_grad=True``: the backward returns to each rank the sum over ranks of the gradient of its
    block (``torch.distributed.nn.all_gather``'s semantics, open_clip's ``gather_with_grad``).
    ``with_grad=False``: a constant (ALBEF's ``concat_all_gather``)."""
    if with_grad:
        return _AllGatherWithGrad.apply(x, group)
    return _all_gather(x.detach(), group)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """``sum_r x_r`` on every rank, differentiable (the backward all-reduces the gradients)."""
    return _AllReduceSum.apply(x, group)


# --------------------------------------------------------------------- cross-rank agreement
_CALLS = ("clip", "lsr", "itc", "enqueue")
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_SIGNATURE_LEN = 96
_QUEUE_NAMES = ("image_queue", "text_queue")


# Strings a setting may hold (anything else encodes as -1 and fails validation on its rank anyway).
_KNOWN_STRINGS = MODES + backends.BACKENDS


def _encode(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # exact: the float's bits
        return struct.unpack("<q", struct.pack("<d", value))[0]
    if isinstance(value, str):
        return _KNOWN_STRINGS.index(value) if value in _KNOWN_STRINGS else -1
    raise TypeError(f"cannot encode setting {value!r}")


def _decode(value: int, like) -> object:
    if isinstance(like, bool):
        return bool(value)
    if isinstance(like, float):
        return struct.unpack("<d", struct.pack("<q", value))[0]
    if isinstance(like, str):
        return repr(_KNOWN_STRINGS[value]) if 0 <= value < len(_KNOWN_STRINGS) else "an unknown name"
    return value


def _tensor_fields(name: str, x) -> List[Tuple[str, int]]:
    if x is None:
        return [(f"{name}.present", 0), (f"{name}.rows", -1), (f"{name}.width", -1),
                (f"{name}.dtype", -1), (f"{name}.requires_grad", -1)]
    is_matrix = isinstance(x, Tensor) and x.dim() == 2
    return [(f"{name}.present", 1),
            (f"{name}.rows", x.shape[0] if is_matrix else -1),
            (f"{name}.width", x.shape[1] if is_matrix else -1),
            (f"{name}.dtype", _DTYPE_CODES.get(x.dtype, 0) if isinstance(x, Tensor) else -1),
            (f"{name}.requires_grad", int(x.requires_grad) if isinstance(x, Tensor) else -1)]


def _per_rank(values: Sequence[object]) -> str:
    return ", ".join(f"rank {k}: {v}" for k, v in enumerate(values))


def _mismatch_message(label: str, column: List[int], settings: Dict[str, object]) -> str:
    name, _, attr = label.partition(".")
    if label == "grad_mode":
        return (f"autograd is enabled on some ranks and disabled (torch.no_grad) on others "
                f"({_per_rank(bool(v) for v in column)}); every rank must run the same way")
    if not attr:  # a setting
        like = settings[name]
        return (f"{name} differs across ranks ({_per_rank(_decode(v, like) for v in column)}); every rank "
                f"must build the loss with the same settings")
    if attr == "present":
        given = [k for k, v in enumerate(column) if v]
        missing = [k for k, v in enumerate(column) if not v]
        return (f"{name} is given on rank(s) {given} but not on rank(s) {missing}; every rank must pass "
                f"the same inputs")
    if attr == "rows" and name in _QUEUE_NAMES:
        return (f"queue lengths differ across ranks: {name} has K = ({_per_rank(column)}); every rank "
                f"must hold the same queue (enqueue with FeatureQueue.enqueue_gathered)")
    if attr == "rows":
        return (f"local batch sizes differ across ranks: {name} has N = ({_per_rank(column)}); every rank "
                f"must hold the same number of rows (rank r's positives sit at columns r * N of the "
                f"gathered batch; drop the last incomplete batch, e.g. DistributedSampler(drop_last=True))")
    if attr == "width":
        return f"feature widths differ across ranks: {name} has D = ({_per_rank(column)})"
    if attr == "dtype":
        return (f"dtypes differ across ranks: {name} is ({_per_rank(_CODE_DTYPES.get(v, '?') for v in column)})")
    return f"requires_grad differs across ranks: {name} has ({_per_rank(bool(v) for v in column)})"


def agree_across_ranks(call: str, tensors: Dict[str, object], settings: Dict[str, object],
                       local_error: Optional[BaseException], group=None) -> None:
    """Make every rank reach the same verdict on a call before any collective that could hang.

    All ranks all-gather a fixed-length signature: the call, whether this rank's own validation
    failed (``local_error``), autograd mode, for each input its presence, rows, width, dtype and
    ``requires_grad``, and every setting (floats by their bits). If any rank failed, that rank raises
    its own error and the others a ``ValueError`` naming it; otherwise the first field that differs
    across ranks raises a ``ValueError`` listing each rank's value. One small collective and one host
    synchronisation (to read the table).
    """
    if call not in _CALLS:
        raise ValueError(f"call: expected one of {_CALLS}, got {call!r}")
    fields: List[Tuple[str, int]] = [("call", _CALLS.index(call)), ("error", int(local_error is not None)),
                                     ("grad_mode", int(torch.is_grad_enabled()))]
    for name, x in tensors.items():
        fields += _tensor_fields(name, x)
    fields += [(name, _encode(value)) for name, value in settings.items()]
    if len(fields) > _SIGNATURE_LEN:
        raise RuntimeError(f"internal: signature of {len(fields)} fields exceeds {_SIGNATURE_LEN}")
    values = [v for _, v in fields] + [0] * (_SIGNATURE_LEN - len(fields))
    first = next((x for x in tensors.values() if isinstance(x, Tensor)), None)
    local = torch.tensor(values, dtype=torch.int64, device=_comm_device(group, first))
    table = _all_gather(local[None], group).tolist()

    calls = [row[0] for row in table]
    if len(set(calls)) > 1:
        names = [_CALLS[c] if 0 <= c < len(_CALLS) else "?" for c in calls]
        raise ValueError(f"ranks called different losses ({_per_rank(names)}); every rank must make the same "
                         f"calls in the same order")
    failed = [k for k, row in enumerate(table) if row[1]]
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError(f"rank(s) {failed} rejected their inputs (the error raised there says why); this "
                         f"rank stops as well instead of waiting for them in a collective")
    for index, (label, _) in enumerate(fields[2:], start=2):
        column = [row[index] for row in table]
        if len(set(column)) > 1:
            raise ValueError(_mismatch_message(label, column, settings))


# --------------------------------------------------------------------------- blockwise engine
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics and accumulation: fp32 for fp16/bf16/fp32 (fp64 kept, for gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_shape(n_rows: int, n_cols: int, device: torch.device) -> Tuple[int, int]:
    if TILE_SHAPE is not None:
        rows, cols = TILE_SHAPE
        return max(1, min(rows, n_rows)), max(1, min(cols, n_cols))
    budget = _CPU_TILE_BYTES if device.type == "cpu" else _ACCELERATOR_TILE_BYTES
    cols = min(n_cols, _MAX_TILE_COLS)
    rows = max(_MIN_TILE_ROWS, budget // (4 * cols))
    return min(rows, n_rows), cols


def _product(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b.T`` in the inputs' dtype (tensor cores; the reference rounds the same), then ``acc``."""
    return torch.mm(a, b.T).to(acc)


def _positive_cosines(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``<a_i, b_i>`` rounded as the tiles' matmul rounds it (to the inputs' dtype): the positives'
    terms then cancel consistently against the tiles' in ``ds``."""
    dots = (a.to(acc) * b.to(acc)).sum(1)
    return dots if a.dtype == acc else dots.to(a.dtype).to(acc)


class _RowTermSpec:
    """What :class:`_RowTerms` computes. ``pairs``: ``("nce", row, col, 0.0)`` for
    ``mean_i -log softmax_j(s <a_i, B_j>)[r n + i]`` over every rank's block ``B`` of tensor ``col``,
    or ``("gram", x, x, t)`` for ``S_r = sum_{j local, k all} exp(-t ||x_j - X_k||^2)``; indices into
    the tensors given to ``apply``. ``columns``: the tensors that travel (gather or ring)."""

    def __init__(self, group, world: int, rank: int, ring: bool, pairs, column_grad: bool):
        self.group, self.world, self.rank, self.ring = group, world, rank, ring
        self.pairs = tuple(pairs)
        self.columns = tuple(dict.fromkeys(col for _, _, col, _ in self.pairs))
        self.slot = {col: k for k, col in enumerate(self.columns)}
        self.column_grad = column_grad


class _RowTerms(torch.autograd.Function):
    """Local rows against every rank's columns, tiled, for several pairs at once (one gather or one
    ring pass serves them all). Returns a ``[P]`` vector: each ``nce`` pair's mean over local rows
    of ``LSE_j X_ij - X_i,rn+i`` (``X = s a B^T``), each ``gram`` pair's ``S_r``.

    Forward: per tile ``logits = s (a_R @ B_C^T)``, each row's max and sum of exponentials merged
    across tiles and blocks, kept apart until the loss (:mod:`lsr_kernels._tiles`); positives read from
    the local block's tiles (``s <a_i, b_i>``, rank-local). Saved: the inputs and one ``[n]`` LSE per
    nce pair (and, in gather mode, the gathered columns).
    Backward, per nce pair with ``w = g / n``: ``P = exp(logits - lse)``;
    ``da = w s (P B - b_pos)``, ``dB = w s (P^T a - a_pos)`` (returned to the block's owner: a
    reduce-scatter in gather mode, the travelling accumulator in ring mode), ``ds = w (sum P (a B^T)
    - sum <a_i, b_i>)``. Per gram pair: ``S = sum_r S_r`` is symmetric, so ``dS/dx_j`` is twice the
    rows' part: ``dx_j = -4 t g (x_j sum_k K_jk - sum_k K_jk X_k)`` and no column gradient travels.
    """

    # An enclosing autocast would round the forward's products but not the backward's (autograd does
    # not carry it into backward), and the backward's softmax from the forward's LSE would not sum to
    # one: both run in the features' own dtype, as the fused backends do.
    @staticmethod
    def forward(ctx, scale: Tensor, spec: _RowTermSpec, *tensors: Tensor) -> Tensor:
        with torch.autocast(tensors[0].device.type, enabled=False):
            return _RowTerms._forward(ctx, scale, spec, *tensors)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RowTerms._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, scale: Tensor, spec: _RowTermSpec, *tensors: Tensor) -> Tensor:
        first = tensors[0]
        n, d = first.shape
        acc = _acc_dtype(first.dtype)
        device = first.device
        s = scale.detach().reshape(()).to(acc)
        local_cols = torch.stack([tensors[c] for c in spec.columns])  # [C, n, D]
        gathered = None
        if not spec.ring:
            gathered = (local_cols[None] if spec.world == 1
                        else _all_gather(local_cols, spec.group).view(spec.world, *local_cols.shape))
        tile_rows, tile_cols = _tile_shape(n, n, device)
        wide = {i: tensors[i].to(acc) for kind, i, _, _ in spec.pairs if kind == "gram"}
        sq_norms = {i: x.square().sum(1) for i, x in wide.items()}
        # per nce pair: each row's (top, total) of its logits, kept apart (lsr_kernels._tiles), and
        # its positive logit, read from the local block's tiles so that top - positive >= 0 exactly
        stats = {p: (torch.full((n,), float("-inf"), dtype=acc, device=device),
                     torch.zeros(n, dtype=acc, device=device), torch.empty(n, dtype=acc, device=device))
                 for p, (kind, _, _, _) in enumerate(spec.pairs) if kind == "nce"}
        totals = {p: torch.zeros((), dtype=acc, device=device)
                  for p, (kind, _, _, _) in enumerate(spec.pairs) if kind == "gram"}

        current = local_cols
        for step in range(spec.world):
            owner = (spec.rank - step) % spec.world
            pending = incoming = None
            if spec.ring and step + 1 < spec.world:
                incoming = torch.empty_like(current)
                pending = _ring_exchange(current, incoming, spec.group, _TAG_BLOCK)
            block = current if spec.ring else gathered[owner]
            for p, (kind, row, col, t) in enumerate(spec.pairs):
                cols = block[spec.slot[col]]
                if kind == "nce":
                    a, (top, total, positives) = tensors[row], stats[p]
                    for i0 in range(0, n, tile_rows):
                        i1 = min(i0 + tile_rows, n)
                        for j0 in range(0, n, tile_cols):
                            logits = _product(a[i0:i1], cols[j0:j0 + tile_cols], acc).mul_(s)
                            if owner == spec.rank:
                                take_positives(logits, i0, i1, j0, min(j0 + tile_cols, n), positives)
                            top[i0:i1], total[i0:i1] = merge_exp_sums(top[i0:i1], total[i0:i1],
                                                                      *exp_sums(logits, 1))
                else:
                    x, sq = wide[row], sq_norms[row]
                    cols_wide = cols.to(acc)
                    col_sq = cols_wide.square().sum(1)
                    for i0 in range(0, n, tile_rows):
                        i1 = min(i0 + tile_rows, n)
                        for j0 in range(0, n, tile_cols):
                            j1 = min(j0 + tile_cols, n)
                            totals[p] += _gram_tile(x[i0:i1], sq[i0:i1], cols_wide[j0:j1], col_sq[j0:j1], t).sum()
            if pending is not None:
                _wait(pending)
                current = incoming

        out, lse = [], {}
        for p, (kind, row, col, _) in enumerate(spec.pairs):
            if kind == "nce":
                top, total, positives = stats[p]
                log_total = total.log()
                lse[p] = top + log_total
                out.append(((top - positives) + log_total).mean())
            else:
                out.append(totals[p])
        ctx.save_for_backward(scale, *tensors)
        ctx.spec, ctx.lse, ctx.gathered = spec, lse, gathered
        return torch.stack(out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        V.refuse_double_backward("distributed", "row terms", _HIGHER_ORDER)
        scale, *tensors = ctx.saved_tensors
        spec, lse, gathered = ctx.spec, ctx.lse, ctx.gathered
        need_scale = ctx.needs_input_grad[0]
        need = [ctx.needs_input_grad[2 + i] for i in range(len(tensors))]
        first = tensors[0]
        n, d = first.shape
        acc = _acc_dtype(first.dtype)
        device = first.device
        s = scale.detach().reshape(()).to(acc)
        g = grad_out.to(acc)
        tile_rows, tile_cols = _tile_shape(n, n, device)

        grads = {i: torch.zeros((n, d), dtype=acc, device=device) for i in range(len(tensors)) if need[i]}
        grad_scale = torch.zeros((), dtype=acc, device=device) if need_scale else None
        # Column tensors whose gradient travels back to the owner, and their slot in the accumulator.
        col_grad_slot = {}
        if spec.column_grad:
            for col in spec.columns:
                if need[col] and any(kind == "nce" and c == col for kind, _, c, _ in spec.pairs):
                    col_grad_slot[col] = len(col_grad_slot)
        n_col_grads = len(col_grad_slot)
        col_buffer = travelling = None
        if n_col_grads and not spec.ring:
            col_buffer = torch.zeros((spec.world, n_col_grads, n, d), dtype=acc, device=device)
        if n_col_grads and spec.ring:
            travelling = torch.zeros((n_col_grads, n, d), dtype=acc, device=device)
        wide = {i: tensors[i].to(acc) for kind, i, _, _ in spec.pairs if kind == "gram"}
        sq_norms = {i: x.square().sum(1) for i, x in wide.items()}

        local_cols = torch.stack([tensors[c] for c in spec.columns])
        current = local_cols
        for step in range(spec.world):
            owner = (spec.rank - step) % spec.world
            pending = incoming = None
            if spec.ring and step + 1 < spec.world:
                incoming = torch.empty_like(current)
                pending = _ring_exchange(current, incoming, spec.group, _TAG_BLOCK)
            block = current if spec.ring else gathered[owner]
            col_acc = travelling if spec.ring else (col_buffer[owner] if col_buffer is not None else None)
            for p, (kind, row, col, t) in enumerate(spec.pairs):
                cols = block[spec.slot[col]]
                if kind == "nce":
                    a = tensors[row]
                    weight = g[p] / n
                    weight_s = weight * s
                    need_row, col_slot = need[row], col_grad_slot.get(col)
                    for i0 in range(0, n, tile_rows):
                        i1 = min(i0 + tile_rows, n)
                        for j0 in range(0, n, tile_cols):
                            j1 = min(j0 + tile_cols, n)
                            cosines = _product(a[i0:i1], cols[j0:j1], acc)
                            probs = torch.addcmul(-lse[p][i0:i1, None], cosines, s).exp_()
                            if need_scale:
                                grad_scale += weight * (probs * cosines).sum()
                            # P in [0, 1] is safe in fp16/bf16 for the matmul; w s is applied after.
                            probs_mm = probs.to(a.dtype)
                            if need_row:
                                grads[row][i0:i1] += torch.mm(probs_mm, cols[j0:j1]).to(acc).mul_(weight_s)
                            if col_slot is not None:
                                col_acc[col_slot, j0:j1] += torch.mm(probs_mm.T, a[i0:i1]).to(acc).mul_(weight_s)
                elif need[row]:
                    x, sq = wide[row], sq_norms[row]
                    cols_wide = cols.to(acc)
                    col_sq = cols_wide.square().sum(1)
                    factor = g[p] * (-4.0 * t)
                    for i0 in range(0, n, tile_rows):
                        i1 = min(i0 + tile_rows, n)
                        for j0 in range(0, n, tile_cols):
                            j1 = min(j0 + tile_cols, n)
                            kernel = _gram_tile(x[i0:i1], sq[i0:i1], cols_wide[j0:j1], col_sq[j0:j1], t)
                            part = x[i0:i1] * kernel.sum(1, keepdim=True) - kernel @ cols_wide[j0:j1]
                            grads[row][i0:i1] += part.mul_(factor)
            if pending is not None:
                _wait(pending)
                current = incoming
            if travelling is not None and spec.world > 1:
                # The accumulator follows its block to the next rank; after W hops it is home.
                arrived = torch.empty_like(travelling)
                _wait(_ring_exchange(travelling, arrived, spec.group, _TAG_GRAD))
                travelling = arrived

        if n_col_grads:
            if spec.ring:
                own = travelling
            elif spec.world == 1:
                own = col_buffer[0]
            else:
                own = _reduce_scatter_sum(col_buffer.view(spec.world * n_col_grads, n, d), spec.group)
            for col, slot in col_grad_slot.items():
                grads[col] += own[slot]
        # The positives: rank-local (row i of `row` pairs with row i of the local block of `col`).
        for p, (kind, row, col, _) in enumerate(spec.pairs):
            if kind != "nce":
                continue
            weight = g[p] / n
            a, b = tensors[row].to(acc), tensors[col].to(acc)
            if need[row]:
                grads[row] -= (weight * s) * b
            if col in col_grad_slot:
                grads[col] -= (weight * s) * a
            if need_scale:
                grad_scale -= weight * _positive_cosines(tensors[row], tensors[col], acc).sum()

        grad_tensors = [grads[i].to(tensors[i].dtype) if need[i] else None for i in range(len(tensors))]
        if need_scale:
            grad_scale = grad_scale.to(scale.dtype).reshape(scale.shape)
        return (grad_scale, None, *grad_tensors)


def _gram_tile(x: Tensor, sq: Tensor, y: Tensor, y_sq: Tensor, t: float) -> Tensor:
    """``exp(-t (|x_j|^2 + |y_k|^2 - 2 <x_j, y_k>))`` for wide ``x``, ``y``."""
    return torch.addmm(y_sq[None, :], x, y.T, beta=-t, alpha=2 * t).sub_(sq[:, None], alpha=t).exp_()


# ----------------------------------------------------------------------- terms of one rank
class _Setup:
    """Everything a rank needs to compute its share: group, position, flags, backend."""

    def __init__(self, group, world: int, rank: int, local_loss: bool, gather_with_grad: bool, ring: bool,
                 backend: str):
        self.group, self.world, self.rank = group, world, rank
        self.local_loss, self.gather_with_grad, self.ring = local_loss, gather_with_grad, ring
        self.backend = backend
        # Only open_clip's (local_loss=True, gather_with_grad=False) keeps the columns constant.
        self.column_grad = gather_with_grad or not local_loss


def _row_terms(setup: _Setup, pairs: Sequence[Tuple[str, str, str, float]], named: Dict[str, Tensor],
               scale: Tensor) -> List[Tensor]:
    """The rank-local values of ``pairs`` (names into ``named``); see :class:`_RowTerms`."""
    if setup.backend == "reference" and not setup.ring:
        return [_reference_row_term(setup, pair, named, scale) for pair in pairs]
    if setup.ring:
        return _engine_row_terms(setup, pairs, named, scale)
    # Gather mode, fast backend: each nce pair is the backend's fused info_nce of the local rows
    # against the gathered columns (positives at offset r n); the gram pairs take the engine.
    nce = [pair for pair in pairs if pair[0] == "nce"]
    gram = [pair for pair in pairs if pair[0] == "gram"]
    columns = _gather_columns(setup, named, list(dict.fromkeys(col for _, _, col, _ in nce)))
    info_nce = backends.primitives(setup.backend).info_nce
    values = {pair: info_nce(named[pair[1]], columns[pair[2]], scale, False, setup.rank * named[pair[1]].shape[0])
              for pair in nce}
    if gram:
        values.update(zip(gram, _engine_row_terms(setup, gram, named, scale)))
    return [values[pair] for pair in pairs]


def _gather_columns(setup: _Setup, named: Dict[str, Tensor], cols: Sequence[str]) -> Dict[str, Tensor]:
    """Every rank's rows of each named column tensor, ``[W n, D]`` in rank order (with autograd when
    the columns carry gradient: the backward reduce-scatters it to the owners). One all-gather per
    tensor, so each arrives contiguous, as the fused kernels read it, without a second copy."""
    return {name: gather_features(named[name], setup.group, with_grad=setup.column_grad) for name in cols}


def _engine_row_terms(setup: _Setup, pairs: Sequence[Tuple[str, str, str, float]], named: Dict[str, Tensor],
                      scale: Tensor) -> List[Tensor]:
    """``pairs`` through the blockwise engine (:class:`_RowTerms`), in one gather or ring pass."""
    names = list(dict.fromkeys(name for _, row, col, _ in pairs for name in (row, col)))
    index = {name: k for k, name in enumerate(names)}
    spec = _RowTermSpec(setup.group, setup.world, setup.rank, setup.ring,
                        [(kind, index[row], index[col], t) for kind, row, col, t in pairs], setup.column_grad)
    return list(_RowTerms.apply(scale, spec, *[named[name] for name in names]).unbind(0))


def _reference_row_term(setup: _Setup, pair, named: Dict[str, Tensor], scale: Tensor) -> Tensor:
    """The materialised ``n x N`` form (gathered with autograd): the oracle for :class:`_RowTerms`."""
    kind, row, col, t = pair
    a = named[row]
    n = a.shape[0]
    if kind == "nce":
        cols = gather_features(named[col], setup.group, with_grad=setup.column_grad)
        logits = scale * _wide(a @ cols.T)
        labels = torch.arange(n, device=a.device) + setup.rank * n
        return F.cross_entropy(logits, labels)
    cols = _wide(gather_features(named[col], setup.group, with_grad=True))
    x = _wide(a)
    sq_dist = x.square().sum(1)[:, None] + cols.square().sum(1)[None, :] - 2 * (x @ cols.T)
    return torch.exp(-t * sq_dist).sum()


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _geometric_share(setup: _Setup, image: Tensor, text: Tensor, image_aug: Optional[Tensor],
                     text_aug: Optional[Tensor], n_global: int) -> Tensor:
    """SPEC 2.4 through the Gram identities, the ``D x D`` Grams summed over ranks (one all-reduce);
    the pair term of ``L_gca`` row-wise (local mean)."""
    grams = all_reduce_sum(composite.geometric_grams(image, text, image_aug, text_aug), setup.group)
    views = image_aug is not None and text_aug is not None
    gap = composite.pair_gap(image, text, image_aug, text_aug) if views else None
    loss = composite.geometric_from_grams(grams, n_global, gap)
    return loss.to(torch.float64 if image.dtype == torch.float64 else torch.float32)


def _prepare_gradients(setup: _Setup, scale: Tensor, named: Dict[str, Optional[Tensor]]):
    """Identities that shape the gradients for the flags (see the module docstring's table)."""
    if setup.local_loss:
        return scale, named
    if scale.requires_grad:
        scale = _MeanGradOverRanks.apply(scale, setup.group)
    if not setup.gather_with_grad:
        named = {k: (_ScaleGrad.apply(x, 1.0 / setup.world) if x is not None and x.requires_grad else x)
                 for k, x in named.items()}
    return scale, named


def _finish(setup: _Setup, shares: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``local_loss=False``: every value becomes the mean over ranks (one all-reduce)."""
    if setup.local_loss:
        return shares
    keys = list(shares)
    means = all_reduce_sum(torch.stack([shares[k] for k in keys]), setup.group) / setup.world
    return dict(zip(keys, means.unbind(0)))


def _start(call: str, tensors: Dict[str, object], settings: Dict[str, object], validate, group,
           world_size: Optional[int], rank: Optional[int]):
    """Process-group checks, local validation, cross-rank agreement; returns (world, rank, validated).

    Only a missing process group raises at once (no collective is possible). Everything else, a
    ``world_size`` or ``rank`` that disagrees with the group included, is this rank's local error,
    settled in :func:`agree_across_ranks` so that every rank raises together."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):  # before use
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not _initialised():
        raise ValueError(f"{'world_size = ' + str(world_size) + ': ' if world_size is not None else ''}"
                         f"torch.distributed is not initialised. Call torch.distributed.init_process_group(...) "
                         f"first (torchrun provides the environment), or build the loss with world_size = 1")
    world, actual_rank = dist.get_world_size(group), dist.get_rank(group)
    local_error, validated = None, None
    try:
        for name, value in (("world_size", world_size), ("rank", rank)):
            if value is not None and not V.is_int(value):
                raise TypeError(f"{name}: expected an int or None, got {type(value).__name__} {value!r}")
        if world_size is not None:
            check_process_group(world_size, group)
        if rank is not None and rank != actual_rank:
            raise ValueError(f"rank: the loss was built with rank = {rank} but this process is rank "
                             f"{actual_rank} of the process group")
        validated = validate()
    except Exception as err:  # any local failure must reach the agreement step, or the others hang
        local_error = err
    agree_across_ranks(call, tensors, settings, local_error, group)
    return world, actual_rank, validated


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"distributed_mode: expected one of {MODES}, got {mode!r}")
    return mode


# ------------------------------------------------------------------------------ public entry points
def lsr_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale,
    *,
    image_aug: Optional[Tensor] = None,
    text_aug: Optional[Tensor] = None,
    image_ind: Optional[Tensor] = None,
    text_ind: Optional[Tensor] = None,
    image_ind_aug: Optional[Tensor] = None,
    text_ind_aug: Optional[Tensor] = None,
    sep_weight: float = 1.0,
    bridge_weight: float = 1.0,
    gc_weight: float = 0.25,
    bridge_t: float = 0.25,
    uniformity_t: float = 2.0,
    backend: str = "auto",
    group=None,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    mode: str = "gather",
    world_size: Optional[int] = None,
    rank: Optional[int] = None,
) -> Dict[str, Tensor]:
    """:func:`lsr_kernels.lsr_loss` with this rank's rows of a batch sharded over ``group``.

    Arguments as :func:`lsr_kernels.lsr_loss`, plus: ``group`` (``None``: the default group);
    ``local_loss``, ``gather_with_grad`` (open_clip's flags; see the module docstring's table;
    ``local_loss=True, gather_with_grad=False`` is rejected); ``mode`` ``"gather"`` or ``"ring"``;
    ``world_size``, ``rank``: what the caller believes (checked against the group).
    Returns the same keys; each value is this rank's share (``local_loss=True``: the mean over ranks
    is the single-process value) or the global value on every rank (``local_loss=False``).
    """
    return _lsr(image_features, text_features, logit_scale, image_aug=image_aug, text_aug=text_aug,
                image_ind=image_ind, text_ind=text_ind, image_ind_aug=image_ind_aug, text_ind_aug=text_ind_aug,
                sep_weight=sep_weight, bridge_weight=bridge_weight, gc_weight=gc_weight, bridge_t=bridge_t,
                uniformity_t=uniformity_t, backend=backend, group=group, local_loss=local_loss,
                gather_with_grad=gather_with_grad, mode=mode, world_size=world_size, rank=rank, call="lsr")


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, backend: str = "auto", group=None,
              local_loss: bool = True, gather_with_grad: bool = True, mode: str = "gather",
              world_size: Optional[int] = None, rank: Optional[int] = None) -> Tensor:
    """open_clip's distributed ``ClipLoss`` for the four flag combinations (module docstring), without
    ever materialising the global logits."""
    return _lsr(image_features, text_features, logit_scale, sep_weight=0.0, bridge_weight=0.0, gc_weight=0.0,
                backend=backend, group=group, local_loss=local_loss,
                gather_with_grad=gather_with_grad, mode=mode, world_size=world_size, rank=rank,
                call="clip")["loss"]


_FEATURE_NAMES = ("image_features", "text_features", "image_aug", "text_aug",
                  "image_ind", "text_ind", "image_ind_aug", "text_ind_aug")


def _lsr(image_features, text_features, logit_scale, *, image_aug=None, text_aug=None, image_ind=None,
         text_ind=None, image_ind_aug=None, text_ind_aug=None, sep_weight, bridge_weight, gc_weight,
         bridge_t=0.25, uniformity_t=2.0, backend="auto", group=None, local_loss=True, gather_with_grad=True,
         mode="gather", world_size=None, rank=None, call="lsr") -> Dict[str, Tensor]:
    features = dict(zip(_FEATURE_NAMES, (image_features, text_features, image_aug, text_aug, image_ind,
                                         text_ind, image_ind_aug, text_ind_aug)))

    def validate():
        _check_mode(mode)
        if call == "lsr" and local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True with gather_with_grad=False: in that open_clip combination the gathered "
                "columns are constants and a feature gets only its own rows' gradient, which is not the "
                "gradient of the objective (and has no meaning for the uniformity and Gram terms). Use "
                "gather_with_grad=True (SPEC 5), or ClipLoss for open_clip's exact behaviour")
        weights, checked_t, scale = V.check_lsr_call(features, logit_scale, sep_weight, bridge_weight,
                                                     gc_weight, bridge_t, uniformity_t)
        return weights, checked_t, scale, backends.resolve_lsr_call(backend, features, weights)

    settings = {"sep_weight": _as_float(sep_weight), "bridge_weight": _as_float(bridge_weight),
                "gc_weight": _as_float(gc_weight), "bridge_t": _as_float(bridge_t),
                "uniformity_t": _as_float(uniformity_t), "local_loss": bool(local_loss),
                "gather_with_grad": bool(gather_with_grad), "distributed_mode": _as_str(mode),
                "backend": _as_str(backend)}
    world, rank_, validated = _start(call, {**features, "logit_scale": logit_scale}, settings,
                                     validate, group, world_size, rank)
    (sep_w, br_w, gc_w), (bridge_t, uniformity_t), scale, name = validated
    setup = _Setup(group, world, rank_, bool(local_loss), bool(gather_with_grad), mode == "ring", name)

    named = {k: (None if x is None else x.contiguous()) for k, x in features.items()}
    scale, named = _prepare_gradients(setup, scale, named)
    v, t = named["image_features"], named["text_features"]
    va, ta = named["image_aug"], named["text_aug"]
    views = va is not None and ta is not None
    n_global = world * v.shape[0]

    pairs = [("nce", "image_features", "text_features", 0.0), ("nce", "text_features", "image_features", 0.0)]
    if views:
        pairs += [("nce", "image_features", "image_aug", 0.0), ("nce", "text_features", "text_aug", 0.0)]
    if sep_w > 0:
        pairs += [("nce", "image_ind", "image_ind_aug", 0.0), ("nce", "text_ind", "text_ind_aug", 0.0),
                  ("gram", "image_ind", "image_ind", uniformity_t), ("gram", "text_ind", "text_ind", uniformity_t)]
    values = dict(zip(pairs, _row_terms(setup, pairs, named, scale)))
    cross = (values[pairs[0]] + values[pairs[1]]) / 2
    if views:
        shares = {"contrastive_loss": cross / 2 + (values[pairs[2]] + values[pairs[3]]) / 4}
    else:
        shares = {"contrastive_loss": cross}
    if sep_w > 0:
        # Row-wise terms: composite's means over the (local) rows are this rank's shares.
        ortho = composite.orthogonality(v, t, named["image_ind"], named["text_ind"])
        icon = values[("nce", "image_ind", "image_ind_aug", 0.0)] + values[("nce", "text_ind", "text_ind_aug", 0.0)]
        local_sum = values[("gram", "image_ind", "image_ind", uniformity_t)] + \
            values[("gram", "text_ind", "text_ind", uniformity_t)]
        uniformity = torch.log(all_reduce_sum(local_sum, setup.group) / n_global)
        shares["separation_loss"] = ortho + icon + uniformity
    if br_w > 0:
        shares["bridge_loss"] = composite.bridge(v, t, va, bridge_t)
    if gc_w > 0:
        shares["geometric_loss"] = _geometric_share(setup, v, t, va, ta, n_global)
    total = shares["contrastive_loss"]
    for key, weight in (("separation_loss", sep_w), ("bridge_loss", br_w), ("geometric_loss", gc_w)):
        if key in shares:
            total = total + weight * shares[key]
    return _finish(setup, {"loss": total, **shares})


def itc_loss(image_features: Tensor, text_features: Tensor, image_features_m: Tensor, text_features_m: Tensor,
             logit_scale, *, image_queue: Optional[Tensor] = None, text_queue: Optional[Tensor] = None,
             alpha: float = 0.4, backend: str = "auto", group=None, local_loss: bool = True,
             gather_with_grad: bool = True, world_size: Optional[int] = None,
             rank: Optional[int] = None) -> Tensor:
    """:func:`lsr_kernels.itc_loss` for this rank's rows: the bank is every rank's momentum features
    (gathered without gradient, ALBEF's ``concat_all_gather``) followed by the queue, which must be the
    same on every rank. ``local_loss``: as :func:`lsr_loss` (``gather_with_grad`` changes the feature
    gradients only with ``local_loss=False``: the bank carries no gradient)."""
    features = {"image_features": image_features, "text_features": text_features,
                "image_features_m": image_features_m, "text_features_m": text_features_m,
                "image_queue": image_queue, "text_queue": text_queue}

    def validate():
        checked_alpha = V.check_unit_interval("alpha", alpha)
        V.check_features(features, width_only=_QUEUE_NAMES, required=V.ITC_REQUIRED)
        scale = V.check_scale(logit_scale, image_features)
        return checked_alpha, scale, backends.resolve_itc_call(backend, features)

    settings = {"alpha": _as_float(alpha), "local_loss": bool(local_loss), "gather_with_grad": bool(gather_with_grad),
                "backend": _as_str(backend)}
    world, rank_, validated = _start("itc", {**features, "logit_scale": logit_scale}, settings,
                                     validate, group, world_size, rank)
    alpha, scale, name = validated
    setup = _Setup(group, world, rank_, bool(local_loss), bool(gather_with_grad), False, name)
    named = {k: (None if x is None else x.contiguous()) for k, x in features.items()}
    scale, named = _prepare_gradients(setup, scale, named)
    v, t = named["image_features"], named["text_features"]
    vm, tm = named["image_features_m"].detach(), named["text_features_m"].detach()
    n, d = v.shape
    momentum = _all_gather(torch.stack([vm, tm]), group).view(world, 2, n, d)
    # This rank's block first: the primitive's positives are the bank's first n rows.
    order = [(rank_ + k) % world for k in range(world)]
    bank_v, bank_t = (momentum[order, which].reshape(world * n, d) for which in (0, 1))
    if named["image_queue"] is not None:
        bank_v = torch.cat([bank_v, named["image_queue"].detach()], 0)
    if named["text_queue"] is not None:
        bank_t = torch.cat([bank_t, named["text_queue"].detach()], 0)
    soft_ce = reference.itc_soft_ce if name == "reference" else backends.primitives(name).itc_soft_ce
    share = (soft_ce(v, vm, bank_t, scale, alpha) + soft_ce(t, tm, bank_v, scale, alpha)) / 2
    return _finish(setup, {"itc_loss": share})["itc_loss"]


def gather_for_queue(rows: Tensor, group=None) -> Tensor:
    """Every rank's ``rows`` (momentum features to enqueue) in rank order, without gradient, after
    checking that every rank holds the same shape (so the queues stay identical)."""
    def validate():
        V.check_features({"rows": rows}, required=("rows",))
        return None

    _start("enqueue", {"rows": rows}, {}, validate, group, None, None)
    return _all_gather(rows.detach(), group)


def _as_float(value) -> float:
    return float(value) if V.is_real(value) else float("nan")


def _as_str(value) -> str:
    return value if isinstance(value, str) else "?"

