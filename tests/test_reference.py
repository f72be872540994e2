"""The reference against independent implementations, mathematical properties and gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from lsr_kernels import reference as R
from helpers import grads, lsr_inputs, rel_err, unit_rows

open_clip_loss = pytest.importorskip("open_clip.loss")


# ------------------------------------------------------------------------------ open_clip ClipLoss
@pytest.mark.parametrize("n,d", [(1, 3), (7, 5), (64, 32), (131, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_matches_open_clip(n, d, dtype):
    v, t = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    s = torch.tensor(14.3, dtype=dtype, requires_grad=True)
    ours = R.contrastive_loss(v, t, s)
    theirs = open_clip_loss.ClipLoss()(v, t, s)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert rel_err(ours, theirs) < tol
    for g, h in zip(grads(ours, [v, t, s]), grads(theirs, [v, t, s])):
        assert rel_err(g, h) < 10 * tol


# ---------------------------------------------------------------------------- ALBEF transcription
def albef_ita(image_feat, text_feat, image_feat_m, text_feat_m, image_queue_t, text_queue_t, temp, alpha):
    """ALBEF's model_pretrain.py ITA loss, transcribed (queues stored [D, K] as ALBEF does)."""
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m.t(), image_queue_t.clone().detach()], dim=1)
        text_feat_all = torch.cat([text_feat_m.t(), text_queue_t.clone().detach()], dim=1)
        sim_i2t_m = image_feat_m @ text_feat_all / temp
        sim_t2i_m = text_feat_m @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("n,d,k", [(1, 4, 3), (8, 16, 0), (13, 7, 40), (32, 24, 96)])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_itc_matches_albef(n, d, k, alpha):
    dt = torch.float64
    v, t = unit_rows(n, d, dt), unit_rows(n, d, dt)
    vm, tm = unit_rows(n, d, dt, requires_grad=False), unit_rows(n, d, dt, requires_grad=False)
    qv, qt = unit_rows(k, d, dt, requires_grad=False), unit_rows(k, d, dt, requires_grad=False)
    temp = torch.tensor(0.07, dtype=dt, requires_grad=True)
    ours = R.itc_loss(v, t, vm, tm, 1 / temp, qv if k else None, qt if k else None, alpha)
    theirs = albef_ita(v, t, vm, tm, qv.T, qt.T, temp, alpha)
    assert rel_err(ours, theirs) < 1e-13
    for g, h in zip(grads(ours, [v, t, temp]), grads(theirs, [v, t, temp])):
        assert rel_err(g, h) < 1e-11


def test_itc_primitive_gives_the_bank_no_gradient():
    """The primitive contract (lsr_kernels.backends): gradients reach q and the scale only, in the
    reference as in the fused backends, even when the caller passes a bank that requires grad."""
    q, q_m, bank = unit_rows(5, 4), unit_rows(5, 4, requires_grad=False), unit_rows(9, 4)
    loss = R.itc_soft_ce(q, q_m, bank, torch.tensor(5.0), 0.4)
    g_q, g_bank = torch.autograd.grad(loss, [q, bank], allow_unused=True)
    assert g_q is not None and g_bank is None


# ------------------------------------------------------------------------------------ properties
def test_geometric_zero_when_texts_equal_images():
    v = unit_rows(20, 8, torch.float64)
    assert R.geometric_loss(v, v).abs().item() < 1e-12
    assert R.geometric_loss(v, v, v, v).abs().item() < 1e-12
    t = unit_rows(20, 8, torch.float64)
    assert R.geometric_loss(v, t).item() > 1e-3  # and it can fail


def test_bridge_zero_on_the_bridge_mean():
    v, t = unit_rows(9, 6, torch.float64), unit_rows(9, 6, torch.float64)
    mu = F.normalize(0.3 * v + 0.7 * t, dim=-1)
    assert R.bridge_loss(v, t, mu, 0.3).item() < 1e-14
    assert R.bridge_loss(v, t, v, 0.3).item() > 1e-3


def test_orthogonality_zero_for_orthogonal_heads():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    v, vi, t, ti = q[:6, :], q[6:, :], q[[1, 3, 5, 0, 2, 4], :], q[[6, 8, 10, 7, 9, 11], :]
    assert R.orthogonality_loss(v, t, vi, ti).item() < 1e-28
    assert R.orthogonality_loss(v, t, v, t).item() > 1.0  # <x, x>^2 = 1 per row and modality


