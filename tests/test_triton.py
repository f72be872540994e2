"""The Triton backend's own tests (the shared parity suite is tests/test_parity.py).

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest), on tiny
shapes: each primitive against the reference (loss and every gradient, the scale's included) on
awkward shapes, float64 gradchecks of every hand-written backward, fp16 against PyTorch's own fp16
error, every GPU autotune config's tiling in fp16, non-contiguous inputs, the split/group paths,
error messages, torch.compile tracing.
GPU (marker ``gpu``): bf16/fp16 at real sizes, N = 8192, D = 1024, every autotune config, a compiled
training step, and peak memory growing linearly in N.

Low precision follows flash-attention's rule: with ``exact`` the float64 reference evaluated on the
very same (rounded) inputs, ``err(ours, exact) <= FACTOR * err(pytorch_in_that_dtype, exact) + FLOOR``;
the floor is fp32 round-off, for terms PyTorch itself computes in fp32.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import aligned_itc_errors, aligned_itc_inputs, grads, rel_err, unit_rows
from lsr_kernels import backends, reference as R

_UNUSABLE = backends.triton_unusable_reason()  # Triton absent, or older than the kernels need
if _UNUSABLE is not None:
    pytest.skip(_UNUSABLE, allow_module_level=True)
import triton  # noqa: E402
from lsr_kernels.backends import triton as T  # noqa: E402
from lsr_kernels.backends.triton import _common, exp_gram, softmax_ce  # noqa: E402

LOW_PRECISION_FACTOR = 2.0
FP32_FLOOR = 1e-6
FP32_LOSS_TOL = 2e-6
FP32_GRAD_TOL = 2e-5


@pytest.fixture
def cpu():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest unless LSR_TEST_GPU=1)")
    return torch.device("cpu")


def _scale(value=10.0, dtype=torch.float32, device="cpu", requires_grad=True):
    return torch.tensor(value, dtype=dtype, device=device, requires_grad=requires_grad)


def _leaves(*tensors, dtype=None):
    """Detached copies that require grad (in ``dtype`` if given)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _compare(ours_fn, ref_fn, inputs, wrt, loss_tol=FP32_LOSS_TOL, grad_tol=FP32_GRAD_TOL):
    """Loss and the gradients of ``inputs[i] for i in wrt`` of ours vs the reference."""
    ours_in, ref_in = _leaves(*inputs), _leaves(*inputs)
    ours, ref = ours_fn(*ours_in), ref_fn(*ref_in)
    assert ours.dim() == 0 and ours.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    assert rel_err(ours, ref) <= loss_tol, (ours.item(), ref.item())
    for i, g, h in zip(wrt, grads(ours, [ours_in[i] for i in wrt]), grads(ref, [ref_in[i] for i in wrt])):
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert rel_err(g, h) <= grad_tol, f"gradient of input {i}: {rel_err(g, h)}"


def _low_precision_check(ours_fn, ref_fn, inputs, wrt, dtype):
    """flash-attention's rule; ``inputs`` are rounded to ``dtype`` first and ``exact`` sees the rounded
    values, so the comparison measures arithmetic, not input quantisation."""
    rounded = [t.detach().to(dtype) if t.dim() == 2 else t.detach() for t in inputs]
    exact_in = _leaves(*[t.double() for t in rounded])
    ours_in, torch_in = _leaves(*rounded), _leaves(*rounded)
    exact, ours, pt = ref_fn(*exact_in), ours_fn(*ours_in), ref_fn(*torch_in)
    assert ours.dtype == torch.float32
    assert rel_err(ours, exact) <= LOW_PRECISION_FACTOR * rel_err(pt, exact) + FP32_FLOOR
    pick = lambda xs: [xs[i] for i in wrt]  # noqa: E731
    for i, go, gt, ge in zip(wrt, grads(ours, pick(ours_in)), grads(pt, pick(torch_in)), grads(exact, pick(exact_in))):
        assert go.dtype == rounded[i].dtype, i
        bound = LOW_PRECISION_FACTOR * rel_err(gt, ge) + FP32_FLOOR
        assert rel_err(go, ge) <= bound, f"gradient of input {i}: ours {rel_err(go, ge):.3g}, bound {bound:.3g}"


# =============================================================================== CPU / interpreter
# ------------------------------------------------------------------------------------- info_nce
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("n,d", [(1, 1), (17, 33), (40, 16), (6, 1)])
def test_info_nce_matches_reference(cpu, n, d, symmetric):
    a, b = unit_rows(n, d), unit_rows(n, d)
    _compare(lambda a, b, s: T.info_nce(a, b, s, symmetric), lambda a, b, s: R.info_nce(a, b, s, symmetric),
             [a, b, _scale(14.3)], wrt=[0, 1, 2])


def test_info_nce_symmetric_is_symmetric_in_its_inputs(cpu):
    a, b, s = *_leaves(unit_rows(17, 20), unit_rows(17, 20)), _scale()
    ab, ba = T.info_nce(a, b, s, True), T.info_nce(b, a, s, True)
    assert rel_err(ab, ba) < 1e-6
    g_ab, g_ba = grads(ab, [a, b, s]), grads(ba, [a, b, s])
    for g, h in zip(g_ab, g_ba):
        assert rel_err(g, h) < 1e-5


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["a-only", "b-and-scale", "scale-only"])
def test_info_nce_partial_requires_grad(cpu, needs):
    """Only the launches a gradient needs run; the others come back as None."""
    a, b, s = unit_rows(17, 9, requires_grad=needs[0]), unit_rows(17, 9, requires_grad=needs[1]), \
        _scale(requires_grad=needs[2])
    wanted = [t for t, need in zip((a, b, s), needs) if need]
    ours = torch.autograd.grad(T.info_nce(a, b, s, True), wanted)
    ref = torch.autograd.grad(R.info_nce(a, b, s, True), wanted)
    for g, h in zip(ours, ref):
        assert rel_err(g, h) <= FP32_GRAD_TOL


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (True, False, True),
                                   (False, True, True), (False, False, True)],
                         ids=["all", "a-only", "a-and-scale", "b-and-scale", "scale-only"])
