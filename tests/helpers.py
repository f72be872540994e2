"""Shared test helpers: inputs with the right structure and error metrics that can fail."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

FEATURE_NAMES = ("image_features", "text_features", "image_aug", "text_aug",
                 "image_ind", "text_ind", "image_ind_aug", "text_ind_aug")
#: The paper's weights, lsr_loss's and LSRLoss's defaults (SPEC 2.5), spelled out where a test means them.
ALL_ON = dict(sep_weight=1.0, bridge_weight=1.0, gc_weight=0.25)


def weights_only(**on):
    """The weight arguments with every regulariser off but those given: ``weights_only()`` is plain CLIP."""
    return {**dict(sep_weight=0.0, bridge_weight=0.0, gc_weight=0.0), **on}


def weighted_parts(terms, sep_weight, bridge_weight, gc_weight):
    """``lsr_loss``'s ``{"loss", <unweighted terms>}`` as LSRLoss's ``output_dict`` gives them: each
    term times its weight, no total (open_clip's form: the values sum to the total)."""
    weights = {"separation_loss": sep_weight, "bridge_loss": bridge_weight, "geometric_loss": gc_weight}
    return {"contrastive_loss": terms["contrastive_loss"],
            **{k: weights[k] * v for k, v in terms.items() if k in weights}}


def unit_rows(n, d, dtype=torch.float32, device="cpu", requires_grad=True):
    # drawn on the target device: the GPU tests' largest inputs (10^8 float64 draws) would take tens
    # of seconds of CPU time inside the GPU check's capped test stage
    x = F.normalize(torch.randn(n, d, dtype=torch.float64, device=device), dim=-1).to(dtype=dtype)
    return x.requires_grad_(requires_grad)


def lsr_inputs(n, d, dtype=torch.float32, device="cpu", scale=10.0):
    """All eight feature sets of SPEC 2.2-2.4 plus a scale that requires grad."""
    feats = {name: unit_rows(n, d, dtype, device) for name in FEATURE_NAMES}
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=device, requires_grad=True)
    return feats, s


def aligned_rows(n, d, count, dtype=torch.float32, device="cpu", noise=0.02, seed=0):
    """``count`` sets of unit rows, each a small perturbation of one shared set: a well-trained
    model's batch, where every positive dominates its row and the loss is far below log N."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, dtype=torch.float64, generator=gen)
    return [F.normalize(base + noise * torch.randn(n, d, dtype=torch.float64, generator=gen), dim=-1)
            .to(device=device, dtype=dtype).requires_grad_() for _ in range(count)]


def aligned_itc_inputs(n, k, d, seed=0):
    """ITC's ``q``, ``q_m`` and bank (``n`` positives then ``k`` unrelated queue rows) for a
    well-trained batch: fp32, no gradients; the ITC loss is near 1e-4 at a scale of 20."""
    q, q_m, positives = (x.detach() for x in aligned_rows(n, d, 3, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1000)
    queue = F.normalize(torch.randn(k, d, dtype=torch.float64, generator=gen), dim=-1).float()
    return q, q_m, torch.cat([positives, queue])


def aligned_itc_errors(itc_soft_ce, q, q_m, bank, scale=20.0, alpha=0.4):
    """Relative errors, against float64 arithmetic, of ``itc_soft_ce`` and of PyTorch's own fp32
    (the reference) on the fp32 inputs of :func:`aligned_itc_inputs`: ``(ours, pytorch)``."""
    from lsr_kernels import reference as R

    def args(dtype):
        return q.to(dtype), q_m.to(dtype), bank.to(dtype), torch.tensor(scale, dtype=dtype), alpha
    exact = R.itc_soft_ce(*args(torch.float64))
    return (rel_err(itc_soft_ce(*args(torch.float32)), exact),
            rel_err(R.itc_soft_ce(*args(torch.float32)), exact))


def grads(loss, tensors):
    """Gradients of ``loss`` w.r.t. ``tensors`` (zeros where it does not depend on one)."""
    gs = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def rel_err(x, ref):
    """Relative error in the 2-norm: ||x - ref|| / max(||ref||, tiny). Two-sided, scale-free."""
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def backend_available(name: str) -> bool:
    try:
        importlib.import_module(f"lsr_kernels.backends.{name}")
    except ImportError:
        return False
    return True


def require_cuda_extension():
    """The CUDA backend for a GPU test: the installed extension, else a just-in-time build; with
    LSR_SKIP_CUDA_BUILD=1 (scripts/gpu_check.sh's build stage has already built it or reported why
    not) a missing extension skips the test instead of failing dozens of them for one cause."""
    from lsr_kernels.backends import cuda as cuda_backend
    if not cuda_backend.HAS_CUDA_EXT:
        if os.environ.get("LSR_SKIP_CUDA_BUILD") == "1":
            pytest.skip("the CUDA extension is not installed and LSR_SKIP_CUDA_BUILD=1")
        cuda_backend.load_jit()
    return cuda_backend
