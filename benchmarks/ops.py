"""The benchmarked operations: their inputs, which of them get gradients, and their matmul floor.

Ops (SPEC section numbers in brackets):
    ``clip``     contrastive loss without views, open_clip's ``ClipLoss`` [2.1]
    ``clip_gc``  ``clip`` plus geometric consistency ``L_gc`` (weight 0.25) [2.1, 2.4]
    ``full``     every term on: contrastive with views, separation, bridge, geometric, with the paper's
                 weights 1, 1, 0.25 [2.5]
    ``itc``      ALBEF's ITC with momentum distillation and a queue of ``K`` rows per modality [2.6]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

OPS = ("clip", "clip_gc", "full", "itc")
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

#: CLIP's initial multiplier exp(log(1 / 0.07)); any positive value costs the same.
LOGIT_SCALE = 1 / 0.07
#: The paper's weights (SPEC 2.5) for ``full``; ``clip_gc`` uses only the geometric one.
FULL_WEIGHTS = dict(sep_weight=1.0, bridge_weight=1.0, gc_weight=0.25)
GC_WEIGHT = 0.25
ITC_ALPHA = 0.4

# Which API arguments each op takes, and which of them receive a gradient.
_FEATURES = {
    "clip": ("image_features", "text_features"),
    "clip_gc": ("image_features", "text_features"),
    "full": ("image_features", "text_features", "image_aug", "text_aug",
             "image_ind", "text_ind", "image_ind_aug", "text_ind_aug"),
    "itc": ("image_features", "text_features", "image_features_m", "text_features_m"),
}
_QUEUES = {"itc": ("image_queue", "text_queue")}
_NO_GRAD = {"image_features_m", "text_features_m", "image_queue", "text_queue"}

# Matmul floor: every product of an [N, D] by a [D, M] matrix costs 2 N M D flops. The counts below
# are the fewest such products a fused implementation needs, per op and mode (the O(N D^2) Gram work
# of the geometric term and every O(N D) row-wise term are not counted: they are not the floor).
PRODUCTS = {
    # one S = V T^T gives both CE directions (fwd 1); the backward recomputes S from the saved
    # log-sum-exp statistics and forms dV = dS T and dT = dS^T V (bwd 3): 4 in all.
    "clip": {"forward": 1, "backward": 3, "full": 4},
    "clip_gc": {"forward": 1, "backward": 3, "full": 4},
    # contrastive with views: 3 matrices (V T^T, V Va^T, T Ta^T) x 4 = 12; separation's icon term:
    # 2 x 4 = 8; uniformity: 2 symmetric Grams, upper tiles only: 0.5 fwd + 0.5 recompute + 1 for dX
    # (each upper tile feeds both its row and its column block) = 2 x 2 = 4. Total 24 = fwd 6 + bwd 18.
    "full": {"forward": 6, "backward": 18, "full": 24},
    # per direction an N x (N + K) problem: fwd 2 (S = q bank^T and the targets' S_m = q_m bank^T,
    # online), bwd 3 (recompute S and S_m, dq = dS bank; the bank gets no gradient) = 5; two
    # directions: fwd 4, bwd 6, full 10, each 2 N (N + K) D flops.
    "itc": {"forward": 4, "backward": 6, "full": 10},
}


def matmul_flops(op: str, mode: str, n: int, d: int, k: int = 0) -> int:
    """The matmul floor of one call of ``op`` in ``mode`` (see :data:`PRODUCTS`)."""
    columns = n + k if op == "itc" else n
    return PRODUCTS[op][mode] * 2 * n * columns * d


@dataclass
class Inputs:
    """Everything one call needs: API keyword arguments, the scale, and the tensors that get grads."""
    features: Dict[str, torch.Tensor]
    scale: torch.Tensor
    grad_inputs: List[torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())


def _unit_rows(rows: int, d: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
               requires_grad: bool) -> torch.Tensor:
    # Drawn in float32 on the target device (fast at 1M rows), normalised, then cast: the model
    # normalises its features, the loss does not.
    x = torch.randn(rows, d, device=device, generator=gen)
    x = torch.nn.functional.normalize(x, dim=-1).to(dtype)
    return x.requires_grad_(requires_grad)


def make_inputs(op: str, n: int, d: int, dtype: str, device, k: int = 0, seed: int = 0) -> Inputs:
    """Unit-row features for ``op`` at ``[n, d]`` (queues ``[k, d]``), and the logit scale."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    device = torch.device(device)
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    features = {name: _unit_rows(n, d, torch_dtype, device, gen, name not in _NO_GRAD)
                for name in _FEATURES[op]}
    for name in _QUEUES.get(op, ()):
        if k > 0:
            features[name] = _unit_rows(k, d, torch_dtype, device, gen, False)
    scale_dtype = torch.float64 if torch_dtype == torch.float64 else torch.float32
    scale = torch.tensor(LOGIT_SCALE, dtype=scale_dtype, device=device, requires_grad=True)
    grad_inputs = [t for t in features.values() if t.requires_grad] + [scale]
    return Inputs(features, scale, grad_inputs)


def reference_matrix_bytes(op: str, n: int, k: int = 0) -> int:
    """Bytes of one float32 N x N (N x (N + K) for itc) matrix: what a materialising provider pays per
    logits matrix; used to skip hopeless shapes before allocating."""
    columns = n + k if op == "itc" else n
    return 4 * n * columns


def human_n(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M' (powers of two); other values unchanged."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