def test_one_way_info_nce_paths(cpu, monkeypatch, needs):
    """One-way with a's gradient to come: one pass forms the loss, da and ds (FlashAttention's
    forward with V = b) and only db is left for the backward; otherwise the statistics-only forward.
    Either way every requested gradient matches the reference (rectangular b, offset, column splits)."""
    calls = []
    for name in ("info_nce_forward_with_grad", "info_nce_forward", "softmax_ce_backward"):
        real = getattr(softmax_ce, name)
        monkeypatch.setattr(softmax_ce, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    n, m, d, offset = 11, 75, 20, 40  # 75 columns: several column splits in the interpreter
    a, b = unit_rows(n, d, requires_grad=needs[0]), unit_rows(m, d, requires_grad=needs[1])
    s = _scale(9.0, requires_grad=needs[2])
    wanted = [t for t, need in zip((a, b, s), needs) if need]
    ours = T.info_nce(a, b, s, False, offset)
    got = torch.autograd.grad(ours * 1.5, wanted)
    ref = R.info_nce(a, b, s, False, offset)
    assert rel_err(ours, ref) <= FP32_LOSS_TOL
    for g, h in zip(got, torch.autograd.grad(ref * 1.5, wanted)):
        assert rel_err(g, h) <= FP32_GRAD_TOL
    if needs[0]:
        assert calls == ["info_nce_forward_with_grad"] + (["softmax_ce_backward"] if needs[1] else [])
    else:
        assert calls[0] == "info_nce_forward" and "info_nce_forward_with_grad" not in calls


def test_one_way_info_nce_without_grad_mode_takes_the_statistics_pass(cpu, monkeypatch):
    calls = []
    real = softmax_ce.info_nce_forward_with_grad
    monkeypatch.setattr(softmax_ce, "info_nce_forward_with_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = unit_rows(9, 8, requires_grad=True), unit_rows(9, 8)
    with torch.no_grad():
        loss = T.info_nce(a, b, _scale(), False)
    assert not calls and rel_err(loss, R.info_nce(a.detach(), b, _scale(), False)) <= FP32_LOSS_TOL


@pytest.mark.parametrize("d", [48, 70], ids=["D=48", "D=70-three-slices"])
def test_one_way_forward_with_grad_over_d_slices(cpu, d):
    """D wider than BLOCK_DO (32 in the interpreter): each slice recomputes the tiles, one reports."""
    a, b = unit_rows(21, d), unit_rows(21, d)
    _compare(lambda a, b, s: T.info_nce(a, b, s, False), lambda a, b, s: R.info_nce(a, b, s, False),
             [a, b, _scale(12.0)], wrt=[0, 1, 2])


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
def test_positive_alone_gives_exact_zeros(cpu, symmetric):
    """A row whose positive is the only term (other logits underflow): loss, gradients and ds exactly 0."""
    a = torch.eye(4, 16)
    b = torch.eye(4, 16)
    a, b, s = *_leaves(a, b), _scale(1000.0)
    loss = T.info_nce(a, b, s, symmetric)
    da, db, ds = torch.autograd.grad(loss, [a, b, s])
    assert loss.item() == 0.0 and ds.item() == 0.0
    assert torch.count_nonzero(da) == 0 and torch.count_nonzero(db) == 0


def test_one_way_gradient_is_rounded_once(cpu):
    """fp16: the forward keeps ``P b - b_pos`` in fp32 (rounding it there and again after the
    backward's scaling would double the error), and ``da`` is that times ``g s / N``, rounded once."""
    a, b = (unit_rows(24, 16).half() for _ in range(2))
    s = _scale(10.0)
    _, _, h_b, _ = softmax_ce.info_nce_forward_with_grad(a, b, s)
    assert h_b.dtype == torch.float32
    a = a.requires_grad_()
    da, = torch.autograd.grad(T.info_nce(a, b, s, False), [a], grad_outputs=torch.tensor(3.0))
    assert torch.equal(da, (h_b * (3.0 * 10.0 / 24)).half())


def test_info_nce_large_scale_is_stable(cpu):
    """s = 1000 (ALBEF's temperature floor): logits span +-1443 in base 2, far beyond exp's range."""
    a, b = unit_rows(17, 8), unit_rows(17, 8)
    _compare(lambda a, b, s: T.info_nce(a, b, s, True), lambda a, b, s: R.info_nce(a, b, s, True),
             [a, b, _scale(1000.0)], wrt=[0, 1, 2], loss_tol=1e-5, grad_tol=1e-4)


# ------------------------------------------------------------------------------------ itc_soft_ce
@pytest.mark.parametrize("n,k,d,alpha", [(1, 0, 4, 0.4), (17, 40, 33, 0.4), (5, 0, 1, 0.0), (16, 3, 20, 1.0)],
                         ids=["N=1", "queue-longer-than-batch", "D=1-alpha=0", "alpha=1"])
def test_itc_matches_reference(cpu, n, k, d, alpha):
    q, q_m, bank = unit_rows(n, d), unit_rows(n, d), unit_rows(n + k, d)
    _compare(lambda q, q_m, bank, s: T.itc_soft_ce(q, q_m, bank, s, alpha),
             lambda q, q_m, bank, s: R.itc_soft_ce(q, q_m, bank, s, alpha),
             [q, q_m, bank, _scale(1 / 0.07)], wrt=[0, 3])


@pytest.mark.parametrize("seed", range(4))
def test_itc_loss_of_a_well_aligned_batch(cpu, seed):
    """A loss near 1e-4 at s = 20: the soft term sum_j Pm_ij t_ij - t_ii must be formed as a gap from
    the row's max, not as a sum of t (about 29 each) minus t_ii, which cancelled to 10-40x PyTorch's
    own fp32 error."""
    ours, pytorch = aligned_itc_errors(T.itc_soft_ce, *aligned_itc_inputs(24, 9, 32, seed))
    assert ours <= 3 * pytorch + 1e-6


def test_itc_gives_no_gradient_to_targets(cpu):
    q, q_m, bank, s = *_leaves(unit_rows(9, 8), unit_rows(9, 8), unit_rows(20, 8)), _scale()
    g_qm, g_bank = torch.autograd.grad(T.itc_soft_ce(q, q_m, bank, s, 0.4), [q_m, bank], allow_unused=True)
    assert g_qm is None and g_bank is None


# ---------------------------------------------------------------------------------- exp_gram_sum
@pytest.mark.parametrize("n,d,t", [(1, 1, 2.0), (17, 33, 2.0), (40, 5, 0.5), (16, 16, 2.0)])
def test_exp_gram_sum_matches_reference(cpu, n, d, t):
    _compare(lambda x: T.exp_gram_sum(x, t), lambda x: R.exp_gram_sum(x, t), [unit_rows(n, d)], wrt=[0])


def test_exp_gram_sum_non_unit_rows(cpu):
    """The primitive is exact for any rows, not only unit ones."""
    x = torch.randn(17, 6) * 0.5
    _compare(lambda x: T.exp_gram_sum(x, 1.0), lambda x: R.exp_gram_sum(x, 1.0), [x], wrt=[0])


# ------------------------------------------------------------------------------- float64 gradcheck
# Tiny shapes: gradcheck evaluates the forward twice per input element.
def test_gradcheck_info_nce(cpu):
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    s = _scale(3.0, torch.float64)
    for symmetric in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, s: T.info_nce(a, b, s, symmetric), _leaves(a, b) + [s])


def test_gradcheck_itc(cpu):
    q, q_m, bank = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    bank = torch.cat([bank, torch.randn(3, 3, dtype=torch.float64)])
    # the soft targets depend on s but are constants by contract (ALBEF's no_grad): with alpha > 0
    # gradcheck differentiates q only; with alpha = 0 there are no targets and s is checked too
    assert torch.autograd.gradcheck(lambda q: T.itc_soft_ce(q, q_m, bank, _scale(2.0, torch.float64, requires_grad=False), 0.4),
                                    _leaves(q))
    assert torch.autograd.gradcheck(lambda q, s: T.itc_soft_ce(q, q_m, bank, s, 0.0),
                                    _leaves(q) + [_scale(2.0, torch.float64)])


def test_gradcheck_exp_gram_sum(cpu):
    assert torch.autograd.gradcheck(lambda x: T.exp_gram_sum(x, 0.7), _leaves(torch.randn(6, 3, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------- fp16
def test_fp16_no_worse_than_pytorch(cpu):
    n, d = 17, 33
    a, b, q_m, bank = unit_rows(n, d), unit_rows(n, d), unit_rows(n, d), unit_rows(n + 20, d)
    s = _scale(20.0)
    for symmetric in (True, False):
        _low_precision_check(lambda a, b, s: T.info_nce(a, b, s, symmetric),
                             lambda a, b, s: R.info_nce(a, b, s, symmetric), [a, b, s], [0, 1, 2], torch.float16)
    _low_precision_check(lambda q, q_m, bank, s: T.itc_soft_ce(q, q_m, bank, s, 0.4),
                         lambda q, q_m, bank, s: R.itc_soft_ce(q, q_m, bank, s, 0.4), [a, q_m, bank, s], [0, 3],
                         torch.float16)
    _low_precision_check(lambda x: T.exp_gram_sum(x, 2.0), lambda x: R.exp_gram_sum(x, 2.0), [a], [0], torch.float16)


def _spread_statistics(kind, n=None, d=16, device="cpu"):
    """fp16-representable rows (float32) whose statistics spread far past ``FACTORED_EXP_SPREAD`` at
    s = 30 (base 2), in the rows or in the columns only: one side's rows nearly parallel with norm 3
    (narrow statistics), the other's of norm 3 and 0.01 in turn, half of them ~390 below the tile's top;
    ``both``: nearly parallel rows with norms from 0.05 to 4 on both sides (a's rising, b's falling).
    "Nearly parallel" (cosine ~0.93 to a common direction) at any ``d``: the noise shrinks as ``d``
    grows, since random rows of D = 512 are nearly orthogonal and their logits too small to spread
    (``both`` at n = 1000, D = 512 then spreads past the limit in a few tiles, not in none)."""
    gen = torch.Generator().manual_seed(7)
    n = n or (40 if kind == "both" else 32)
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64, generator=gen), dim=0)
    noise = 0.1 * (16 / d) ** 0.5
    near = lambda: torch.nn.functional.normalize(  # noqa: E731
        u + noise * torch.randn(n, d, dtype=torch.float64, generator=gen), dim=-1)
    if kind == "both":
        norms = torch.logspace(-1.3, 0.6, n, dtype=torch.float64)[:, None]
        a, b = near() * norms, near() * norms.flip(0)
    else:
        narrow = 3 * near()
        wide = near() * torch.tensor([3.0, 0.01], dtype=torch.float64).repeat(n)[:n, None]
        a, b = (wide, narrow) if kind == "rows" else (narrow, wide)
    return a.half().float().to(device), b.half().float().to(device)


SPREADS = ["rows", "columns", "both"]


@pytest.mark.parametrize("kind", SPREADS)
def test_symmetric_fp16_shares_one_exponential_per_logit(cpu, monkeypatch, kind):
    """fp16/bf16 take both softmax terms of a logit from one exponential times row and column factors,
    falling back to two exponentials for a tile whose statistics spread too far (rows or columns).
    With the fallback these inputs meet the fp16 bound; without it (an infinite allowed spread) the
    forward gives NaN, which shows that it factors; fp32 never factors."""
    a, b = _spread_statistics(kind)

    def check(dtype):
        _low_precision_check(lambda a, b, s: T.info_nce(a, b, s, True), lambda a, b, s: R.info_nce(a, b, s, True),
                             [a, b, _scale(30.0)], [0, 1, 2], dtype)

    check(torch.float16)
    monkeypatch.setattr(softmax_ce, "FACTORED_EXP_SPREAD", float("inf"))
    assert not torch.isfinite(T.info_nce(a.half(), b.half(), _scale(30.0), True))
    _compare(lambda a, b, s: T.info_nce(a, b, s, True), lambda a, b, s: R.info_nce(a, b, s, True),
             [a, b, _scale(30.0)], wrt=[0, 1, 2], loss_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("kind", SPREADS)
def test_symmetric_fp16_backward_shares_one_exponential(cpu, monkeypatch, kind):
    """The backward on its own, from exact (float64) statistics: it agrees with the two-exponential
    form (never factored: a spread of -inf allowed) and turns NaN without the fallback (+inf), so it
    does factor, and its fallback looks at both the rows' and the columns' statistics."""
    a, b = (x.half() for x in _spread_statistics(kind))
    s = torch.tensor(30.0)
    x = 30.0 * (a.double() @ b.double().T)
    lse2 = (torch.stack([torch.logsumexp(x, 1), torch.logsumexp(x, 0)]) / _common.LN2).float()

    def backward(spread):
        monkeypatch.setattr(softmax_ce, "FACTORED_EXP_SPREAD", spread)
        return softmax_ce.info_nce_backward(torch.tensor(1.0), a, b, s, lse2, True, True, True, True)

    factored, direct = backward(softmax_ce.FACTORED_EXP_SPREAD), backward(float("-inf"))
    for got, want in zip(factored, direct):
        assert rel_err(got, want) < 2e-3
    assert not all(torch.isfinite(g).all() for g in backward(float("inf")))


def test_symmetric_fp16_lone_pair_is_exactly_zero(cpu):
    """N = 1: every factor is 2^0, so the factored exponentials keep the loss and gradients exactly 0."""
    a, b, s = *_leaves(unit_rows(1, 24).half(), unit_rows(1, 24).half()), _scale(30.0)
    loss = T.info_nce(a, b, s, True)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(loss, [a, b, s]))


# ------------------------------------------------------------------------------- layouts and plans
def test_non_contiguous_inputs(cpu):
    a_wide, b_t = unit_rows(17, 66, requires_grad=False), unit_rows(33, 17, requires_grad=False)
    a, b = a_wide[:, ::2], b_t.T  # strides (66, 2) and (1, 17)
    assert not a.is_contiguous() and not b.is_contiguous()
    s = _scale()
    for fn in (lambda a, b: T.info_nce(a, b, s, True), lambda a, b: T.itc_soft_ce(a, a, b, s, 0.4),
               lambda a, b: T.exp_gram_sum(b, 2.0)):
        strided, packed = _leaves(a, b), _leaves(a.contiguous(), b.contiguous())
        ours, ref = fn(*strided), fn(*packed)
        assert rel_err(ours, ref) < 1e-6
        for g, h in zip(grads(ours, strided), grads(ref, packed)):
            assert rel_err(g, h) < 1e-5


def test_split_and_group_paths_agree(cpu, monkeypatch):
    """Several (row group x column split) programs and column-split backwards (fp32 partials summed)
    give the same numbers as one program per row block."""
    plan = _common.plan_forward(40, 40, torch.device("cpu"), with_col_stats=True)
    assert plan["groups"] > 1 and plan["splits"] > 1
    assert _common.plan_backward(40, 40, 20, torch.device("cpu"))["splits"] > 1
    a, b, q_m, bank = unit_rows(40, 20), unit_rows(40, 20), unit_rows(40, 20), unit_rows(70, 20)
    s = _scale()

    def run():
        ins = _leaves(a, b, bank) + [s.detach().clone().requires_grad_()]
        loss = T.info_nce(ins[0], ins[1], ins[3], True) + T.itc_soft_ce(ins[0], q_m, ins[2], ins[3], 0.4) \
            + T.exp_gram_sum(ins[1], 2.0)
        return [loss, *grads(loss, [ins[0], ins[1], ins[3]])]

    many = run()
    monkeypatch.setattr(_common, "INTERPRETER_TARGET_PROGRAMS", 1)
    assert _common.plan_forward(40, 40, torch.device("cpu"), with_col_stats=True)["splits"] == 1
    one = run()
    for x, y in zip(many, one):
        assert rel_err(x, y) < 1e-6


def test_no_quadratic_buffers(cpu, monkeypatch):
    """Every buffer the launchers allocate is O((N + M) D) (with D = 8 << N here, an N x N or N x M
    buffer would show up as the largest)."""
    sizes = []

    def recording(factory):
        def wrapped(*args, **kwargs):
            out = factory(*args, **kwargs)
            sizes.append(out.numel())
            return out
        return wrapped

    monkeypatch.setattr(torch, "empty", recording(torch.empty))
    monkeypatch.setattr(torch, "zeros", recording(torch.zeros))
    n, m, d = 40, 70, 8
    a, b, s = *_leaves(unit_rows(n, d), unit_rows(n, d)), _scale()
    loss = T.info_nce(a, b, s, True) + T.itc_soft_ce(a, b.detach(), unit_rows(m, d, requires_grad=False), s, 0.4) \
        + T.exp_gram_sum(b, 2.0)
    loss.backward()
    assert sizes and max(sizes) <= (n + m) * d < n * n


def test_autotune_pruning_clamps_and_drops():
    cfgs = softmax_ce.BACKWARD_CONFIGS
    narrow = _common.prune_configs(cfgs, {}, D_PADDED=16, DOT_PRECISION="tf32")
    assert narrow and all(c.kwargs["BLOCK_K"] == 16 and c.kwargs["BLOCK_DO"] == 16 for c in narrow)
    wide = _common.prune_configs(cfgs, {}, D_PADDED=1024, DOT_PRECISION="tf32")
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_DO"] <= _common.MAX_ACC_ELEMENTS for c in wide)
    fma = _common.prune_configs(cfgs + softmax_ce.FORWARD_CONFIGS, {}, D_PADDED=1024, DOT_PRECISION="ieee")
    assert fma and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _common.MAX_FMA_TILE for c in fma)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_DO", 0) <= _common.MAX_ACC_ELEMENTS_FMA for c in fma)
    assert len(_common.prune_configs(cfgs[:1], {}, D_PADDED=1024, DOT_PRECISION="ieee")) == 1  # never empty
    assert len(_common.prune_configs(softmax_ce.FORWARD_CONFIGS, {}, D_PADDED=1024)) == len(softmax_ce.FORWARD_CONFIGS)
    # ITC's forward holds two similarity tiles: half the area (the sm_90 build table: larger ones spill)
    soft = _common.prune_configs(softmax_ce.FORWARD_CONFIGS, {"HAS_SOFT": True}, D_PADDED=512, DOT_PRECISION="tf32")
    assert soft and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in soft)
    soft_fma = _common.prune_configs(softmax_ce.FORWARD_CONFIGS, {"HAS_SOFT": True}, D_PADDED=512,
                                     DOT_PRECISION="ieee")
    assert [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in soft_fma] == [64 * 64]
    # fp64 (gradcheck) keeps only the smallest config
    for cfgs in (softmax_ce.FORWARD_CONFIGS, softmax_ce.BACKWARD_CONFIGS):
        assert len(_common.prune_configs(cfgs, {"ACC_DTYPE": _common.tl.float64}, D_PADDED=512,
                                         DOT_PRECISION="ieee")) == 1


