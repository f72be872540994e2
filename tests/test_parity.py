"""The shared parity suite: every fast backend against the reference, loss and every gradient.

Cases run on CPU for ``chunked`` and for ``triton`` under its interpreter (tiny shapes: the
interpreter is slow), and on a GPU (marker ``gpu``) for ``chunked``, ``triton`` and ``cuda``.
Low precision follows flash-attention's rule: the backend's error against the float64 reference is
at most a small multiple of PyTorch's own error when the reference runs in that dtype.
"""
import os

import pytest
import torch

import lsr_kernels
from lsr_kernels import backends, reference as R
from helpers import (ALL_ON, FEATURE_NAMES, aligned_rows, backend_available, grads, lsr_inputs, rel_err,
                     require_cuda_extension, unit_rows, weights_only)

LOW_PRECISION_FACTOR = 3.0  # flash-attention uses 2; a fused kernel rounds at different places

CASES = [
    pytest.param(("chunked", "cpu"), id="chunked-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("chunked", "cuda"), id="chunked-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=CASES)
def case(request):
    name, device = request.param
    if not backend_available(name):
        pytest.skip(f"backend {name!r} is not usable here (see tests/helpers.backend_available)")
    interpreted = device == "cpu" and name == "triton"
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    if name == "cuda":
        require_cuda_extension()
    return name, torch.device(device), interpreted


def _shapes(interpreted, cpu_shapes, small_shapes):
    return small_shapes if interpreted else cpu_shapes


def _split(feats):
    rest = {k: v for k, v in feats.items() if k not in ("image_features", "text_features")}
    return feats["image_features"], feats["text_features"], rest


def _objective(feats, s, backend, **weights):
    v, t, rest = _split(feats)
    return lsr_kernels.lsr_loss(v, t, s, backend=backend, **rest, **weights)


def _cast(feats, s, dtype):
    """Detached copies in ``dtype`` (scale stays float32 unless float64), requiring grad."""
    out = {k: v.detach().to(dtype).requires_grad_() for k, v in feats.items()}
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return out, s.detach().to(sdt).requires_grad_()


# --------------------------------------------------------------------- full objective, fp32
@pytest.mark.parametrize("shape_index", range(4))
def test_full_objective_matches_reference(case, shape_index):
    name, device, interpreted = case
    shapes = _shapes(interpreted, [(1, 1), (7, 3), (131, 65), (260, 32)], [(1, 1), (5, 3), (17, 33), (20, 16)])
    n, d = shapes[shape_index]
    feats, s = lsr_inputs(n, d, torch.float32, device)
    tensors = [*feats.values(), s]
    ours = _objective(feats, s, name, **ALL_ON)
    ref = _objective(feats, s, "reference", **ALL_ON)
    assert set(ours) == set(ref)
    for key in ref:
        assert rel_err(ours[key], ref[key]) < 2e-5, key
    for tname, g, h in zip([*FEATURE_NAMES, "logit_scale"], grads(ours["loss"], tensors), grads(ref["loss"], tensors)):
        assert rel_err(g, h) < 1e-4, tname


@pytest.mark.parametrize("weights", [weights_only(), weights_only(sep_weight=1.0), weights_only(bridge_weight=1.0),
                                     weights_only(gc_weight=0.25)])
def test_each_term_alone_matches_reference(case, weights):
    name, device, interpreted = case
    n, d = (9, 5) if interpreted else (37, 24)
    feats, s = lsr_inputs(n, d, torch.float32, device)
    tensors = [*feats.values(), s]
    ours = _objective(feats, s, name, **weights)
    ref = _objective(feats, s, "reference", **weights)
    assert rel_err(ours["loss"], ref["loss"]) < 2e-5
    for g, h in zip(grads(ours["loss"], tensors), grads(ref["loss"], tensors)):
        assert rel_err(g, h) < 1e-4


# --------------------------------------------------------------------------------- ALBEF ITC
@pytest.mark.parametrize("n,d,k", [(1, 4, 0), (13, 7, 40), (24, 16, 24)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_matches_reference(case, n, d, k, alpha):
    name, device, interpreted = case
    if not interpreted:
        n, k = n * 5, k * 7  # a queue several times the batch
    v, t = unit_rows(n, d, device=device), unit_rows(n, d, device=device)
    vm, tm = unit_rows(n, d, device=device, requires_grad=False), unit_rows(n, d, device=device, requires_grad=False)
    qv = unit_rows(k, d, device=device, requires_grad=False) if k else None
    qt = unit_rows(k + 3, d, device=device, requires_grad=False) if k else None
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    ours = lsr_kernels.itc_loss(v, t, vm, tm, s, image_queue=qv, text_queue=qt, alpha=alpha, backend=name)
    ref = lsr_kernels.itc_loss(v, t, vm, tm, s, image_queue=qv, text_queue=qt, alpha=alpha, backend="reference")
    assert rel_err(ours, ref) < 2e-5
    for g, h in zip(grads(ours, [v, t, s]), grads(ref, [v, t, s])):
        assert rel_err(g, h) < 1e-4


# ------------------------------------------------------------------------- primitives, fp32
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("n,d", [(1, 1), (17, 33), (3, 70)])
def test_info_nce_primitive(case, symmetric, n, d):
    name, device, _ = case
    prims = backends.primitives(name)
    a, b = unit_rows(n, d, device=device), unit_rows(n, d, device=device)
    s = torch.tensor(30.0, device=device, requires_grad=True)
    ours, ref = prims.info_nce(a, b, s, symmetric), R.info_nce(a, b, s, symmetric)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert rel_err(ours, ref) < 2e-5
    for g, h in zip(grads(ours, [a, b, s]), grads(ref, [a, b, s])):
        assert rel_err(g, h) < 1e-4


@pytest.mark.parametrize("n,m,offset,d", [(1, 1, 0, 3), (5, 12, 3, 8), (17, 68, 51, 33), (16, 40, 0, 16),
                                          (3, 50, 24, 7)])
def test_info_nce_primitive_rectangular(case, n, m, offset, d):
    """One rank's rows against every rank's columns: ``b`` ``[M, D]``, the positives at ``offset``
    (first block, last block, straddling a tile border)."""
    name, device, _ = case
    prims = backends.primitives(name)
    a, b = unit_rows(n, d, device=device), unit_rows(m, d, device=device)
    s = torch.tensor(20.0, device=device, requires_grad=True)
    ours, ref = prims.info_nce(a, b, s, False, offset), R.info_nce(a, b, s, False, offset)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    assert rel_err(ours, ref) < 2e-5
    for g, h in zip(grads(ours, [a, b, s]), grads(ref, [a, b, s])):
        assert rel_err(g, h) < 1e-4


@pytest.mark.parametrize("m, offset, symmetric, message", [
    (9, 2, False, r"offset: expected 0 <= offset <= M - N = 1"),
    (8, -1, False, r"offset: expected 0 <= offset <= M - N = 0"),
    (5, 0, False, r"offset: expected 0 <= offset <= M - N = -3"),
    (9, 0, True, r"symmetric needs a square X"),
])
def test_info_nce_primitive_rejects_bad_offsets(case, m, offset, symmetric, message):
    name, device, _ = case
    a, b = unit_rows(8, 4, device=device), unit_rows(m, 4, device=device)
    with pytest.raises(ValueError, match=message):
        backends.primitives(name).info_nce(a, b, torch.tensor(2.0, device=device), symmetric, offset)


@pytest.mark.parametrize("n,d,t", [(1, 3, 2.0), (17, 33, 2.0), (23, 5, 0.5)])
def test_exp_gram_sum_primitive(case, n, d, t):
    name, device, _ = case
    x = unit_rows(n, d, device=device)
    ours, ref = backends.primitives(name).exp_gram_sum(x, t), R.exp_gram_sum(x, t)
    assert rel_err(ours, ref) < 2e-5
    g, h = grads(ours, [x])[0], grads(ref, [x])[0]
    if h.any():
        assert rel_err(g, h) < 1e-4
    else:  # N = 1: exactly zero, which a GPU's fused multiply-add may leave as a rounding residue
        assert g.abs().max().item() <= 1e-6


# ------------------------------------------------------------------------- low precision
def _check_low_precision(name, feats, s, dtype):
    """Both runs see the same rounded inputs; the exact answer is float64 arithmetic on them."""
    low_in, low_s = _cast(feats, s, dtype)
    torch_in, torch_s = _cast(feats, s, dtype)
    exact_in, exact_s = _cast(low_in, low_s, torch.float64)
    exact = _objective(exact_in, exact_s, "reference", **ALL_ON)
    ours = _objective(low_in, low_s, name, **ALL_ON)
    torch_low = _objective(torch_in, torch_s, "reference", **ALL_ON)
    for key in exact:
        bound = LOW_PRECISION_FACTOR * rel_err(torch_low[key], exact[key]) + 1e-6
        assert rel_err(ours[key], exact[key]) <= bound, key
    g_exact = grads(exact["loss"], [*exact_in.values(), exact_s])
    g_ours = grads(ours["loss"], [*low_in.values(), low_s])
    g_torch = grads(torch_low["loss"], [*torch_in.values(), torch_s])
    for tname, go, gt, ge in zip([*FEATURE_NAMES, "logit_scale"], g_ours, g_torch, g_exact):
        assert go.dtype == (torch.float32 if tname == "logit_scale" else dtype), tname
        bound = LOW_PRECISION_FACTOR * rel_err(gt, ge) + 1e-6
        assert rel_err(go, ge) <= bound, f"{tname}: ours {rel_err(go, ge):.3g}, bound {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_no_worse_than_pytorch(case, dtype):
    name, device, interpreted = case
    if interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no real bf16 arithmetic: bf16 is a GPU test")
    n, d = (16, 32) if interpreted else (256, 64)
    feats, s = lsr_inputs(n, d, torch.float32, device, scale=20.0)
    _check_low_precision(name, feats, s, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_on_a_well_aligned_batch(case, dtype):
    """Late in training every positive dominates its row (here a loss near 1e-3): the gradient is
    P - I with P_ii = 1 - eps, and a kernel that rounds P_ii to the input dtype before taking the
    one-hot off keeps mostly rounding residue (once 20-200x PyTorch's own fp16 error in triton)."""
    name, device, interpreted = case
    if interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no real bf16 arithmetic: bf16 is a GPU test")
    n, d = (16, 32) if interpreted else (64, 48)
    feats = dict(zip(FEATURE_NAMES, aligned_rows(n, d, len(FEATURE_NAMES), device=device)))
    s = torch.tensor(12.0, device=device, requires_grad=True)
    _check_low_precision(name, feats, s, dtype)
