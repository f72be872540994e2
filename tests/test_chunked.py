"""The ``chunked`` backend: each primitive against the reference's, loss and every gradient.

What is specific to this backend: explicit block sizes (1, 3, 7, more than N) and column blocks for
the ITC bank, the O(N)-statistics backward (fp64 gradcheck), the partial-gradient paths, low precision
against PyTorch's own error, non-contiguous inputs, torch.compile, the block-size controls, and a
memory bound that an N x N buffer cannot meet (measured in a subprocess). The shared parity suite
(tests/test_parity.py) covers the public API.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lsr_kernels import reference as R
from lsr_kernels.backends import chunked as C
from helpers import rel_err, unit_rows

# N = 1, D = 1, N prime, D odd / not a power of two, N not a multiple of any tested block.
SHAPES = [(1, 3), (1, 1), (2, 1), (5, 7), (13, 6), (37, 17), (61, 32)]
BLOCKS = [None, 1, 3, 7, 100]  # None: automatic; 100 > every N above
# fp64 checks the mathematics (rounding-free up to ~1e-15); fp32 the fp32 implementation against the
# fp32 reference. Losses and gradients are O(1)..O(s) numbers, so the fp32 atol is a few ulps of them.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _scale(value, dtype):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def _loss_and_grads(fn, inputs):
    loss = fn()
    wanted = [x for x in inputs if x.requires_grad]
    return loss, torch.autograd.grad(loss, wanted)


def _assert_matches(fn, ref_fn, inputs, tol):
    loss, gs = _loss_and_grads(fn, inputs)
    ref_loss, ref_gs = _loss_and_grads(ref_fn, inputs)
    assert loss.dtype == ref_loss.dtype and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **tol, msg=lambda m: f"loss: {m}")
    for k, (g, h) in enumerate(zip(gs, ref_gs)):
        assert g.dtype == h.dtype and g.shape == h.shape
        torch.testing.assert_close(g, h, **tol, msg=lambda m, k=k: f"gradient {k}: {m}")


# ------------------------------------------------------------------------------------- info_nce
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_info_nce_matches_reference(n, d, symmetric, dtype):
    a, b = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    s = _scale(10.0, dtype)
    for block in BLOCKS:
        _assert_matches(lambda: C.info_nce(a, b, s, symmetric, block_size=block),
                        lambda: R.info_nce(a, b, s, symmetric), [a, b, s], TOL[dtype])


@pytest.mark.parametrize("wanted", ["a", "b", "scale", "a+scale", "b+scale"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_partial_gradients(wanted, symmetric):
    """Each subset of inputs that requires grad takes its own path (dL/ds from a feature gradient,
    or tile by tile when no feature gradient is computed)."""
    n, d = 23, 9
    a, b = unit_rows(n, d, requires_grad="a" in wanted), unit_rows(n, d, requires_grad="b" in wanted)
    s = torch.tensor(7.0, requires_grad="scale" in wanted)
    _assert_matches(lambda: C.info_nce(a, b, s, symmetric, block_size=5),
                    lambda: R.info_nce(a, b, s, symmetric), [a, b, s], TOL[torch.float32])


def test_info_nce_same_tensor_both_sides():
    # CE(s x x^T): both gradients land on one leaf and must add up.
    x, s = unit_rows(11, 5, torch.float64), _scale(4.0, torch.float64)
    _assert_matches(lambda: C.info_nce(x, x, s, True, block_size=3),
                    lambda: R.info_nce(x, x, s, True), [x, s], TOL[torch.float64])


def test_info_nce_large_scale_underflowing_tiles():
    # s = 100 on well-separated rows: most exp(X - lse) underflow; the floored exp must not show.
    n, d = 40, 16
    a = unit_rows(n, d, torch.float64)
    b = F.normalize(a.detach() + 0.05 * torch.randn(n, d, dtype=torch.float64), dim=-1).requires_grad_()
    s = _scale(100.0, torch.float64)
    for dtype in (torch.float64, torch.float32):
        ac, bc, sc = (x.detach().to(dtype).requires_grad_() for x in (a, b, s))
        _assert_matches(lambda: C.info_nce(ac, bc, sc, True, block_size=7),
                        lambda: R.info_nce(ac, bc, sc, True), [ac, bc, sc], TOL[dtype])


# --------------------------------------------------------------------------------- exp_gram_sum
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("t", [2.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exp_gram_sum_matches_reference(n, d, t, dtype):
    x = unit_rows(n, d, dtype)
    for block in BLOCKS:
        _assert_matches(lambda: C.exp_gram_sum(x, t, block_size=block),
                        lambda: R.exp_gram_sum(x, t), [x], TOL[dtype])


def test_exp_gram_sum_rows_of_any_norm():
    # The formula is exact for any rows (|x_j|^2 + |x_k|^2 - 2 <x_j, x_k>), not only unit ones.
    x = (torch.randn(19, 6, dtype=torch.float64) * torch.rand(19, 1, dtype=torch.float64) * 2).requires_grad_()
    for block in (1, 4, None):
        _assert_matches(lambda: C.exp_gram_sum(x, 1.5, block_size=block),
                        lambda: R.exp_gram_sum(x, 1.5), [x], TOL[torch.float64])


# ---------------------------------------------------------------------------------- itc_soft_ce


def _itc_tiles(n, m):
    """(rows, bank columns) per tile: automatic, many rows x few columns, few rows x the whole bank,
    and small tiles both ways (1 x 1 and 3 x 4 only where the N x M Python steps stay cheap)."""
    small = [(1, 1), (3, 4)] if n * m <= 400 else [(3, 4)] if n * m <= 2000 else [(16, 23)]
    return [(None, None), (100, 5), (7, 100)] + small


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("with_queue", [False, True])  # K = 0, or K = 2 N + 5: longer than the batch
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_itc_soft_ce_matches_reference(n, d, with_queue, alpha, dtype):
    k = 2 * n + 5 if with_queue else 0
    q = unit_rows(n, d, dtype)
    q_m = unit_rows(n, d, dtype, requires_grad=False)
    bank = unit_rows(n + k, d, dtype, requires_grad=False)
    s = _scale(8.0, dtype)
    # Every tiling in fp64 (the mathematics); fp32 checks the arithmetic on two of them.
    tiles = _itc_tiles(n, n + k) if dtype == torch.float64 else _itc_tiles(n, n + k)[::3]
    for rows, cols in tiles:
        _assert_matches(lambda: C.itc_soft_ce(q, q_m, bank, s, alpha, block_size=rows, col_block_size=cols),
                        lambda: R.itc_soft_ce(q, q_m, bank, s, alpha), [q, s], TOL[dtype])


def _aligned_pair(n, d, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return v, F.normalize(v + noise * torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("call", ["symmetric", "one-way", "itc-0", "itc-0.4", "itc-1"])
@pytest.mark.parametrize("block,col_block", [(None, None), (7, 20)])
def test_fp32_loss_is_accurate_to_its_own_size_not_the_scales(call, block, col_block):
    """A row's loss is lse_i - X_i,pos with both ~ s: formed as (max - X_pos) + log(sum), never as the
    difference of two numbers rounded at s, it is >= 0 (a well-aligned batch at s = 100 gave -3e-6)
    and as accurate as PyTorch's fp32 (the difference gave 8e-6 relative at a loss of 0.2)."""
    def loss(v, t, dtype, queue):
        v, t, queue = v.to(dtype), t.to(dtype), queue.to(dtype)
        s = torch.tensor(100.0, dtype=dtype, requires_grad=True)
        if call.startswith("itc"):
            bank = torch.cat([t, queue])
            return C.itc_soft_ce(v, t, bank, s, float(call[4:]), block_size=block, col_block_size=col_block)
        return C.info_nce(v, t, s, call == "symmetric", block_size=block)

    queue = F.normalize(torch.randn(50, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    for noise, bound in ((0.05, None), (0.3, 5e-7)):
        v, t = _aligned_pair(64, 32, noise)
        ours, exact = loss(v, t, torch.float32, queue).item(), loss(v, t, torch.float64, queue).item()
        if bound is None:  # a loss of ~1e-17
            assert 0.0 <= ours <= 1e-7, ours
        else:
            assert abs(ours - exact) <= bound * exact, (ours, exact)


@pytest.mark.parametrize("wanted", ["q", "scale"])
def test_itc_soft_ce_partial_gradients(wanted):
    n, d, k = 9, 5, 20
    q = unit_rows(n, d, torch.float64, requires_grad=wanted == "q")
    q_m = unit_rows(n, d, torch.float64, requires_grad=False)
    bank = unit_rows(n + k, d, torch.float64, requires_grad=False)
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=wanted == "scale")
    for cols in (None, 4):
        _assert_matches(lambda: C.itc_soft_ce(q, q_m, bank, s, 0.4, block_size=4, col_block_size=cols),
                        lambda: R.itc_soft_ce(q, q_m, bank, s, 0.4), [q, s], TOL[torch.float64])


def test_itc_soft_ce_no_gradient_to_targets_or_bank():
    n, d = 6, 4
    q, q_m, bank = unit_rows(n, d), unit_rows(n, d), unit_rows(n + 7, d)
    s = _scale(5.0, torch.float32)
    gq, gqm, gbank, gs = torch.autograd.grad(C.itc_soft_ce(q, q_m, bank, s, 0.4, col_block_size=3),
                                             [q, q_m, bank, s], allow_unused=True)
    assert gq is not None and gs is not None and gqm is None and gbank is None


# ------------------------------------------------------------------------------------ gradcheck
def _free_rows(n, d):
    # gradcheck perturbs entries freely, so rows are not unit: every formula must hold for any rows.
    return torch.randn(n, d, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_gradcheck(symmetric):
    a, b, s = _free_rows(5, 3), _free_rows(5, 3), _scale(2.5, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, s: C.info_nce(a, b, s, symmetric, block_size=2), (a, b, s))


def test_exp_gram_sum_gradcheck():
    x = _free_rows(6, 3)
    assert torch.autograd.gradcheck(lambda x: C.exp_gram_sum(x, 0.7, block_size=4), (x,))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("cols", [None, 3])
def test_itc_soft_ce_gradcheck(alpha, cols):
    """With alpha > 0 the soft targets depend on s too, but by contract they are constants (no
    gradient through them, as ALBEF computes them under no_grad), so finite differences in s see a
    dependence the gradient rightly leaves out: s is checked by finite differences only at alpha = 0
    (and against the reference's autograd at every alpha above)."""
    q, s = _free_rows(4, 3), _scale(1.5, torch.float64)
    q_m, bank = _free_rows(4, 3).detach(), _free_rows(9, 3).detach()
    if alpha == 0.0:
        fn, inputs = (lambda q, s: C.itc_soft_ce(q, q_m, bank, s, alpha, block_size=3, col_block_size=cols)), (q, s)
    else:
        fn, inputs = (lambda q: C.itc_soft_ce(q, q_m, bank, s, alpha, block_size=3, col_block_size=cols)), (q,)
    assert torch.autograd.gradcheck(fn, inputs)


def test_double_backward_is_refused_clearly():
    a, b, s = _free_rows(4, 3), _free_rows(4, 3), _scale(2.0, torch.float64)
    for loss in (C.info_nce(a, b, s, True), C.exp_gram_sum(a, 2.0), C.itc_soft_ce(a, b, b, s, 0.4)):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, [a], create_graph=True)


# ------------------------------------------------------------------------------- low precision
def _lp_rule(fn_chunked, fn_ref, lp_inputs, frozen=(), factor=2.0):
    """flash-attention's rule: against the fp64 reference on the same (rounded) inputs, the chunked
    error in the loss and in every gradient is at most ``factor`` x the reference's own error when it
    runs in the low-precision dtype (plus an fp32-level floor for results the reference computes in
    fp32 anyway, where both errors are ~1e-7)."""
    truth_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in lp_inputs]
    truth_frozen = [x.double() for x in frozen]
    truth, truth_g = _loss_and_grads(lambda: fn_ref(*truth_inputs, *truth_frozen), truth_inputs)
    ref, ref_g = _loss_and_grads(lambda: fn_ref(*lp_inputs, *frozen), lp_inputs)
    out, out_g = _loss_and_grads(lambda: fn_chunked(*lp_inputs, *frozen), lp_inputs)
    assert out.dtype == torch.float32
    for k, (x, r, t) in enumerate(zip([out, *out_g], [ref, *ref_g], [truth, *truth_g])):
        if k > 0:
            assert x.dtype == r.dtype
        err, ref_err = rel_err(x, t), rel_err(r, t)
        assert err <= factor * ref_err + 1e-6, f"output {k}: chunked error {err:.3g}, reference's {ref_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_low_precision(dtype, symmetric):
    a, b = unit_rows(61, 40, dtype), unit_rows(61, 40, dtype)
    s = torch.tensor(20.0, requires_grad=True)  # an fp32 scale, as a model's logit_scale is
    _lp_rule(lambda a, b, s: C.info_nce(a, b, s, symmetric, block_size=16),
             lambda a, b, s: R.info_nce(a, b, s, symmetric), [a, b, s])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exp_gram_sum_low_precision(dtype):
    x = unit_rows(61, 40, dtype)
    _lp_rule(lambda x: C.exp_gram_sum(x, 2.0, block_size=16), lambda x: R.exp_gram_sum(x, 2.0), [x])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [None, 50])