def test_autotune_keys_are_kernel_arguments_and_bucket_n(cpu, monkeypatch):
    """Triton's autotuner silently drops a key that is not a kernel argument; N and M enter the key in
    power-of-two buckets capped at 65536, so a doubling search or a short last batch does not re-time
    every config at each new N."""
    from lsr_kernels.backends.triton import _TUNED
    for tuned in _TUNED:
        assert set(tuned.keys) <= set(tuned.arg_names), (tuned.base_fn.__name__, tuned.keys)
        assert "N_BUCKET" in tuned.keys and "N" not in tuned.keys and "M" not in tuned.keys
    assert [_common.tune_bucket(n) for n in (1, 2, 17, 4096, 4097, 65536, 65537, 1 << 22)] == [
        1, 2, 32, 4096, 8192, 65536, 65536, 65536]
    seen = []
    real_launch = _common.launch

    def recording(kernel, tuned, grid, args, config):
        if tuned is not None:  # (the row-norm helper is not tuned)
            seen.append((tuned.base_fn.__name__, args["N"], args["N_BUCKET"], args.get("M"), args.get("M_BUCKET")))
        return real_launch(kernel, tuned, grid, args, config)

    for module in (softmax_ce, exp_gram):
        monkeypatch.setattr(module, "launch", recording)
    a, bank = unit_rows(20, 8), unit_rows(37, 8)
    T.info_nce(a, a, _scale(), True).backward()
    T.itc_soft_ce(a, a.detach(), bank, _scale(), 0.4).backward()
    T.exp_gram_sum(a, 2.0).backward()
    assert {name for name, *_ in seen} >= {"_softmax_ce_fwd_kernel", "_softmax_ce_bwd_kernel", "_exp_gram_fwd_kernel",
                                           "_exp_gram_bwd_kernel"}
    for name, n, n_bucket, m, m_bucket in seen:
        assert n_bucket == _common.tune_bucket(n) and (m is None or m_bucket == _common.tune_bucket(m)), name


