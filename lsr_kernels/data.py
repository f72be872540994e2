"""Image-caption data for the reference training loop: an offline default and the user's own CSV.

- :func:`load_digits_pairs`: scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, no
  download), upsampled, each image paired with a generated caption ("the number 7 written by hand",
  "a blurry handwritten seven", ...). The ten classes come with prompt templates for zero-shot
  classification.
- :func:`load_csv_pairs`: open_clip's CSV format (an image-path column and a caption column, a
  configurable separator); every image is read with PIL up front, so a bad file fails before training.
- :class:`WordTokenizer`: a word-level tokenizer whose vocabulary is built from the captions
  (plus the prompts and the synonym table of :mod:`lsr_kernels.augment`, so augmented captions and
  prompts have no unknown words).
- :func:`batch_indices`: which rows form batch ``step``, a pure function of ``(seed, step)`` so a
  resumed run draws exactly the batches the uninterrupted run would have drawn.

Images are float32 ``[N, C, H, W]`` scaled to [-1, 1]. ``labels`` are "what a caption describes" ids:
the digit class for digits, the caption string for CSV data (identical captions are one id). Two
rows with the same id are interchangeable for retrieval and are not hard negatives for each other.
"""
from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------- tokens
PAD, CLS, EOS, MASK, UNK = "[PAD]", "[CLS]", "[EOS]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, EOS, MASK, UNK)
# Fixed ids, so models can be configured without a tokenizer at hand.
PAD_ID, CLS_ID, EOS_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> List[str]:
    """Lower-case words and numbers; punctuation separates words and is dropped."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer: ``[CLS] w_1 ... w_n [EOS] [PAD] ...``, truncated to ``context_length``.

    The ``[EOS]`` token is kept after truncation (CLIP pools at it). Unknown words map to ``[UNK]``.
    """

    def __init__(self, vocab: Sequence[str], context_length: int):
        vocab = list(vocab)
        if tuple(vocab[:NUM_SPECIAL_TOKENS]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab: must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:NUM_SPECIAL_TOKENS]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab: contains duplicate entries")
        if context_length < 3:
            raise ValueError(f"context_length: expected >= 3 ([CLS], one word, [EOS]), got {context_length}")
        self.vocab = vocab
        self.context_length = int(context_length)
        self.index = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int, max_size: Optional[int] = None) -> "WordTokenizer":
        """Vocabulary of every word in ``texts``, most frequent first (ties alphabetical), capped at
        ``max_size`` entries including the special tokens."""
        counts: Dict[str, int] = {}
        for text in texts:
            for w in split_words(text):
                counts[w] = counts.get(w, 0) + 1
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - NUM_SPECIAL_TOKENS)]
        return cls(list(SPECIAL_TOKENS) + words, context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_words(self, words: Sequence[str]) -> List[int]:
        ids = [self.index.get(w, UNK_ID) for w in words][: self.context_length - 2]
        return [CLS_ID] + ids + [EOS_ID]

    def __call__(self, texts: Sequence[str] | str) -> Tensor:
        """``[B, context_length]`` int64 token ids."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode_words(split_words(text))
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.vocab[int(i)] for i in ids if int(i) not in (PAD_ID, CLS_ID, EOS_ID)]
        return " ".join(words)

    def state_dict(self) -> dict:
        return {"vocab": list(self.vocab), "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "WordTokenizer":
        return cls(state["vocab"], state["context_length"])


# ---------------------------------------------------------------------------------------- the pairs
@dataclass
class PairedData:
    """Images with one caption each.

    ``images``: ``[N, C, H, W]`` float32 in [-1, 1]; ``captions``: ``N`` strings; ``labels``: ``[N]``
    int64 ids of what the caption describes (see the module docstring). ``class_prompts`` (digits
    only): for each class, the prompts whose averaged embedding is the zero-shot classifier.
    """

    images: Tensor
    captions: List[str]
    labels: Tensor
    class_names: Optional[List[str]] = None
    class_prompts: Optional[List[List[str]]] = None
    source: str = ""

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"images: expected [N, C, H, W], got shape {tuple(self.images.shape)}")
        if not (len(self.captions) == self.images.shape[0] == self.labels.shape[0]):
            raise ValueError(f"images ({self.images.shape[0]}), captions ({len(self.captions)}) and labels "
                             f"({self.labels.shape[0]}) must have the same length")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, rows: Tensor) -> "PairedData":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return PairedData(self.images[rows], [self.captions[i] for i in rows.tolist()], self.labels[rows],
                          self.class_names, self.class_prompts, self.source)


def split_pairs(data: PairedData, val_fraction: float, seed: int, stratify: Optional[bool] = None
                ) -> Tuple[PairedData, PairedData]:
    """A seeded split into (train, held-out). ``stratify`` (default: when the data has classes) holds
    out the same fraction of each label, at least one row of each; it needs >= 2 rows per label."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n = len(data)
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    uniq, counts = np.unique(labels, return_counts=True)
    val_rows: List[int] = []
    if stratify is None:
        stratify = data.class_names is not None
    if stratify and counts.min() >= 2:
        for label in uniq:
            rows = np.flatnonzero(labels == label)
            k = max(1, int(round(val_fraction * len(rows))))
            val_rows.extend(rng.permutation(rows)[:k].tolist())
    else:
        k = max(1, int(round(val_fraction * n)))
        val_rows = rng.permutation(n)[:k].tolist()
    if len(val_rows) >= n:
        raise ValueError(f"val_fraction: {val_fraction} of {n} pairs leaves no training data")
    is_val = np.zeros(n, dtype=bool)
    is_val[val_rows] = True
    return data.subset(torch.from_numpy(np.flatnonzero(~is_val))), data.subset(torch.from_numpy(np.flatnonzero(is_val)))


# ------------------------------------------------------------------------------------------- digits
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word, {n}: as a numeral, {adj}: a description of the handwriting.
CAPTION_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {n} written by hand",
    "a photo of the digit {w}",
    "a {adj} handwritten {w}",
    "the digit {n}",
    "a scanned image of a {w}",
    "a {adj} drawing of the number {w}",
    "handwritten {w}",
    "an image of the numeral {n}",
    "someone wrote the number {w}",
    "a {adj} {n} on a grid of pixels",
    "the numeral {w} written with a pen",
)
HANDWRITING_ADJECTIVES = ("small", "blurry", "pixelated", "neat", "messy", "thick", "thin", "tilted", "low resolution")
# Zero-shot classifier prompts (CLIP-style ensemble: the class embedding is their normalised mean).
PROMPT_TEMPLATES = ("a handwritten digit {w}", "the number {n} written by hand", "a photo of the digit {w}")