def test_itc_soft_ce_low_precision(dtype, cols):
    n, d, k = 61, 40, 130
    q = unit_rows(n, d, dtype)
    s = torch.tensor(12.0, requires_grad=True)
    q_m, bank = unit_rows(n, d, dtype, requires_grad=False), unit_rows(n + k, d, dtype, requires_grad=False)
    _lp_rule(lambda q, s, q_m, bank: C.itc_soft_ce(q, q_m, bank, s, 0.4, block_size=16, col_block_size=cols),
             lambda q, s, q_m, bank: R.itc_soft_ce(q, q_m, bank, s, 0.4), [q, s], frozen=(q_m, bank))


# ------------------------------------------------------------------------ layouts and controls
def _strided_leaves(n, d):
    """The same kind of unit rows as leaves with a transposed, a column-strided and a row-strided
    layout (``detach`` keeps the strides)."""
    def leaf(x):
        return x.detach().requires_grad_()
    transposed = unit_rows(n, d, torch.float64, requires_grad=False).T.contiguous().T
    wide = torch.zeros(n, 2 * d, dtype=torch.float64)
    wide[:, ::2] = unit_rows(n, d, torch.float64, requires_grad=False)
    tall = torch.zeros(2 * n, d, dtype=torch.float64)
    tall[::2] = unit_rows(n, d, torch.float64, requires_grad=False)
    return [leaf(transposed), leaf(wide[:, ::2]), leaf(tall[::2])]