def test_autotune_switch_picks_the_smallest_surviving_config(monkeypatch):
    """LSR_TRITON_AUTOTUNE=0: the launcher runs the smallest config that survives pruning instead of
    the autotuner (one compile per kernel for the GPU test run); 1 or unset: the autotuner."""
    calls = []

    class Recorder:
        def __init__(self, configs=None):
            self.configs = configs

        def __getitem__(self, grid):
            return lambda **kwargs: calls.append(kwargs)

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    args = dict(x=torch.zeros(1), D_PADDED=512, HAS_SOFT=True, DOT_PRECISION="tf32", ACC_DTYPE=_common.tl.float32)
    tuned = Recorder(softmax_ce.FORWARD_CONFIGS)
    monkeypatch.setenv("LSR_TRITON_AUTOTUNE", "0")
    _common.launch(Recorder(), tuned, (1,), args, None)
    expected = _common.prune_configs(softmax_ce.FORWARD_CONFIGS, args)[0]
    assert {k: calls[-1][k] for k in expected.kwargs} == expected.kwargs
    assert calls[-1]["num_warps"] == expected.num_warps
    monkeypatch.setenv("LSR_TRITON_AUTOTUNE", "1")
    _common.launch(Recorder(), tuned, (1,), args, None)
    assert "BLOCK_M" not in calls[-1]  # the autotuner chose
    monkeypatch.setenv("LSR_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="LSR_TRITON_AUTOTUNE: expected 0 or 1"):
        _common.launch(Recorder(), tuned, (1,), args, None)


# -------------------------------------------------------------------------------------- errors
def test_cpu_tensors_rejected_outside_the_interpreter(cpu, monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    x = unit_rows(4, 3)
    with pytest.raises(ValueError, match=r"a: the triton backend needs CUDA tensors.*TRITON_INTERPRET"):
        T.info_nce(x, x, _scale(), True)
    with pytest.raises(ValueError, match=r"x: the triton backend needs CUDA"):
        T.exp_gram_sum(x, 2.0)


@pytest.mark.parametrize("call,match", [
    (lambda: T.info_nce(unit_rows(4, 3), unit_rows(5, 3), _scale(), True), r"symmetric needs a square X .*a \(4, 3\), b \(5, 3\)"),
    (lambda: T.info_nce(unit_rows(4, 3), unit_rows(4, 2), _scale(), True), r"b: shape \(4, 2\)"),
    (lambda: T.info_nce(unit_rows(4, 3), unit_rows(4, 3), torch.ones(2), True), r"scale: expected a one-element"),
    (lambda: T.itc_soft_ce(unit_rows(4, 3), unit_rows(4, 3), unit_rows(3, 3), _scale(), 0.4), r"bank: expected at least N = 4"),
    (lambda: T.itc_soft_ce(unit_rows(4, 3), unit_rows(4, 3), unit_rows(4, 3), _scale(), 1.5), r"alpha"),
    (lambda: T.exp_gram_sum(unit_rows(4, 3), 0.0), r"t: expected a finite positive"),
    (lambda: T.exp_gram_sum(torch.zeros(0, 3), 1.0), r"x: expected a non-empty 2-D"),
    (lambda: T.exp_gram_sum(torch.zeros(4), 1.0), r"x: expected a non-empty 2-D"),
    # past 32-bit tile indices (an expanded view: no memory)
    (lambda: T.exp_gram_sum(torch.zeros(1, 1).expand(2**31, 1), 1.0), r"x: at most 2147482624 rows"),
])
def test_bad_input_errors_name_the_argument(cpu, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_input_is_a_type_error(cpu):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        T.exp_gram_sum(torch.ones(4, 3, dtype=torch.int32), 1.0)


def test_bf16_under_the_interpreter_is_refused(cpu):
    """The interpreter runs the kernels in NumPy, which has no bfloat16 (the loss came out ~1e10)."""
    a = unit_rows(6, 8, requires_grad=False).bfloat16()
    with pytest.raises(TypeError, match=r"a: bfloat16 cannot run under the Triton interpreter"):
        T.info_nce(a, a, _scale(), True)
    import lsr_kernels
    with pytest.raises(TypeError, match=r"bfloat16 cannot run under the Triton interpreter"):
        lsr_kernels.clip_loss(a, a, 10.0, backend="triton")


@pytest.mark.parametrize("primitive", ["symmetric", "one-way", "one-way-b", "itc", "exp_gram"])
def test_double_backward_is_refused(cpu, primitive):
    """The backwards are kernels, not differentiable graphs: create_graph=True must fail loudly. The
    one-way forward that forms a's gradient (saved as a constant) once returned d(grad_a)/da = 0."""
    a, b = unit_rows(6, 4), unit_rows(6, 4)
    s = _scale()
    calls = {"symmetric": lambda: T.info_nce(a, b, s, True), "one-way": lambda: T.info_nce(a, b, s, False),
             "one-way-b": lambda: T.info_nce(a.detach(), b, s, False),
             "itc": lambda: T.itc_soft_ce(a, b.detach(), unit_rows(9, 4, requires_grad=False), s, 0.4),
             "exp_gram": lambda: T.exp_gram_sum(a, 2.0)}
    loss = calls[primitive]()
    wrt = [x for x in (a, b, s) if x.requires_grad and loss.grad_fn is not None]
    with pytest.raises(RuntimeError, match=r"triton\.\w+: double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)


# ------------------------------------------------------------------------------------ torch.compile
def _training_objective(a, b, q_m, bank, s):
    return (T.info_nce(a, b, s, True) + 0.5 * T.info_nce(a, b, s, False)
            + T.itc_soft_ce(a, q_m, bank, s, 0.4) + torch.log(T.exp_gram_sum(b, 2.0)))


def test_torch_compile_traces_the_custom_ops(cpu):
    """fullgraph=True: the custom ops (fake impls) and their registered backward trace without a break."""
    torch._dynamo.reset()
    inputs = [unit_rows(17, 8), unit_rows(17, 8), unit_rows(17, 8, requires_grad=False),
              unit_rows(30, 8, requires_grad=False), _scale()]
    eager_in, compiled_in = _leaves(*inputs), _leaves(*inputs)
    compiled = torch.compile(_training_objective, backend="aot_eager", fullgraph=True)
    loss_c, loss_e = compiled(*compiled_in), _training_objective(*eager_in)
    assert rel_err(loss_c, loss_e) < 1e-6
    for g, h in zip(grads(loss_c, compiled_in), grads(loss_e, eager_in)):
        assert rel_err(g, h) < 1e-6


def test_autocast_is_ignored(cpu):
    """README: the kernels run in the features' dtype whatever an enclosing autocast says."""
    a, b = unit_rows(6, 4), unit_rows(6, 4)
    plain = T.info_nce(a, b, _scale(), True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = T.info_nce(a, b, _scale(), True)
    assert torch.equal(plain, under)


@pytest.mark.parametrize("api", ["ClipLoss", "lsr_loss", "itc_loss"])
def test_torch_compile_traces_the_public_api(cpu, api):
    """fullgraph=True through the public entry points (validation, backend choice, composition), not
    only the primitives: loss and every gradient, the logit scale's included, equal eager's."""
    import lsr_kernels
    torch._dynamo.reset()
    v, t, va, ta = (unit_rows(9, 8, requires_grad=False) for _ in range(4))
    log_scale = torch.tensor(2.3)

    def objective(v, t, log_scale):
        s = log_scale.exp()
        if api == "ClipLoss":
            return lsr_kernels.ClipLoss(backend="triton")(v, t, s)
        if api == "itc_loss":
            return lsr_kernels.itc_loss(v, t, va, ta, s, image_queue=ta, alpha=0.4, backend="triton")
        return lsr_kernels.lsr_loss(v, t, s, image_aug=va, text_aug=ta, image_ind=va, text_ind=ta,
                                    image_ind_aug=v, text_ind_aug=t, sep_weight=1.0, bridge_weight=1.0,
                                    gc_weight=0.25, backend="triton")["loss"]

    eager_in, compiled_in = _leaves(v, t, log_scale), _leaves(v, t, log_scale)
    loss_c = torch.compile(objective, backend="aot_eager", fullgraph=True)(*compiled_in)
    loss_e = objective(*eager_in)
    assert rel_err(loss_c, loss_e) < 1e-6
    for g, h in zip(grads(loss_c, compiled_in), grads(loss_e, eager_in)):
        assert rel_err(g, h) < 1e-6


def _check_compiled_training_step(dev, n, d, in_dim):
    """torch.compile(fullgraph=True) with inductor: projection heads + the three custom ops, one step,
    against eager for the loss and every parameter's gradient (the logit scale's included)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    heads = [torch.nn.Linear(in_dim, d, device=dev) for _ in range(2)]
    x_img, x_txt = torch.randn(n, in_dim, device=dev), torch.randn(n, in_dim, device=dev)
    q_m, bank = unit_rows(n, d, device=dev, requires_grad=False), unit_rows(3 * n, d, device=dev, requires_grad=False)
    log_scale = torch.tensor(2.6, device=dev, requires_grad=True)

    def step(x_img, x_txt):
        v = torch.nn.functional.normalize(heads[0](x_img), dim=-1)
        t = torch.nn.functional.normalize(heads[1](x_txt), dim=-1)
        return _training_objective(v, t, q_m, bank, log_scale.exp())

    params = [*heads[0].parameters(), *heads[1].parameters(), log_scale]
    eager = step(x_img, x_txt)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, fullgraph=True)(x_img, x_txt)
    g_compiled = torch.autograd.grad(compiled, params)
    assert rel_err(compiled, eager) < 1e-5
    for g, h in zip(g_compiled, g_eager):
        assert rel_err(g, h) < 1e-4


@pytest.mark.slow
def test_inductor_compiles_a_training_step(cpu):
    """The default backend (inductor, C++ on CPU) lowers around the custom ops without a graph break."""
    _check_compiled_training_step("cpu", n=24, d=16, in_dim=8)


def test_fake_impls_give_shapes_only():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a, bank = torch.empty(7, 5, dtype=torch.float16), torch.empty(9, 5, dtype=torch.float16)
        s = torch.empty(())
        loss, lse = torch.ops.lsr_kernels.triton_info_nce(a, a, s, True, 0)
        assert loss.shape == () and loss.dtype == torch.float32 and lse.shape == (2, 7)
        loss, lse = torch.ops.lsr_kernels.triton_itc_soft_ce(a, a, bank, s, 0.4)
        assert loss.shape == () and lse.shape == (2, 7)
        loss, sq = torch.ops.lsr_kernels.triton_exp_gram_sum(a, 2.0)
        assert loss.shape == () and sq.shape == (7,)


def test_custom_op_registrations_pass_opcheck(cpu):
    """torch.library.opcheck on every Triton op, the backward ops included: schema (no hidden
    mutation or aliasing), fake impls against the real outputs, the autograd registration, and AOT
    dispatch with static and dynamic shapes."""
    a, b, q_m = (unit_rows(9, 8, requires_grad=False) for _ in range(3))
    wide, bank = unit_rows(13, 8, requires_grad=False), unit_rows(20, 8, requires_grad=False)
    s, g = _scale(requires_grad=False), torch.tensor(1.0)
    ops = torch.ops.lsr_kernels
    _, lse2 = ops.triton_info_nce(a, b, s, True, 0)
    _, itc_lse2 = ops.triton_itc_soft_ce(a, q_m, bank, s, 0.4)
    _, sq = ops.triton_exp_gram_sum(a, 2.0)
    da, db = a.clone().requires_grad_(), b.clone().requires_grad_()  # autograd registration too
    ds = s.clone().requires_grad_()
    cases = [(ops.triton_info_nce, (da, db, ds, True, 0)),
             (ops.triton_info_nce, (da, wide, ds, False, 2)),
             (ops.triton_info_nce_with_grad, (da, wide, ds, 2)),
             (ops.triton_info_nce_backward, (g, a, b, s, lse2, True, 0, True, True, True)),
             (ops.triton_info_nce_backward, (g, a, b, s, lse2, True, 0, False, True, False)),
             (ops.triton_itc_soft_ce, (da, q_m, bank, ds, 0.4)),
             (ops.triton_itc_soft_ce_backward, (g, a, q_m, bank, s, itc_lse2, 0.4, True, True)),
             (ops.triton_exp_gram_sum, (da, 2.0)),
             (ops.triton_exp_gram_sum_backward, (g, a, sq, 2.0))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_dynamic_batch_sizes_share_one_graph(cpu):
    """A training run's batch size varies (its last batch, a resumed run): with dynamic shapes one
    compiled graph serves every N through the fake impls, with eager's loss and gradients."""
    import lsr_kernels
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()

    def objective(v, t, va, ta, log_scale):
        s = log_scale.exp()
        return (lsr_kernels.lsr_loss(v, t, s, image_aug=va, text_aug=ta, image_ind=va, text_ind=ta,
                                     image_ind_aug=v, text_ind_aug=t, backend="triton")["loss"]
                + lsr_kernels.itc_loss(v, t, va, ta, s, image_queue=ta, alpha=0.4, backend="triton"))

    counter = CompileCounter()
    compiled = torch.compile(objective, backend=counter, fullgraph=True, dynamic=True)
    for n in (9, 13, 5):
        inputs = [unit_rows(n, 8, requires_grad=False) for _ in range(4)] + [torch.tensor(2.3)]
        eager_in, compiled_in = _leaves(*inputs), _leaves(*inputs)
        loss_c, loss_e = compiled(*compiled_in), objective(*eager_in)
        assert rel_err(loss_c, loss_e) < 1e-6, n
        for g, h in zip(grads(loss_c, compiled_in), grads(loss_e, eager_in)):
            assert rel_err(g, h) < 1e-6, n
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 3 batch sizes"


# ----------------------------------------------------------------------------- sm_90 build (no GPU)
def _run_sm90_script(name, *args, **env_vars):
    """Run scripts/<name> for sm_90 without a GPU: real Triton (no interpreter) in a subprocess."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_vars)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "scripts", name), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_kernels_build_for_sm90_without_a_gpu():
    """The interpreter accepts things the GPU compiler does not: build the bf16 kernels for sm_90 with
    Triton's bundled ptxas (no device needed; scripts/triton_sm90_sweep.py, whose --all mode covers
    every config). Every bf16 kernel must reach Hopper's warp-group MMA (MMA:wgmma), and the info_nce
    kernels (the CLIP hot path's two and the one-way forward with the gradient) must not spill
    registers in their first config."""
    done = _run_sm90_script("triton_sm90_sweep.py")
    lines = [line for line in done.stdout.splitlines() if line.startswith("BUILT")]
    assert len(lines) == 5, done.stdout
    for line in lines:
        assert line.endswith("MMA:wgmma"), f"not on warp-group MMA: {line}"
    # Register allocation is the compiler's: the first forward config spills 8 bytes under Triton 3.5;
    # from 3.6 (the GPU image's, benchmarks/results/triton_sm90_build.txt) none.
    found = backends.release(triton.__version__)
    if found is None or found >= (3, 6):  # (None: a source build, taken as recent)
        for line in lines[:3]:
            assert "STACK:" not in line or "STACK:0" in line, f"register spills in an info_nce kernel: {line}"


@pytest.mark.slow
def test_launchers_compile_through_the_triton_runtime_for_sm90(tmp_path):
    """What a first GPU launch does before running: each primitive's launchers, forward and backward,
    through Triton's JIT runtime (argument binding, specialisation, constexprs, sm_90 compile and its
    shared-memory limit), with a stand-in driver and a fresh cache so every kernel really compiles
    (scripts/triton_launch_rehearsal.py)."""
    done = _run_sm90_script("triton_launch_rehearsal.py", "--dtypes", "bf16,fp32", TRITON_CACHE_DIR=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("OK")]
    assert len(lines) == 2, done.stdout
    for line in lines:
        for kernel in ("_softmax_ce_fwd_kernel", "_softmax_ce_bwd_kernel", "_info_nce_fwd_grad_kernel",
                       "_exp_gram_fwd_kernel", "_exp_gram_bwd_kernel"):
            assert kernel in line, f"{kernel} was not launched: {line}"


# ========================================================================================= GPU
def _bf16_fp16():
    return pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


# The GPU checks below run one primitive per test: each compiles only its own kernels (2-3), so
# pytest-xdist spreads the compiles over its workers (a cold Triton compile is seconds per kernel).
GPU_PRIMITIVES = ["info_nce-symmetric", "info_nce-one-way", "itc", "exp_gram"]


def _gpu_primitive(name, a, b, q_m, bank, s):
    """``(ours, reference, inputs, wrt)`` of one primitive on the given rows."""
    if name.startswith("info_nce"):
        symmetric = name == "info_nce-symmetric"
        return (lambda a, b, s: T.info_nce(a, b, s, symmetric), lambda a, b, s: R.info_nce(a, b, s, symmetric),
                [a, b, s], [0, 1, 2])
    if name == "itc":
        return (lambda q, q_m, bank, s: T.itc_soft_ce(q, q_m, bank, s, 0.4),
                lambda q, q_m, bank, s: R.itc_soft_ce(q, q_m, bank, s, 0.4), [a, q_m, bank, s], [0, 3])
    return lambda x: T.exp_gram_sum(x, 2.0), lambda x: R.exp_gram_sum(x, 2.0), [a], [0]


@pytest.mark.gpu
@pytest.mark.parametrize("primitive", GPU_PRIMITIVES)
@_bf16_fp16()
@pytest.mark.parametrize("n,d", [(1000, 200), (4097, 512), (1000, 1024)])
def test_gpu_low_precision_no_worse_than_pytorch(cuda_device, dtype, n, d, primitive):
    dev = cuda_device
    a, b, q_m = (unit_rows(n, d, device=dev, requires_grad=False) for _ in range(3))
    bank = unit_rows(n + 3 * n // 2, d, device=dev, requires_grad=False)
    ours, ref, inputs, wrt = _gpu_primitive(primitive, a, b, q_m, bank, _scale(30.0, device=dev))
    _low_precision_check(ours, ref, inputs, wrt, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("primitive", GPU_PRIMITIVES)
@pytest.mark.parametrize("n,d", [(1, 1), (17, 33), (131, 65), (1000, 512)])
def test_gpu_fp32_matches_reference(cuda_device, n, d, primitive):
    dev = cuda_device
    a, b, q_m = (unit_rows(n, d, device=dev) for _ in range(3))
    bank = unit_rows(2 * n + 5, d, device=dev)
    ours, ref, inputs, wrt = _gpu_primitive(primitive, a, b, q_m, bank, _scale(14.3, device=dev))
    _compare(ours, ref, inputs, wrt=wrt, loss_tol=1e-5, grad_tol=1e-4)


@pytest.mark.gpu
def test_gpu_large_batch_bf16(cuda_device):
    n, d = 8192, 512
    a, b = (unit_rows(n, d, device=cuda_device, requires_grad=False) for _ in range(2))
    _low_precision_check(lambda a, b, s: T.info_nce(a, b, s, True), lambda a, b, s: R.info_nce(a, b, s, True),
                         [a, b, _scale(100.0, device=cuda_device)], [0, 1, 2], torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_of_the_public_api(cuda_device):
    """Capturing the loss in a CUDA graph: the eager scale check cannot sync during a capture, so
    there it takes the compiled path's NaN instead; a replay gives the eager loss, and a scale out
    of range gives NaN."""
    import lsr_kernels
    a, b = (unit_rows(1000, 128, torch.bfloat16, cuda_device, requires_grad=False) for _ in range(2))
    s = torch.tensor(20.0, device=cuda_device)
    eager = lsr_kernels.clip_loss(a, b, s, backend="triton")  # also compiles the kernels before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lsr_kernels.clip_loss(a, b, s, backend="triton")
    graph.replay()
    torch.testing.assert_close(captured, eager)
    s.fill_(-1.0)
    graph.replay()
    assert torch.isnan(captured).item()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", SPREADS)
@_bf16_fp16()
def test_gpu_symmetric_wide_spread(cuda_device, dtype, kind):
    """The one-exponential forward and backward on hardware, where exp2 flushes results below 2^-126
    to 0 (the interpreter keeps denormals): tiles whose statistics spread past FACTORED_EXP_SPREAD
    must take the fallback."""
    a, b = _spread_statistics(kind, n=1000, d=512, device=cuda_device)
    _low_precision_check(lambda a, b, s: T.info_nce(a, b, s, True), lambda a, b, s: R.info_nce(a, b, s, True),
                         [a, b, _scale(30.0, device=cuda_device)], [0, 1, 2], dtype)


# One test per (kernel family, config): each compiles 1-4 kernels, so pytest-xdist spreads the ~40
# compiles of "every config" over its workers instead of one worker spending a minute or more on them.
# The backward configs get their base-2 LSEs (and the Gram its squared norms) from float64 torch, not
# from a forward kernel: no extra forward compile per test, and the backward is checked on its own.
_EVERY_CONFIG = (
    [pytest.param("softmax_ce_fwd", i, id=f"softmax_ce_fwd-{i}") for i in range(len(softmax_ce.FORWARD_CONFIGS))]
    # five launches each (symmetric with and without ds, ITC, the one-way forward with the gradient and
    # its db): cold, ~5 Triton compiles, the longest of these tests
    + [pytest.param("softmax_ce_bwd", i, id=f"softmax_ce_bwd-{i}", marks=pytest.mark.gpu_cost(30))
       for i in range(len(softmax_ce.BACKWARD_CONFIGS))]
    + [pytest.param("exp_gram_fwd", i, id=f"exp_gram_fwd-{i}") for i in range(len(exp_gram.FORWARD_CONFIGS))]
    + [pytest.param("exp_gram_bwd", i, id=f"exp_gram_bwd-{i}") for i in range(len(exp_gram.BACKWARD_CONFIGS))])


def _inside_nan(x):
    """``x`` as a view into a NaN-filled buffer (a row before, two after, 2 columns left and 5 right of
    every row): a kernel that reads outside its input, past D or past the last row, turns the result
    into NaN instead of reading whatever lies there."""
    n, d = x.shape
    buffer = torch.full((n + 3, d + 7), float("nan"), dtype=x.dtype, device=x.device)
    buffer[1:n + 1, 2:d + 2] = x
    return buffer[1:n + 1, 2:d + 2]


def _check_config(family, index, device, dtype, n, d, bank_extra, loss_tol, grad_tol):
    """Config ``index`` of ``family`` (clamped to D as the autotuner's pruning would), run explicitly
    (bypassing the autotuner), against the float64 reference on the same ``dtype`` inputs, which lie
    inside NaN (:func:`_inside_nan`)."""
    width = _common.padded_width(d)
    a, b, q_m = (_inside_nan(unit_rows(n, d, device=device, requires_grad=False).to(dtype)) for _ in range(3))
    bank = _inside_nan(unit_rows(n + bank_extra, d, device=device, requires_grad=False).to(dtype))
    s = torch.tensor(20.0, device=device)
    grad = torch.tensor(1.0, device=device)
    ex = [t.double().requires_grad_() for t in (a, b)]
    s64 = s.double().requires_grad_()

    def config(configs):
        return _common.prune_configs([configs[index]], {}, D_PADDED=width)[0]  # one config: clamped only

    if family == "softmax_ce_fwd":
        cfg = config(softmax_ce.FORWARD_CONFIGS)
        for symmetric in (True, False):
            loss, _ = softmax_ce.info_nce_forward(a, b, s, symmetric, config=cfg)
            assert rel_err(loss, R.info_nce(ex[0], ex[1], s64, symmetric)) < loss_tol, cfg
        loss, _ = softmax_ce.itc_forward(a, q_m, bank, s, 0.4, config=cfg)
        assert rel_err(loss, R.itc_soft_ce(ex[0], q_m.double(), bank.double(), s64, 0.4)) < loss_tol, cfg
    elif family == "softmax_ce_bwd":
        cfg = config(softmax_ce.BACKWARD_CONFIGS)
        # the saved statistics are base-2 log-sum-exps: log2 sum_j exp(x_ij) = logsumexp(x)_i / ln 2
        x = s64.detach() * (ex[0].detach() @ ex[1].detach().T)
        lse2 = (torch.stack([torch.logsumexp(x, 1), torch.logsumexp(x, 0)]) / _common.LN2).float()
        ref_grads = torch.autograd.grad(R.info_nce(ex[0], ex[1], s64, True), [*ex, s64])
        got = softmax_ce.info_nce_backward(grad, a, b, s, lse2, True, True, True, True, config=cfg)
        for g, h in zip(got, ref_grads):
            assert rel_err(g, h) < grad_tol, cfg
        itc_x = s64.detach() * (ex[0].detach() @ bank.double().T)
        soft_x = s64.detach() * (q_m.double() @ bank.double().T)
        itc_lse2 = (torch.stack([torch.logsumexp(itc_x, 1), torch.logsumexp(soft_x, 1)]) / _common.LN2).float()
        ref_itc_grads = torch.autograd.grad(R.itc_soft_ce(ex[0], q_m.double(), bank.double(), s64, 0.4),
                                            [ex[0], s64])
        got = softmax_ce.itc_backward(grad, a, q_m, bank, s, itc_lse2, 0.4, True, True, config=cfg)
        for g, h in zip(got, ref_itc_grads):
            assert rel_err(g, h) < grad_tol, cfg
        ref_one_way = R.info_nce(ex[0], ex[1], s64, False)
        ref_one_way_grads = torch.autograd.grad(ref_one_way, [ex[0], ex[1], s64])
        loss, _, h_b, h_dot = softmax_ce.info_nce_forward_with_grad(a, b, s, config=cfg)
        assert rel_err(loss, ref_one_way) < loss_tol, cfg
        assert rel_err(h_b.float() * (s / n), ref_one_way_grads[0]) < grad_tol, cfg
        assert rel_err(h_dot / n, ref_one_way_grads[2]) < grad_tol, cfg
        # the one-way db launch (the other side's softmax only), as the full objective's terms run it
        _, db, _ = softmax_ce.info_nce_backward(grad, a, b, s, lse2[:1], False, False, True, False, config=cfg)
        assert rel_err(db, ref_one_way_grads[1]) < grad_tol, cfg
    elif family == "exp_gram_fwd":
        cfg = config(exp_gram.FORWARD_CONFIGS)
        total, _ = exp_gram.exp_gram_forward(a, 2.0, config=cfg)
        assert rel_err(total, R.exp_gram_sum(ex[0], 2.0)) < min(loss_tol, 1e-4), cfg
    else:
        cfg = config(exp_gram.BACKWARD_CONFIGS)
        ref_gram_grad, = torch.autograd.grad(R.exp_gram_sum(ex[0], 2.0), [ex[0]])
        sq = a.float().square().sum(1)  # what the row-norm kernel saves: fp32 sums of exact squares
        dx = exp_gram.exp_gram_backward(grad, a, sq, 2.0, config=cfg)
        assert rel_err(dx, ref_gram_grad) < grad_tol, cfg


@pytest.mark.parametrize("family,index", _EVERY_CONFIG)
def test_every_autotune_config_in_the_interpreter(cpu, monkeypatch, family, index):
    """Every GPU config's tiles, D slices and masks, in fp16 (the factored exponential) under the
    interpreter, which otherwise runs only its own 16 x 16 config: a config with wrong index arithmetic
    would give wrong numbers on a GPU whenever the autotuner happened to find it fastest. Row groups
    and column splits use the GPU's granule (128), as they do there. N = 300: partial row and column
    tiles; D = 200: partial K slices, and BLOCK_DO clamped to the padded D (256) and then partial."""
    monkeypatch.setattr(_common, "granule", lambda: _common.GPU_GRANULE)
    # fp16 rounding of the returned gradients is ~2e-4 here; a wrong tile is O(1)
    _check_config(family, index, cpu, torch.float16, n=300, d=200, bank_extra=190, loss_tol=1e-5, grad_tol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("family,index", _EVERY_CONFIG)
def test_gpu_every_autotune_config(cuda_device, family, index):
    """Each config of each kernel on bf16 inputs at D = 512, on the GPU."""
    # N and D multiples of 16 with D = 512: Triton specialises integer arguments on divisibility by 16,
    # so these compiles are the very ones the benchmark's autotuner wants at N = 32K, D = 512 bf16
    # (the GPU check runs the tests first: its benchmark stage then finds them in Triton's cache).
    # N = 704 still leaves a partial 128-row tile. bf16 arithmetic on 704 x 512: well above its ~4e-3
    # error, far below a wrong kernel's O(1).
    _check_config(family, index, cuda_device, torch.bfloat16, n=704, d=512, bank_extra=900,
                  loss_tol=1e-3, grad_tol=2e-2)


@pytest.mark.gpu
@pytest.mark.gpu_cost(60)
def test_gpu_compiled_training_step(cuda_device):
    _check_compiled_training_step(cuda_device, n=512, d=256, in_dim=64)


@pytest.mark.gpu
@pytest.mark.gpu_cost(25)
def test_gpu_peak_memory_is_linear_in_n(cuda_device):
    """N = 65536 and 131072, D = 512, bf16: fwd + bwd of the symmetric loss (and ITC with a 65536 queue,
    and the Gram sum) use well under 2 GB beyond inputs and gradients, and the extra grows ~linearly
    (an N x N fp32 buffer would be 16 GB and 64 GB)."""
    dev, d = cuda_device, 512
    extras = {}
    for n in (65536, 131072):
        a, b = (unit_rows(n, d, device=dev, requires_grad=False).to(torch.bfloat16).requires_grad_() for _ in range(2))
        q_m = unit_rows(n, d, device=dev, requires_grad=False).to(torch.bfloat16)
        bank = unit_rows(n + 65536, d, device=dev, requires_grad=False).to(torch.bfloat16)
        s = _scale(100.0, device=dev)
        a.grad = torch.zeros_like(a)
        b.grad = torch.zeros_like(b)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = T.info_nce(a, b, s, True) + T.itc_soft_ce(a, q_m, bank, s, 0.4) + torch.log(T.exp_gram_sum(b, 2.0))
        loss.backward()
        torch.cuda.synchronize()
        extras[n] = torch.cuda.max_memory_allocated() - base
        assert extras[n] < 2 * 2**30, (n, extras[n])
        del a, b, q_m, bank, loss
        torch.cuda.empty_cache()
    assert extras[131072] < 2.6 * extras[65536], extras


@pytest.mark.gpu
@pytest.mark.gpu_cost(15)
def test_gpu_gradcheck_float64(cuda_device):
    a, b = (torch.randn(5, 3, dtype=torch.float64, device=cuda_device) for _ in range(2))
    s = _scale(3.0, torch.float64, device=cuda_device)
    assert torch.autograd.gradcheck(lambda a, b, s: T.info_nce(a, b, s, True), _leaves(a, b) + [s])
    assert torch.autograd.gradcheck(lambda x: T.exp_gram_sum(x, 0.7), _leaves(a))
    bank = torch.randn(8, 3, dtype=torch.float64, device=cuda_device)
    assert torch.autograd.gradcheck(lambda q, s: T.itc_soft_ce(q, b, bank, s, 0.0), _leaves(a) + [s])


@pytest.mark.gpu
def test_gpu_rejects_cpu_tensors(cuda_device):
    if _common.interpreting():
        pytest.skip("the kernels were built for the interpreter in this process")
    x = unit_rows(4, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        T.info_nce(x, x, _scale(), True)