def digit_caption(label: int, rng: random.Random) -> str:
    template = rng.choice(CAPTION_TEMPLATES)
    return template.format(w=DIGIT_WORDS[label], n=str(label), adj=rng.choice(HANDWRITING_ADJECTIVES))


def digit_prompts() -> List[List[str]]:
    return [[t.format(w=DIGIT_WORDS[c], n=str(c)) for t in PROMPT_TEMPLATES] for c in range(10)]


def _to_unit_range(x: Tensor) -> Tensor:
    return x * 2.0 - 1.0


def load_digits_pairs(image_size: int = 16, channels: int = 1, seed: int = 0) -> PairedData:
    """All 1,797 digits as ``[N, channels, image_size, image_size]`` with one seeded caption each."""
    if image_size < 8:
        raise ValueError(f"image_size: expected >= 8 for the 8x8 digits, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: works offline

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = _to_unit_range(images.clamp(0.0, 1.0)).expand(-1, channels, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rng = random.Random(seed)
    captions = [digit_caption(int(c), rng) for c in labels.tolist()]
    return PairedData(images, captions, labels, list(DIGIT_WORDS), digit_prompts(), source="sklearn digits")


# ---------------------------------------------------------------------------------------------- CSV
def _load_image(path: str, image_size: int, channels: int) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        side = min(w, h)  # centre square crop, then resize: keeps the aspect ratio
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return _to_unit_range(torch.from_numpy(np.ascontiguousarray(arr)))


def load_csv_pairs(path: str, img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                   image_size: int = 32, channels: int = 3) -> PairedData:
    """open_clip's CSV format: one row per pair, image paths relative to the CSV's folder or absolute.

    Everything is read and checked before returning, so a missing column, an empty file or an
    unreadable image raise a ``ValueError`` naming the option, the row and the file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--csv: no such file {path!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels}")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            header = reader.fieldnames or []
            for option, key in (("--csv-img-key", img_key), ("--csv-caption-key", caption_key)):
                if key not in header:
                    raise ValueError(f"{option}: column {key!r} not in the header of {path!r} (columns {header}, "
                                     f"separator {separator!r}); pass the right column name or --csv-separator")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:  # not ValueErrors (csv.Error) or without the file's name
        raise ValueError(f"--csv: {path!r} is not a readable UTF-8 CSV file: {err}") from err
    if not rows:
        raise ValueError(f"--csv: {path!r} has a header but no rows")
    images, captions = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        rel, caption = row.get(img_key), row.get(caption_key)
        if not rel or caption is None or not caption.strip():
            raise ValueError(f"--csv: {path!r} line {line}: empty {img_key!r} or {caption_key!r} field")
        img_path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        try:
            images.append(_load_image(img_path, image_size, channels))
        except Exception as err:  # PIL raises many types: report one clear error
            raise ValueError(f"--csv: {path!r} line {line}: cannot read image {img_path!r}: {err}") from err
        captions.append(caption.strip())
    ids: Dict[str, int] = {}
    labels = torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)
    return PairedData(torch.stack(images), captions, labels, source=os.path.abspath(path))


# ------------------------------------------------------------------------------------------ batches
def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence), for counter-based streams."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Rows of batch ``step``: each epoch is a seeded permutation cut into full batches (the last
    partial batch is dropped, like ``drop_last=True``). A pure function of its arguments."""
    if not 1 <= batch_size <= num_rows:
        raise ValueError(f"batch_size: expected 1 <= batch_size <= {num_rows} (the training set), got {batch_size}")
    per_epoch = num_rows // batch_size
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xDA7A, epoch))
    perm = torch.randperm(num_rows, generator=gen)
    return perm[i * batch_size:(i + 1) * batch_size]


__all__ = [
    "PAD", "CLS", "EOS", "MASK", "UNK", "SPECIAL_TOKENS", "PAD_ID", "CLS_ID", "EOS_ID", "MASK_ID", "UNK_ID",
    "NUM_SPECIAL_TOKENS", "split_words", "WordTokenizer", "PairedData", "split_pairs", "DIGIT_WORDS",
    "CAPTION_TEMPLATES", "PROMPT_TEMPLATES", "digit_caption", "digit_prompts", "load_digits_pairs",
    "load_csv_pairs", "mix_seed", "batch_indices",
]