def test_non_contiguous_inputs():
    n, d = 13, 5
    s = _scale(6.0, torch.float64)
    for a, b in zip(_strided_leaves(n, d), reversed(_strided_leaves(n, d))):
        assert not a.is_contiguous() and not b.is_contiguous()
        _assert_matches(lambda: C.info_nce(a, b, s, True, block_size=4),
                        lambda: R.info_nce(a.contiguous(), b.contiguous(), s, True), [a, b, s], TOL[torch.float64])
        _assert_matches(lambda: C.exp_gram_sum(a, 2.0, block_size=4),
                        lambda: R.exp_gram_sum(a.contiguous(), 2.0), [a], TOL[torch.float64])
        q_m = b.detach()
        bank = torch.cat([q_m, q_m.flip(0)]).T.contiguous().T  # a column-major bank
        _assert_matches(lambda: C.itc_soft_ce(a, q_m, bank, s, 0.4, block_size=4, col_block_size=7),
                        lambda: R.itc_soft_ce(a.contiguous(), q_m.contiguous(), bank.contiguous(), s, 0.4),
                        [a, s], TOL[torch.float64])


def test_block_size_controls(monkeypatch):
    a, b, s = unit_rows(20, 4), unit_rows(20, 4), _scale(5.0, torch.float32)
    monkeypatch.delenv(C.BLOCK_ENV, raising=False)
    assert C.info_nce(a, b, s, True).grad_fn.block == C.default_block_size(20, 4, a.device) == 20
    assert C.info_nce(a, b, s, True, block_size=6).grad_fn.block == 6
    monkeypatch.setenv(C.BLOCK_ENV, "3")
    assert C.info_nce(a, b, s, True).grad_fn.block == 3
    assert C.exp_gram_sum(a, 2.0).grad_fn.block == 3
    assert C.itc_soft_ce(a, b, b, s, 0.4).grad_fn.block == 3
    assert C.info_nce(a, b, s, True, block_size=5).grad_fn.block == 5  # the keyword wins
    for bad in ("0", "-2", "big"):
        monkeypatch.setenv(C.BLOCK_ENV, bad)
        with pytest.raises(ValueError, match=C.BLOCK_ENV):
            C.info_nce(a, b, s, True)
    monkeypatch.delenv(C.BLOCK_ENV)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            C.exp_gram_sum(a, 2.0, block_size=bad)
    with pytest.raises(ValueError, match="col_block_size"):
        C.itc_soft_ce(a, b, b, s, 0.4, col_block_size=0)


