"""Seeded augmentations for the augmented views of SPEC 2.1-2.4 (pure PyTorch and the standard library).

- Images: :class:`ImageAugment`, a batched random resized crop (the crop's area fraction and aspect
  ratio drawn per image, like torchvision's ``RandomResizedCrop``) with an optional horizontal flip,
  as one ``affine_grid`` + ``grid_sample``. No torchvision needed.
- Captions: :class:`CaptionAugment`, EDA (Wei & Zou, 2019): synonym replacement from the small
  embedded :data:`SYNONYMS` table, random insertion of a synonym, random swap, random deletion; one
  operation per caption, as CyCLIP (which the paper builds on) does.

Every call takes its randomness explicitly (a ``torch.Generator`` / ``random.Random``), so the
training loop can derive it from ``(seed, step)`` and a resumed run sees the same views.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import split_words

# ------------------------------------------------------------------------------------------- images


def random_resized_crop(images: Tensor, generator: torch.Generator, scale: Tuple[float, float] = (0.5, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip_p: float = 0.0,
                        shard: Tuple[int, int] = (0, 1)) -> Tensor:
    """Crop a random box of each image and resize it back to the input size; flip it with ``hflip_p``.

    The box covers a fraction ``U(scale)`` of the area with aspect ratio ``exp(U(log ratio))`` (a side
    longer than the image is clipped to it), at a uniformly random position inside the image.
    ``images``: ``[B, C, H, W]`` floating; the random numbers are drawn on the CPU from ``generator``
    so the result does not depend on the device.

    ``shard = (index, count)``: ``images`` is part ``index`` of a batch cut into ``count`` equal parts
    (one rank's rows under data parallelism). The random numbers are drawn for the whole batch and
    this part's rows kept, so the ranks together crop exactly as one process holding the batch.
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale: expected 0 < min <= max <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio: expected 0 < min <= max, got {ratio}")
    if not 0.0 <= hflip_p <= 1.0:
        raise ValueError(f"hflip_p: expected a probability in [0, 1], got {hflip_p}")
    index, count = shard
    if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
        raise ValueError(f"shard: expected (index, count) with 0 <= index < count, got {shard}")
    b = images.shape[0]
    u = torch.rand(b * count, 5, generator=generator, dtype=torch.float64)[index * b:(index + 1) * b]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    # Box sides as fractions of the image's width and height.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    # Box centre in normalised [-1, 1] coordinates, the box kept inside the image.
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    flip = torch.where(u[:, 4] < hflip_p, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w * flip  # the output's x in [-1, 1] maps onto the box (mirrored when flipped)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    theta = theta.to(device=images.device, dtype=work_dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.to(work_dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)


class ImageAugment:
    """``random_resized_crop`` with fixed parameters, called as ``aug(images, generator[, shard])``."""

    def __init__(self, scale: Tuple[float, float] = (0.5, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 hflip_p: float = 0.0):
        self.scale, self.ratio, self.hflip_p = tuple(scale), tuple(ratio), float(hflip_p)
        random_resized_crop(torch.zeros(1, 1, 2, 2), torch.Generator(), self.scale, self.ratio, self.hflip_p)

    def __call__(self, images: Tensor, generator: torch.Generator, shard: Tuple[int, int] = (0, 1)) -> Tensor:
        return random_resized_crop(images, generator, self.scale, self.ratio, self.hflip_p, shard)

    def __repr__(self) -> str:
        return f"ImageAugment(scale={self.scale}, ratio={self.ratio}, hflip_p={self.hflip_p})"


# ----------------------------------------------------------------------------------------- captions
# A small embedded synonym table (EDA uses WordNet; this keeps the library offline and dependency-free).
# It covers the digit captions and common caption words. Symmetric enough for replacement both ways.
SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "handwritten": ("handdrawn", "scribbled", "penned"),
    "digit": ("numeral", "number", "figure"),
    "number": ("numeral", "digit", "figure"),
    "numeral": ("digit", "number", "figure"),
    "figure": ("digit", "number"),
    "photo": ("picture", "image", "snapshot"),
    "picture": ("photo", "image"),
    "image": ("picture", "photo"),
    "snapshot": ("photo", "picture"),
    "drawing": ("sketch", "doodle"),
    "sketch": ("drawing", "doodle"),
    "scanned": ("digitized", "captured"),
    "wrote": ("drew", "penned", "scribbled"),
    "written": ("drawn", "penned"),
    "pen": ("pencil", "marker"),
    "small": ("little", "tiny"),
    "little": ("small", "tiny"),
    "big": ("large", "huge"),
    "large": ("big", "huge"),
    "blurry": ("fuzzy", "unclear", "hazy"),
    "pixelated": ("grainy", "blocky"),
    "neat": ("tidy", "clean"),
    "messy": ("sloppy", "untidy"),
    "thick": ("bold", "heavy"),
    "thin": ("slim", "fine"),
    "tilted": ("slanted", "leaning"),
    "someone": ("somebody", "a person"),
    "grid": ("raster", "lattice"),
    "pixels": ("dots",),
    "man": ("person", "guy"),
    "woman": ("lady", "person"),
    "person": ("individual", "human"),
    "people": ("persons", "folks"),
    "child": ("kid", "youngster"),
    "dog": ("puppy", "hound"),
    "cat": ("kitten", "kitty"),
    "car": ("automobile", "vehicle"),
    "street": ("road", "avenue"),
    "house": ("home", "building"),
    "walking": ("strolling", "wandering"),
    "running": ("jogging", "sprinting"),
    "sitting": ("seated", "resting"),
    "standing": ("upright", "waiting"),
    "playing": ("frolicking",),
    "holding": ("carrying", "gripping"),
    "looking": ("gazing", "staring"),
    "red": ("crimson", "scarlet"),
    "blue": ("azure", "navy"),
    "green": ("emerald",),
    "white": ("pale",),
    "black": ("dark",),
    "beautiful": ("pretty", "lovely"),
    "old": ("aged", "ancient"),
    "young": ("youthful",),
    "near": ("beside", "by"),
    "shows": ("depicts", "displays"),
}
# EDA never replaces these (it uses a stop-word list for the same reason).
STOP_WORDS = frozenset(
    "a an the of on in at by to for with and or is are was were be this that these those it its as from "
    "into over under".split())


def synonym_words() -> List[str]:
    """Every word the table can produce (the tokenizer's vocabulary includes them)."""
    words = set(SYNONYMS)
    for alts in SYNONYMS.values():
        for alt in alts:
            words.update(split_words(alt))
    return sorted(words)


def _synonyms(word: str) -> Tuple[str, ...]:
    return SYNONYMS.get(word, ())


def synonym_replacement(words: List[str], n: int, rng: random.Random) -> List[str]:
    """Replace up to ``n`` distinct non-stop words that have synonyms by a random synonym."""
    out = list(words)
    candidates = [i for i, w in enumerate(out) if w not in STOP_WORDS and _synonyms(w)]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        out[i] = rng.choice(_synonyms(out[i]))
    return " ".join(out).split()  # a multi-word synonym becomes several words


def random_insertion(words: List[str], n: int, rng: random.Random) -> List[str]:
    """Insert ``n`` times a synonym of a random word (that has one) at a random position."""
    out = list(words)
    for _ in range(n):
        candidates = [w for w in out if _synonyms(w)]
        if not candidates:
            break
        synonym = rng.choice(_synonyms(rng.choice(candidates))).split()
        pos = rng.randint(0, len(out))
        out[pos:pos] = synonym
    return out


def random_swap(words: List[str], n: int, rng: random.Random) -> List[str]:
    """Swap two random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: List[str], p: float, rng: random.Random) -> List[str]:
    """Delete each word with probability ``p``; never return an empty caption."""
    if len(words) <= 1:
        return list(words)
    out = [w for w in words if rng.random() >= p]
    return out if out else [rng.choice(words)]


class CaptionAugment:
    """EDA with strength ``alpha`` (the fraction of words changed): one random operation per caption.

    ``ops`` selects among ``"synonym"``, ``"insert"``, ``"swap"``, ``"delete"``.
    """

    OPS = ("synonym", "insert", "swap", "delete")

    def __init__(self, alpha: float = 0.15, ops: Sequence[str] = OPS):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha: expected a fraction in (0, 1], got {alpha}")
        unknown = [op for op in ops if op not in self.OPS]
        if unknown or not ops:
            raise ValueError(f"ops: expected a non-empty subset of {self.OPS}, got {tuple(ops)}")
        self.alpha, self.ops = float(alpha), tuple(ops)

    def augment_one(self, caption: str, rng: random.Random) -> str:
        words = split_words(caption)
        if not words:
            return caption
        n = max(1, int(round(self.alpha * len(words))))
        op = rng.choice(self.ops)
        if op == "synonym":
            words = synonym_replacement(words, n, rng)
        elif op == "insert":
            words = random_insertion(words, n, rng)
        elif op == "swap":
            words = random_swap(words, n, rng)
        else:
            words = random_deletion(words, self.alpha, rng)
        return " ".join(words)

    def __call__(self, captions: Sequence[str], rng: random.Random) -> List[str]:
        return [self.augment_one(c, rng) for c in captions]

    def __repr__(self) -> str:
        return f"CaptionAugment(alpha={self.alpha}, ops={self.ops})"


__all__ = [
    "random_resized_crop", "ImageAugment", "SYNONYMS", "STOP_WORDS", "synonym_words", "synonym_replacement",
    "random_insertion", "random_swap", "random_deletion", "CaptionAugment",
]