@pytest.mark.parametrize("n,d", [(5, 3), (17, 9), (40, 40)])
def test_gram_identities(n, d):
    a, b, c = (torch.randn(n, d, dtype=torch.float64) for _ in range(3))
    lhs = (a @ a.T - c @ c.T).square().sum()
    rhs = (a.T @ a).square().sum() - 2 * (a.T @ c).square().sum() + (c.T @ c).square().sum()
    assert rel_err(lhs, rhs) < 1e-12
    lhs = (a @ b.T - b @ a.T).square().sum()
    g = b.T @ a
    rhs = 2 * ((a.T @ a) * (b.T @ b)).sum() - 2 * torch.trace(g @ g)
    assert rel_err(lhs, rhs) < 1e-12


def test_every_term_is_invariant_to_a_joint_permutation():
    feats, s = lsr_inputs(11, 6, torch.float64)
    perm = torch.randperm(11)
    kw = dict(separation=True, bridge=True, geometric=True)
    args = {k: v for k, v in feats.items() if k not in ("image_features", "text_features")}
    base = R.lsr_terms(feats["image_features"], feats["text_features"], s, **args, **kw)
    permuted = R.lsr_terms(feats["image_features"][perm], feats["text_features"][perm], s,
                           **{k: v[perm] for k, v in args.items()}, **kw)
    for key in base:
        assert rel_err(permuted[key], base[key]) < 1e-12, key
    kq = 5
    qv, qt = unit_rows(kq, 6, torch.float64), unit_rows(kq, 6, torch.float64)
    vm, tm = feats["image_aug"], feats["text_aug"]
    v, t = feats["image_features"], feats["text_features"]
    itc = R.itc_loss(v, t, vm, tm, s, qv, qt, 0.4)
    itc_p = R.itc_loss(v[perm], t[perm], vm[perm], tm[perm], s, qv[torch.randperm(kq)], qt[torch.randperm(kq)], 0.4)
    assert rel_err(itc_p, itc) < 1e-12


def test_uniformity_matches_pairwise_distances():
    vi, ti = unit_rows(10, 4, torch.float64), unit_rows(10, 4, torch.float64)
    direct = sum(torch.exp(-2.0 * torch.cdist(x, x).square()).sum() for x in (vi, ti))
    assert rel_err(R.uniformity_loss(vi, ti, 2.0), torch.log(direct / 10)) < 1e-12


# ------------------------------------------------------------------------------------- gradcheck
def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_every_term():
    feats, s = lsr_inputs(5, 3, torch.float64)
    v, t, va, ta = (feats[k] for k in ("image_features", "text_features", "image_aug", "text_aug"))
    vi, ti, via, tia = (feats[k] for k in ("image_ind", "text_ind", "image_ind_aug", "text_ind_aug"))
    _gc(R.contrastive_loss, v, t, s)
    _gc(R.contrastive_loss, v, t, s, va, ta)
    _gc(R.orthogonality_loss, v, t, vi, ti)
    _gc(R.independent_contrastive_loss, vi, ti, via, tia, s)
    _gc(lambda a, b: R.uniformity_loss(a, b, 2.0), vi, ti)
    _gc(lambda *x: R.separation_loss(*x, uniformity_t=1.5), v, t, vi, ti, via, tia, s)
    _gc(lambda a, b, c: R.bridge_loss(a, b, c, 0.25), v, t, va)
    _gc(R.geometric_loss, v, t)
    _gc(R.geometric_loss, v, t, va, ta)
    q = unit_rows(4, 3, torch.float64, requires_grad=False)
    # The soft targets are constants (no_grad, as in ALBEF), so finite differences in the scale see
    # only the alpha = 0 part exactly; the scale's full gradient is checked against ALBEF above.
    _gc(lambda a, b: R.itc_loss(a, b, va.detach(), ta.detach(), s, q, q, 0.4), v, t)
    _gc(lambda a, b, sc: R.itc_loss(a, b, va.detach(), ta.detach(), sc, q, q, 0.0), v, t, s)
    for symmetric in (False, True):
        _gc(lambda a, b, sc: R.info_nce(a, b, sc, symmetric), v, t, s)
    _gc(lambda x: R.exp_gram_sum(x, 2.0), v)