def test_default_block_size():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    for n in (1, 7, 32, 1000, 16384, 200_000):
        for d in (1, 64, 512, 4096):
            rows = C.default_block_size(n, d, cpu)
            assert 1 <= rows <= n and rows >= min(n, 32)
            # Within the CPU tile budget unless a floor (32 rows, d / 2 rows) decides.
            assert rows * n * 4 <= C._CPU_TILE_BYTES or rows <= max(32, d // 2)
            assert C.default_block_size(n, d, gpu) >= rows
    assert C.default_block_size(16384, 512, cpu) == 512  # the tuned CPU point: 32 MiB tiles
    with pytest.raises(ValueError):
        C.default_block_size(0, 4, cpu)


@pytest.mark.parametrize("call,match", [
    (lambda x: C.itc_soft_ce(x, x, x, torch.tensor(5.0), 1.5), r"alpha: expected a number in \[0, 1\], got 1.5"),
    (lambda x: C.exp_gram_sum(x, 0.0), r"t: expected a finite positive number, got 0.0"),
    (lambda x: C.exp_gram_sum(x, float("nan")), r"t: expected a finite positive number"),
])
def test_primitives_check_their_settings(call, match):
    # the primitives are public in lsr_kernels.backends.chunked: a setting out of range is no silent number
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 3))


def test_itc_wide_bank_is_split_into_column_blocks():
    # A bank of 2^20 rows: a single rows x M tile would not fit the CPU budget.
    n, d, m = 64, 8, 1 << 20
    q, bank = torch.zeros(n, d), torch.zeros(m, d)
    s = torch.tensor(1.0, requires_grad=True)
    loss = C.itc_soft_ce(q.requires_grad_(), q, bank, s, 0.0)
    node = loss.grad_fn
    assert node.block * node.col_block * 4 <= C._CPU_TILE_BYTES and node.col_block < m
    torch.testing.assert_close(loss, torch.tensor(float(torch.log(torch.tensor(float(m))))))


def test_output_dtypes_and_shapes():
    for dtype, loss_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                              (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        a, b = unit_rows(9, 4, dtype), unit_rows(9, 4, dtype)
        s = torch.tensor(3.0, requires_grad=True)  # an fp32 scale whatever the features' dtype
        for loss in (C.info_nce(a, b, s, True), C.exp_gram_sum(a, 2.0), C.itc_soft_ce(a, b, b, s, 0.4)):
            assert loss.dtype == loss_dtype and loss.shape == ()
        ga, gb, gs = torch.autograd.grad(C.info_nce(a, b, s, True), [a, b, s])
        assert ga.dtype == gb.dtype == dtype and gs.dtype == torch.float32 and gs.shape == ()


def test_under_torch_compile():
    """The primitives are excluded from tracing (a graph break): compiled code around them runs and
    gives eager's numbers and gradients."""
    torch._dynamo.reset()
    a, b, x = unit_rows(17, 6), unit_rows(17, 6), unit_rows(17, 6)
    q_m, bank = unit_rows(17, 6, requires_grad=False), unit_rows(30, 6, requires_grad=False)
    log_s = torch.tensor(2.0, requires_grad=True)

    def objective(a, b, x, log_s):
        s = log_s.exp()
        return (C.info_nce(a, b, s, True) + torch.log(C.exp_gram_sum(x, 2.0) / 17)
                + C.itc_soft_ce(a, q_m, bank, s, 0.4))

    compiled = torch.compile(objective, backend="aot_eager")
    inputs = [a, b, x, log_s]
    eager_loss, eager_grads = _loss_and_grads(lambda: objective(*inputs), inputs)
    loss, gs = _loss_and_grads(lambda: compiled(*inputs), inputs)
    torch.testing.assert_close(loss, eager_loss)
    for g, h in zip(gs, eager_grads):
        torch.testing.assert_close(g, h)


def test_fullgraph_compile_says_which_backend_traces():
    """fullgraph=True cannot hold a graph break: the error names the backends that trace."""
    torch._dynamo.reset()
    v = unit_rows(8, 4, requires_grad=False)
    compiled = torch.compile(lambda v: C.info_nce(v, v, torch.tensor(10.0), True), backend="aot_eager",
                             fullgraph=True)
    with pytest.raises(Exception, match=r"backend='reference' \(CPU\) or backend='triton'"):
        compiled(v)


# ------------------------------------------------------------------------------------- memory
_MEMORY_CHILD = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    import torch.nn.functional as F
    import lsr_kernels

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    def unit(n, d, grad=True):
        return F.normalize(torch.randn(n, d), dim=-1).requires_grad_(grad)

    def lsr(n, d):
        names = ("image_aug", "text_aug", "image_ind", "text_ind", "image_ind_aug", "text_ind_aug")
        v, t, views = unit(n, d), unit(n, d), {k: unit(n, d) for k in names}
        s = torch.tensor(14.3, requires_grad=True)
        return lambda: lsr_kernels.lsr_loss(v, t, s, **views, sep_weight=1.0, bridge_weight=1.0,
                                            gc_weight=0.25, backend="chunked")["loss"]

    def itc(n, d, k):
        v, t = unit(n, d), unit(n, d)
        vm, tm, qv, qt = unit(n, d, False), unit(n, d, False), unit(k, d, False), unit(k, d, False)
        s = torch.tensor(1 / 0.07, requires_grad=True)
        return lambda: lsr_kernels.itc_loss(v, t, vm, tm, s, image_queue=qv, text_queue=qt,
                                            backend="chunked")

    torch.manual_seed(0)
    kind, sizes = sys.argv[1], [int(x) for x in sys.argv[2:]]
    make = {"lsr": lsr, "itc": itc}[kind]
    make(*[min(x, 300) for x in sizes])().backward()  # warm-up: libraries, thread pools, BLAS buffers
    objective = make(*sizes)  # inputs allocated before the baseline
    try:  # hand freed heap pages back, so that reusing them cannot hide an allocation
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    # Reset the high-water mark: a transient at import (a fresh venv compiling .pyc files, say) or in
    # the warm-up must not count as this call's memory.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    objective().backward()
    peak = status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024}))
""")


def _peak_extra_bytes(*args):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("measures RSS through /proc (Linux)")
    env = {**os.environ, C.BLOCK_ENV: ""}  # the automatic tiles, which the bounds assume
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def _tiles_bytes(n_rows, n_cols, d):
    # The live tiles of a call: at most 3 fp32 tiles of (automatic rows) x (columns).
    return 3 * 4 * min(C.default_block_size(n_cols, d, torch.device("cpu")), n_rows) * n_cols


@pytest.mark.slow
def test_memory_full_objective_has_no_n_by_n_buffer():
    """SPEC 2.5 with every term on, forward + backward at N = 16384, D = 32 (about two minutes on 2
    cores). Bound: 30 N D fp32 (the eight inputs' gradients, accumulators, O(N D) temporaries) + the
    live tiles + 16 MiB; one N x N fp32 matrix alone is 1 GiB."""
    n, d = 16384, 32
    extra = _peak_extra_bytes("lsr", n, d)
    bound = 30 * n * d * 4 + _tiles_bytes(n, n, d) + (16 << 20)
    assert extra < bound < n * n * 4, f"peak RSS grew by {extra / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)"


@pytest.mark.slow
def test_memory_itc_with_long_queue_has_no_n_by_m_buffer():
    """ALBEF's ITC with a 65,536 queue, N = 1024, D = 32. Bound: 8 (N + K) D fp32 (the two banks
    the composite concatenates and room for their copies: 68 MiB) + the live tiles + 16 MiB; one
    N x (N + K) fp32 matrix is 260 MiB."""
    n, d, k = 1024, 32, 65536
    extra = _peak_extra_bytes("itc", n, d, k)
    bound = 8 * (n + k) * d * 4 + _tiles_bytes(n, n + k, d) + (16 << 20)
    assert extra < bound < n * (n + k) * 4, f"peak RSS grew by {extra / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)"


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference_without_host_sync(cuda_device, dtype):
    n, d, k = 1000, 96, 3000
    a, b = unit_rows(n, d, dtype, cuda_device), unit_rows(n, d, dtype, cuda_device)
    q_m, bank = unit_rows(n, d, dtype, cuda_device, False), unit_rows(n + k, d, dtype, cuda_device, False)
    s = torch.tensor(14.3, device=cuda_device, requires_grad=True)
    cases = [(lambda: C.info_nce(a, b, s, True, block_size=384), lambda: R.info_nce(a, b, s, True), [a, b, s]),
             (lambda: C.exp_gram_sum(a, 2.0, block_size=384), lambda: R.exp_gram_sum(a, 2.0), [a]),
             (lambda: C.itc_soft_ce(a, q_m, bank, s, 0.4, block_size=384, col_block_size=1024),
              lambda: R.itc_soft_ce(a, q_m, bank, s, 0.4), [a, s])]
    for fn, ref_fn, inputs in cases:
        loss = fn()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the backward raises
        try:
            gs = torch.autograd.grad(loss, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref_loss, ref_gs = _loss_and_grads(ref_fn, inputs)
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # TF32-free fp32; bf16 products
        for x, r in zip([loss, *gs], [ref_loss, *ref_gs]):
            assert rel_err(x, r) < tol


@pytest.mark.gpu
def test_cuda_peak_memory_is_linear(cuda_device):
    n, d = 16384, 256
    a, b = unit_rows(n, d, torch.float32, cuda_device), unit_rows(n, d, torch.float32, cuda_device)
    s = torch.tensor(14.3, device=cuda_device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    C.info_nce(a, b, s, True, block_size=1024).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # gradients + accumulators (~4 N D fp32) + 2-3 tiles of 1024 x N fp32; N x N alone is 1 GiB
    assert extra < 8 * n * d * 4 + 3 * 1024 * n * 4 + (8 << 20) < n * n * 4


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (True, True, False)],
                         ids=["all", "a", "b+s", "a+b"])
@pytest.mark.parametrize("n, m, offset, block", [(7, 7, 0, 3), (5, 13, 8, 2), (1, 4, 3, 1)])
def test_one_way_gradients_formed_in_the_forward_equal_the_two_pass_ones(needs, n, m, offset, block):
    """fp32/fp64 one-way info_nce takes the one-pass path (_InfoNCEEager) when a feature gradient is
    coming; it must give the two-pass path's loss and gradients, for any subset of inputs."""
    a = unit_rows(n, 6, dtype=torch.float64, requires_grad=needs[0])
    b = unit_rows(m, 6, dtype=torch.float64, requires_grad=needs[1])
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=needs[2])
    inputs = [x for x in (a, b, s) if x.requires_grad]
    eager = C._InfoNCEEager.apply(a, b, s, offset, block) * 0.3
    lazy = C._InfoNCE.apply(a, b, s, False, offset, block) * 0.3
    assert rel_err(eager, lazy) < 1e-14
    for g, h in zip(torch.autograd.grad(eager, inputs), torch.autograd.grad(lazy, inputs)):
        assert rel_err(g, h) < 1e-12
    with torch.no_grad():  # no gradient to come: the lazy path, same value
        assert rel_err(C.info_nce(a, b, s, False, offset, block_size=block), lazy / 0.3) < 1e-14
