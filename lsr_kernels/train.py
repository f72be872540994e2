"""``lsr-train``: the reference training loop for CLIP and ALBEF with the LSR regularisers.

    lsr-train                                  # CLIP + all regularisers on the bundled digits, < 1 min on 2 CPU cores
    lsr-train --model albef --reg all --steps 400
    lsr-train --compare --out runs/compare     # baseline and each regulariser, a paper-style table
    lsr-train --csv pairs.tsv --csv-img-key filepath --csv-caption-key title --image-size 32
    lsr-train --resume runs/clip-all             # an interrupted run continues its trajectory

Data parallel: ``torchrun --nproc_per_node W -m lsr_kernels.train ...`` (or ``torchrun --nproc_per_node W
$(which lsr-train) ...``) trains one model on ``W`` processes with DDP (NCCL on CUDA, one GPU per local
rank; gloo on CPU). ``--batch-size`` stays the *global* batch; each rank takes its ``1/W`` of the same
rows one process would take, the augmentations are drawn for the global batch, and the losses are
built with ``local_loss=True, gather_with_grad=True``, so the per-step losses and updates are those of
one process with the same global batch (up to float rounding), for CLIP and for ALBEF (whose hard
negatives, MLM masks and token count are global too: :mod:`lsr_kernels.models.albef`). Rank 0
evaluates, logs and writes the output folder.

Every step's randomness (batch order, augmentations, MLM masks, hard negatives) is derived from
``(seed, step)``, so a run resumed from a checkpoint repeats exactly the steps the uninterrupted run
would have taken. Output in ``--out``: ``metrics.json`` (configuration, per-step history, evaluations),
``curves.png``, ``checkpoint.pt``.

Evaluation on the held-out split: zero-shot classification accuracy (digits; each class is the mean
embedding of its prompts) and image-to-text / text-to-image recall@1, where a retrieved caption counts
when it describes the image (same digit class; identical caption text for CSV data). ALBEF is
evaluated with its ITC features (no ITM re-ranking).

Measured on the default digits (CPU, defaults otherwise): CLIP with all regularisers reaches ~93%
zero-shot accuracy in 300 steps. ALBEF trained from scratch is much slower to start: its ITC positives
are the momentum encoders' features, which at momentum 0.995 stay near their random initialisation
for a few hundred steps (ALBEF itself starts from pre-trained encoders), so at 300 steps it is still
near chance and reaches ~43% zero-shot at 1,000 steps (--model albef --reg none --steps 1000).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import backends
from .augment import CaptionAugment, ImageAugment, synonym_words
from .data import (PairedData, WordTokenizer, batch_indices, load_csv_pairs, load_digits_pairs, mix_seed,
                   split_pairs, MASK_ID, CLS_ID, EOS_ID, NUM_SPECIAL_TOKENS, PAD_ID)
from . import distributed as lsr_distributed
from .models import build_model
from .modules import LSRLoss

REGULARISERS = ("sep", "br", "gc")
REG_CHOICES = ("none",) + REGULARISERS + ("all",)
#: The paper's weights (SPEC 2.5), used for a regulariser that is on unless overridden.
PAPER_WEIGHTS = {"sep": 1.0, "br": 1.0, "gc": 0.25}
#: ``lsr_loss`` term names of the regularisers, for logging and tables.
TERM_OF = {"sep": "separation_loss", "br": "bridge_loss", "gc": "geometric_loss"}
#: What the [train] extra installs (scikit-learn's digits, the curves, CSV images), by import name.
TRAIN_EXTRA_MODULES = ("sklearn", "matplotlib", "PIL")
#: The runs ``--compare`` makes: one regulariser per CLIP run, all together for ALBEF (as the paper).
COMPARE_RUNS = {"clip": ("none", "sep", "br", "gc"), "albef": ("none", "all")}
#: Arguments that define the trajectory: on ``--resume`` they come from the checkpoint.
TRAJECTORY_KEYS = ("model", "reg", "sep_weight", "br_weight", "gc_weight", "batch_size", "lr", "weight_decay",
                   "warmup", "seed", "csv", "csv_val", "csv_img_key", "csv_caption_key", "csv_separator",
                   "val_fraction", "image_size", "channels", "patch_size", "width", "layers", "fusion_layers",
                   "heads", "embed_dim", "context_length", "queue_size", "momentum", "alpha", "hflip_p", "eda_alpha")
CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


class InputError(ValueError):
    """Bad user input (data, checkpoint, configuration) found before training starts."""


# ----------------------------------------------------------------------------------- arguments
def _number(convert, accept, what: str):
    """An argparse ``type``: ``convert(text)``, which must satisfy ``accept``; else ``expected <what>``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
_non_negative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
_probability = _number(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def _regularisers(text: str) -> str:
    """``none``, ``all``, one name or a comma-separated combination (``sep,gc``); normalised."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected one of {REG_CHOICES} (or a comma list), got {text!r}")
    unknown = [n for n in names if n not in REG_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown regulariser {unknown[0]!r}: expected one of {REG_CHOICES} "
                                         f"or a comma-separated combination such as 'sep,gc'")
    if len(names) > 1 and ("none" in names or "all" in names):
        raise argparse.ArgumentTypeError(f"'none' and 'all' cannot be combined with others, got {text!r}")
    if names == ["all"]:
        return "all"
    if names == ["none"]:
        return "none"
    return ",".join(r for r in REGULARISERS if r in names)  # canonical order, duplicates dropped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsr-train", description="Train a small CLIP or ALBEF with the latent-modality-structure "
        "regularisers (Jiang et al., CVPR 2023) and evaluate it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--model", choices=("clip", "albef"), default="clip", help="model family")
    g.add_argument("--reg", type=_regularisers, default="all",
                   help=f"regularisers: one of {REG_CHOICES} or a comma list such as 'sep,gc'")
    g.add_argument("--sep-weight", type=_positive_float, default=None,
                   help=f"weight of the separation loss when on; None: the paper's {PAPER_WEIGHTS['sep']}")
    g.add_argument("--br-weight", type=_positive_float, default=None,
                   help=f"weight of the Brownian bridge when on; None: the paper's {PAPER_WEIGHTS['br']}")
    g.add_argument("--gc-weight", type=_positive_float, default=None,
                   help=f"weight of geometric consistency when on; None: the paper's {PAPER_WEIGHTS['gc']}")
    g.add_argument("--backend", choices=backends.BACKENDS, default="auto", help="loss backend")
    g.add_argument("--distributed-mode", choices=lsr_distributed.MODES, default="gather",
                   help="under torchrun: how the contrastive terms see the other ranks' features "
                        "('ring' keeps per-rank memory O(local batch x D); see lsr_kernels.distributed)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="global batch (under torchrun: split evenly over the ranks)")
    g.add_argument("--steps", type=_positive_int, default=300,
                   help="total optimiser steps of the whole run (with --resume, default: the checkpoint's; a larger "
                        "total extends the run, its cosine schedule recomputed for the new total)")
    g.add_argument("--lr", type=_positive_float, default=1e-3, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.1, help="AdamW weight decay")
    g.add_argument("--warmup", type=_non_negative_int, default=20, help="linear warm-up steps before the cosine decay")
    g.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    g.add_argument("--device", default="auto",
                   help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...; under torchrun 'cuda' "
                        "means the local rank's GPU")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: runs/<model>-<reg>, or the --resume folder)")
    g.add_argument("--eval-every", type=_non_negative_int, default=100, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-every", type=_non_negative_int, default=None,
                   help="write the checkpoint every N steps (default: at each evaluation; 0: only at the end)")
    g.add_argument("--resume", default=None, help="a checkpoint file, or a folder holding checkpoint.pt")
    g.add_argument("--compare", action="store_true",
                   help="train the baseline and each regulariser (CLIP: none, sep, br, gc; ALBEF: none, all) "
                        "into <out>/<reg> and print the results side by side")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("data (default: scikit-learn's digits with generated captions)")
    g.add_argument("--csv", default=None, help="training pairs in open_clip's CSV format")
    g.add_argument("--csv-val", default=None, help="held-out pairs in the same format (default: split off --csv)")
    g.add_argument("--csv-img-key", default="filepath", help="image path column")
    g.add_argument("--csv-caption-key", default="title", help="caption column")
    g.add_argument("--csv-separator", default="\t", help="CSV field separator (default: %(default)r, a tab)")
    g.add_argument("--val-fraction", type=_probability, default=0.2, help="held-out fraction when splitting")
    g.add_argument("--image-size", type=_positive_int, default=16, help="images are resized to this square side")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 for digits, 3 for CSV")
    g.add_argument("--hflip-p", type=_probability, default=None,
                   help="horizontal flip probability of the image augmentation (default: 0 for digits, "
                        "whose mirror image is another glyph; 0.5 for CSV)")
    g.add_argument("--eda-alpha", type=_probability, default=0.15, help="EDA strength for the caption views")
    g = p.add_argument_group("model size")
    g.add_argument("--patch-size", type=_positive_int, default=4, help="image patch size in pixels")
    g.add_argument("--width", type=_positive_int, default=64, help="width of every transformer")
    g.add_argument("--layers", type=_positive_int, default=2, help="layers of the image and text encoders")
    g.add_argument("--fusion-layers", type=_positive_int, default=1, help="ALBEF's cross-attention layers")
    g.add_argument("--heads", type=_positive_int, default=4, help="attention heads per layer")
    g.add_argument("--embed-dim", type=_positive_int, default=32, help="joint embedding width D")
    g.add_argument("--context-length", type=_positive_int, default=16, help="tokens per caption")
    g = p.add_argument_group("ALBEF")
    g.add_argument("--queue-size", type=_positive_int, default=256, help="length K of the feature queues")
    g.add_argument("--momentum", type=_probability, default=0.995,
                   help="EMA of the momentum encoders (ALBEF's value)")
    g.add_argument("--alpha", type=_probability, default=0.4, help="momentum distillation weight")
    return p


def regulariser_weights(args: argparse.Namespace) -> Dict[str, float]:
    """``{"sep": w, "br": w, "gc": w}`` with 0 for the regularisers that are off."""
    on = REGULARISERS if args.reg == "all" else (() if args.reg == "none" else tuple(args.reg.split(",")))
    given = {"sep": args.sep_weight, "br": args.br_weight, "gc": args.gc_weight}
    return {r: ((given[r] if given[r] is not None else PAPER_WEIGHTS[r]) if r in on else 0.0) for r in REGULARISERS}


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Errors that argparse's per-option types cannot see (combinations); all before any training."""
    if args.compare and args.resume:
        parser.error("--compare and --resume cannot be combined (resume each run's folder separately)")
    if args.compare and args.reg != parser.get_default("reg"):
        parser.error(f"--compare trains its own set of regularisers ({args.model}: "
                     f"{', '.join(COMPARE_RUNS[args.model])}); --reg {args.reg} would be ignored")
    if args.batch_size < 2:
        parser.error(f"--batch-size: expected >= 2 (a contrastive batch needs negatives), got {args.batch_size}")
    if not args.compare:
        on = regulariser_weights(args)
        for r, flag in (("sep", "--sep-weight"), ("br", "--br-weight"), ("gc", "--gc-weight")):
            if getattr(args, f"{r}_weight") is not None and on[r] == 0.0:
                parser.error(f"{flag} was given but --reg {args.reg} does not switch {r} on")
    if args.momentum >= 1.0:
        parser.error(f"--momentum: expected a value in [0, 1) (1 freezes the momentum encoders), got {args.momentum}")
    if args.csv_val and not args.csv:
        parser.error("--csv-val needs --csv")
    if not args.csv and args.image_size < 8:
        parser.error(f"--image-size: the digits are 8x8; expected >= 8, got {args.image_size}")
    if args.image_size % args.patch_size != 0:
        parser.error(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.width % args.heads != 0:
        parser.error(f"--width {args.width} is not divisible by --heads {args.heads}")
    if args.context_length < 3:
        parser.error(f"--context-length: expected >= 3 ([CLS], a word, [EOS]), got {args.context_length}")
    if args.val_fraction in (0.0, 1.0) and not args.csv_val:
        parser.error(f"--val-fraction: expected a fraction in (0, 1), got {args.val_fraction}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"--device: expected auto, cpu or cuda[:index], got {args.device!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.resume:
        _merge_resume_args(args, parser)
    return args


def _merge_resume_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Take the trajectory from the checkpoint; refuse an explicitly different value."""
    path = checkpoint_path(args.resume)
    if not os.path.isfile(path):
        parser.error(f"--resume: no checkpoint at {path!r}")
    try:
        saved = load_checkpoint(path)["args"]
    except InputError as err:
        parser.error(str(err))
    for key in TRAJECTORY_KEYS:
        mine, theirs, default = getattr(args, key), saved.get(key), parser.get_default(key)
        if mine != default and mine != theirs:
            parser.error(f"--{key.replace('_', '-')} {mine!r} differs from the checkpoint's {theirs!r} "
                         f"(resume continues the saved run; start a new run to change it)")
        setattr(args, key, theirs)
    if args.steps == parser.get_default("steps"):  # not given: the saved run's own total
        args.steps = saved["steps"]
    if args.out is None:
        args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))


# ---------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace):
    """(train, held-out) pairs, with every user-data problem raised here, before any training."""
    if args.csv:
        channels = args.channels or 3
        load = dict(img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=args.csv_separator,
                    image_size=args.image_size, channels=channels)
        data = load_csv_pairs(args.csv, **load)
        if args.csv_val:
            held_out = load_csv_pairs(args.csv_val, **load)
            # Labels ("which caption") must agree across the two files for retrieval.
            held_out.labels = _relabel_by_caption(held_out.captions)
            return data, held_out
        return split_pairs(data, args.val_fraction, args.seed)
    data = load_digits_pairs(args.image_size, args.channels or 1, seed=args.seed)
    return split_pairs(data, args.val_fraction, args.seed)


def _relabel_by_caption(captions: List[str]) -> Tensor:
    ids: Dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)


def build_tokenizer(train: PairedData, context_length: int) -> WordTokenizer:
    texts = list(train.captions) + synonym_words()
    if train.class_prompts:
        texts += [p for prompts in train.class_prompts for p in prompts]
    return WordTokenizer.from_texts(texts, context_length)


def model_config(args: argparse.Namespace, vocab_size: int, channels: int) -> dict:
    config = dict(vocab_size=vocab_size, context_length=args.context_length, image_size=args.image_size,
                  channels=channels, patch_size=args.patch_size, vision_width=args.width,
                  vision_layers=args.layers, vision_heads=args.heads, text_width=args.width,
                  text_layers=args.layers, text_heads=args.heads, embed_dim=args.embed_dim,
                  pad_id=PAD_ID)
    if args.model == "albef":
        config.update(fusion_layers=args.fusion_layers, queue_size=args.queue_size, momentum=args.momentum,
                      alpha=args.alpha, cls_id=CLS_ID, eos_id=EOS_ID,
                      mask_id=MASK_ID, num_special_tokens=NUM_SPECIAL_TOKENS)
    return config


# ----------------------------------------------------------------------------------- optimiser
def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with open_clip's split: no decay for gains, biases, embeddings, positions, the scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or "embed" in name and "patch_embed" not in name or "token" in name or "position" in name
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, data: PairedData, tokenizer: WordTokenizer, device: torch.device,
             chunk: int = 512) -> Dict[str, Optional[float]]:
    """Zero-shot accuracy (when the data has classes) and recall@1 in both directions."""
    was_training = model.training
    model.eval()
    try:
        images = torch.cat([model.encode_image(data.images[i:i + chunk].to(device)) for i in range(0, len(data), chunk)])
        tokens = tokenizer(data.captions)
        texts = torch.cat([model.encode_text(tokens[i:i + chunk].to(device)) for i in range(0, len(data), chunk)])
        labels = data.labels.to(device)
        sims = images.float() @ texts.float().T
        result: Dict[str, Optional[float]] = {
            "retrieval_r1": (labels[sims.argmax(1)] == labels).float().mean().item(),
            "retrieval_r1_t2i": (labels[sims.argmax(0)] == labels).float().mean().item(),
            "zero_shot_acc": None,
        }
        if data.class_prompts:
            per_class = len(data.class_prompts[0])
            prompts = tokenizer([p for ps in data.class_prompts for p in ps]).to(device)
            classes = model.encode_text(prompts).float().view(len(data.class_prompts), per_class, -1).mean(1)
            classes = torch.nn.functional.normalize(classes, dim=-1)
            result["zero_shot_acc"] = ((images.float() @ classes.T).argmax(1) == labels).float().mean().item()
        return result
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_path(path: str) -> str:
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _rng_states() -> dict:
    np_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuple(states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


def load_checkpoint(path: str) -> dict:
    # Only tensors, numbers, strings and containers are stored, so the safe loader reads it.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, another program's pickle, ...: one clear error
        raise InputError(f"--resume: cannot read {path!r} as an lsr-train checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"--resume: {path!r} is not an lsr-train checkpoint (no format {CHECKPOINT_FORMAT} marker)")
    return state


# -------------------------------------------------------------------------------------- training
def resolve_device(name: str, local_rank: Optional[int] = None) -> torch.device:
    """``--device`` as a device; ``local_rank`` (under torchrun) picks the GPU of ``auto`` / ``cuda``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


@dataclass
class Ranks:
    """Where this process stands in a data-parallel run (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: Whether :func:`join_process_group` created the process group (and so destroys it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous ``1/world`` of a global batch's ``rows``."""
        n = rows.shape[0] // self.world
        return rows[self.rank * n:(self.rank + 1) * n]


def join_process_group(device_name: str) -> Ranks:
    """The run's ranks: from an initialised default process group, else from torchrun's environment
    (``WORLD_SIZE`` > 1: the group is initialised here, NCCL for CUDA devices and gloo otherwise),
    else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def leave_process_group(finished: bool) -> None:
    """Destroy the process group :func:`join_process_group` created, after freeing what still holds it.

    ``finished``: every rank got through its work, so they wait for each other first (rank 0 still
    evaluates and writes the output folder after the others' last step) and tear gloo down together.
    After a failure there is no barrier: a rank that raised alone would leave the others waiting.

    DDP's reducer and gloo's finished work stay reachable through reference cycles; left to the
    interpreter's exit, their destructors run while it is being torn down and abort the process
    ("terminate called without an active exception")."""
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Ranks]:
    """The run's :class:`Ranks` (:func:`join_process_group`) for the ``with`` body; afterwards the
    group this call created is left, with the barrier only when the body finished without raising."""
    ranks = join_process_group(device_name)
    finished = False
    try:
        yield ranks
        finished = True
    finally:
        if ranks.owns_group:
            leave_process_group(finished)


def exit_worker(code: int) -> None:
    """End a torchrun worker whose group is destroyed and whose files are written, skipping the
    interpreter's teardown.

    torch itself keeps the destroyed default group referenced (ten references in torch 2.14, in a
    script that only all-reduces and destroys too), so its C++ side is freed during interpreter
    finalisation, where gloo's threads can no longer take the GIL (pytorch/pytorch#179291 describes
    the mechanism): std::terminate, SIGABRT, after a run whose work had all finished. CI saw it once
    on a 4-rank CPU run even after :func:`leave_process_group`'s collection; ``os._exit`` after the
    group is destroyed leaves no teardown to race.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class TrainingObjective(nn.Module):
    """``model.losses`` as ``forward``: DDP's gradient hooks only see calls of a module's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> Dict[str, Tensor]:
        return self.model.losses(*args, **kwargs)


def wrap_data_parallel(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module a step calls: ``model.losses`` directly, or under DDP when ``ranks.world > 1``.

    ``static_graph``: the parameters a step uses are the same every step, but not all of them (the
    separation heads are idle when that regulariser is off), which DDP then handles without a graph
    search per step. ``broadcast_buffers=False``: the only buffers (ALBEF's queues) are kept
    identical on every rank by the gathered enqueue; rank 0's copy need not be sent each step.
    """
    objective = TrainingObjective(model)
    if ranks.world == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 renamed broadcast_buffers (deprecated there) to forward_sync_buffers.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True, **no_buffer_sync)


def _step_streams(seed: int, step: int):
    """The step's random streams: a CPU torch generator and a Python RNG (for EDA)."""
    return (torch.Generator().manual_seed(mix_seed(seed, 0x5EED, step)), random.Random(mix_seed(seed, 0xEDA, step)))


def train(args: argparse.Namespace, *, stop_after: Optional[int] = None, log=print) -> dict:
    """Train (or resume) one run as ``args`` (from :func:`parse_args`) describe; return the metrics
    written to ``metrics.json``.

    ``stop_after``: stop after this many steps of *this call* (checkpoint written), as a pre-empted
    job would; ``--resume`` then continues the same trajectory.

    Under torchrun (or in a process whose default group is initialised) this is one rank of a
    data-parallel run (module docstring); ranks other than 0 return the per-step history only.
    """
    with process_group(args.device) as ranks:
        return _train(args, ranks, stop_after=stop_after, log=log if ranks.is_main else (lambda *a, **k: None))


def _raise_on_every_rank(problem: Optional[ValueError], ranks: Ranks, device: torch.device) -> None:
    """Raise ``problem`` (an input check's error) as an :class:`InputError`; under torchrun every rank
    raises one when any rank found a problem (the others: that another rank did), so that they all
    report and leave together rather than some waiting in training's first collective."""
    if ranks.world > 1:
        failed = torch.tensor(float(problem is not None), device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and problem is None:
            problem = InputError("another rank's input check failed (its error is reported there)")
    if isinstance(problem, InputError):
        raise problem
    if problem is not None:
        raise InputError(str(problem)) from problem


def _train(args: argparse.Namespace, ranks: Ranks, *, stop_after: Optional[int], log) -> dict:
    started = time.time()
    device = resolve_device(args.device, ranks.local_rank if ranks.world > 1 else None)
    out_dir = args.out or os.path.join("runs", f"{args.model}-{args.reg.replace(',', '+')}")
    weights = regulariser_weights(args)
    views = args.model == "clip" and any(w > 0 for w in weights.values())  # CLIP's regularisers need views
    problem: Optional[ValueError] = None
    try:  # every user-input problem surfaces here, before anything is trained
        train_data, held_out = load_data(args)
        if args.batch_size > len(train_data):
            raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train_data)} training pairs")
        if args.batch_size % ranks.world or args.batch_size // ranks.world < 2:
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) must split into {ranks.world} "
                             f"equal rank batches of at least 2 rows")
        resume_state = load_checkpoint(checkpoint_path(args.resume)) if args.resume else None
        if resume_state is not None and resume_state["step"] > args.steps:
            raise ValueError(f"--steps {args.steps} is below the checkpoint's step {resume_state['step']}")
        # What LSRLoss / the ITC loss will resolve to for this run's float32 [rows, embed_dim] features.
        sizes = resume_state["model_config"] if resume_state is not None else vars(args)
        rows = args.batch_size // ranks.world
        if args.model == "clip":
            op = backends.lsr_op(views, weights["sep"] > 0, weights["br"] > 0, weights["gc"] > 0)
            shape = (rows, sizes["embed_dim"], 0)
        else:
            op, shape = "itc", (rows, sizes["embed_dim"], sizes["queue_size"])
        backend = backends.resolve(args.backend, device, op, torch.float32, shape)
    except ValueError as err:
        problem = err
    _raise_on_every_rank(problem, ranks, device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed % 2 ** 32)

    if resume_state is not None:
        tokenizer = WordTokenizer.from_state_dict(resume_state["tokenizer"])
        config = resume_state["model_config"]
    else:
        tokenizer = build_tokenizer(train_data, args.context_length)
        config = model_config(args, tokenizer.vocab_size, train_data.images.shape[1])
    model = build_model(args.model, **config).to(device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    placement = {} if ranks.world == 1 else dict(
        rank=ranks.rank, world_size=ranks.world, local_loss=True, gather_with_grad=True,
        distributed_mode=args.distributed_mode)
    lsr = LSRLoss(sep_weight=weights["sep"], bridge_weight=weights["br"], gc_weight=weights["gc"], backend=args.backend,
                  **placement)
    history: List[dict] = []
    evals: List[dict] = []
    start = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        history, evals, start = list(resume_state["history"]), list(resume_state["evals"]), int(resume_state["step"])
        _set_rng_states(resume_state["rng"])
        log(f"resumed {args.model} from {checkpoint_path(args.resume)} at step {start}")

    image_aug = ImageAugment(hflip_p=args.hflip_p if args.hflip_p is not None else (0.5 if args.csv else 0.0))
    caption_aug = CaptionAugment(alpha=args.eda_alpha) if args.eda_alpha > 0 else None
    steps_per_epoch = len(train_data) // args.batch_size
    save_every = args.eval_every if args.save_every is None else args.save_every
    if ranks.is_main:
        os.makedirs(out_dir, exist_ok=True)
    ckpt_file = os.path.join(out_dir, CHECKPOINT_NAME)
    step_fn = wrap_data_parallel(model, ranks, device)

    def checkpoint(step: int) -> None:
        if not ranks.is_main:
            return
        save_checkpoint(ckpt_file, {
            "format": CHECKPOINT_FORMAT, "args": vars(args).copy(), "model_family": args.model,
            "model_config": config, "tokenizer": tokenizer.state_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "history": history, "evals": evals,
            "rng": _rng_states()})

    def run_eval(step: int) -> dict:  # rank 0 only
        result = {"step": step, **evaluate(model, held_out, tokenizer, device)}
        evals.append(result)
        return result

    pending: List[dict] = []  # this step's detached tensors; turned into floats in batches (fewer syncs)

    def flush() -> None:
        if ranks.world > 1 and pending:
            # Each rank's terms are its shares (local_loss=True); their mean over ranks is the global
            # value. One all-reduce per flush, on every rank alike (flushes happen at the same steps).
            keys = [k for k, v in pending[0].items() if isinstance(v, Tensor)]
            table = torch.stack([torch.stack([e[k].float() for k in keys]) for e in pending])
            dist.all_reduce(table)
            table = (table / ranks.world).tolist()
            for entry, values in zip(pending, table):
                entry.update(zip(keys, values))
        for entry in pending:
            row = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in entry.items()}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"the loss became {row['loss']} at step {row['step']} "
                                         f"(terms: {row}); lower --lr or the regulariser weights")
            history.append(row)
        pending.clear()

    placed = "" if ranks.world == 1 else f" x {ranks.world} ranks (DDP, {args.distributed_mode})"
    log(f"{args.model} | reg {args.reg} {_weights_text(weights)} | backend {args.backend} -> {backend} | "
        f"{len(train_data)} train / {len(held_out)} held-out pairs ({train_data.source}) | device {device}{placed} | "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters | out {out_dir}")
    end = args.steps if stop_after is None else min(args.steps, start + stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start, disable=args.no_progress or not ranks.is_main,
               desc=f"{args.model}/{args.reg}",
               dynamic_ncols=True)
    model.train()
    for step in range(start, end):
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_rows = batch_indices(len(train_data), args.batch_size, args.seed, step)
        rows = ranks.shard(global_rows)
        shard = (ranks.rank, ranks.world)
        generator, text_rng = _step_streams(args.seed, step)
        images = train_data.images[rows].to(device, non_blocking=True)
        captions = [train_data.captions[i] for i in rows.tolist()]
        text = tokenizer(captions).to(device, non_blocking=True)
        if args.model == "clip":
            if views:
                images_aug = image_aug(images, generator, shard)
                if caption_aug:  # drawn for the global batch (a few microseconds a caption), then sharded
                    all_captions = [train_data.captions[i] for i in global_rows.tolist()]
                    captions = list(ranks.shard(np.array(caption_aug(all_captions, text_rng), dtype=object)))
                text_aug = tokenizer(captions).to(device)
                terms = step_fn(images, text, lsr, images_aug, text_aug)
            else:
                terms = step_fn(images, text, lsr)
        else:
            # ALBEF trains on augmented images; the distillation weight ramps up over the first epoch.
            alpha = model.config.alpha * min(1.0, step / steps_per_epoch)
            terms = step_fn(image_aug(images, generator, shard), text, lsr, generator=generator,
                            pair_ids=train_data.labels[rows], alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        if args.model == "clip":
            model.clamp_logit_scale_()
        pending.append({"step": step + 1, "lr": lr, **{k: v.detach() for k, v in terms.items()}})
        bar.update(1)
        done = step + 1
        if done % 10 == 0 or done == end:
            flush()
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            flush()
            if ranks.is_main:
                result = run_eval(done)
                bar.write(f"step {done}: " + _metrics_text(result))
        if save_every and done % save_every == 0 and done != end:
            flush()
            checkpoint(done)
    bar.close()
    flush()
    final_step = history[-1]["step"] if history else start
    if not ranks.is_main:
        return {"rank": ranks.rank, "world_size": ranks.world, "steps": final_step, "history": history}
    if not evals or evals[-1]["step"] != final_step:
        run_eval(final_step)
    checkpoint(final_step)

    final = evals[-1]
    metrics = {
        "model": args.model, "reg": args.reg, "weights": weights, "backend": args.backend,
        "backend_resolved": backend, "device": str(device), "world_size": ranks.world,
        "steps": final_step, "target_steps": args.steps,
        "final_loss": history[-1]["loss"] if history else None,
        "final_terms": {k: v for k, v in history[-1].items() if k not in ("step", "lr")} if history else {},
        "zero_shot_acc": final["zero_shot_acc"], "retrieval_r1": final["retrieval_r1"],
        "retrieval_r1_t2i": final["retrieval_r1_t2i"], "dataset": train_data.source,
        "train_pairs": len(train_data), "held_out_pairs": len(held_out), "model_config": config,
        "args": {k: v for k, v in vars(args).items()}, "wall_time_s": round(time.time() - started, 2),
        "history": history, "evals": evals,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_curves(history, evals, os.path.join(out_dir, "curves.png"), title=f"{args.model} / reg {args.reg}")
    log(summary_table(metrics))
    return metrics


def _weights_text(weights: Dict[str, float]) -> str:
    on = {k: v for k, v in weights.items() if v > 0}
    return "(" + ", ".join(f"{k}={v:g}" for k, v in on.items()) + ")" if on else ""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_text(result: dict) -> str:
    return " | ".join(f"{k} {_fmt(v)}" for k, v in result.items() if k != "step")


def summary_table(metrics: dict) -> str:
    """The last step's terms and the final evaluation, one per line."""
    rows = [(k, v) for k, v in metrics["final_terms"].items()]
    rows += [("zero_shot_acc", metrics["zero_shot_acc"]), ("retrieval_r1 (i2t)", metrics["retrieval_r1"]),
             ("retrieval_r1_t2i", metrics["retrieval_r1_t2i"])]
    width = max(len(k) for k, _ in rows)
    head = f"{metrics['model']} | reg {metrics['reg']} | backend {metrics['backend_resolved']} | step {metrics['steps']}"
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {_fmt(v)}" for k, v in rows])


def plot_curves(history: List[dict], evals: List[dict], path: str, title: str = "") -> None:
    """Loss terms per step (left) and the held-out metrics per evaluation (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for key in history[0] if history else ():
        if key in ("step", "lr"):
            continue
        ax_loss.plot(steps, [h[key] for h in history], label=key, lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("value")
    ax_loss.set_yscale("symlog", linthresh=1e-2)
    ax_loss.set_title("training terms")
    ax_loss.legend(fontsize=7)
    for key in ("zero_shot_acc", "retrieval_r1", "retrieval_r1_t2i"):
        points = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
        if points:
            ax_eval.plot(*zip(*points), marker="o", label=key)
    ax_eval.set_xlabel("step")
    ax_eval.set_ylim(0, 1)
    ax_eval.set_title("held-out")
    ax_eval.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------- compare
def compare(args: argparse.Namespace, log=print) -> Dict[str, dict]:
    """One run per entry of :data:`COMPARE_RUNS` into ``<out>/<reg>``; prints the side-by-side table."""
    root = args.out or os.path.join("runs", f"{args.model}-compare")
    results: Dict[str, dict] = {}
    for reg in COMPARE_RUNS[args.model]:
        run_args = copy.copy(args)
        run_args.reg, run_args.out, run_args.compare = reg, os.path.join(root, reg), False
        results[reg] = train(run_args, log=log)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return results  # under torchrun, rank 0 has the evaluations and writes the table
    table = compare_table(args.model, results)
    log(table)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "compare.json"), "w") as f:
        json.dump({reg: {k: m[k] for k in ("reg", "weights", "backend_resolved", "steps", "final_loss", "zero_shot_acc",
                                           "retrieval_r1", "retrieval_r1_t2i", "wall_time_s")}
                   for reg, m in results.items()}, f, indent=1)
    with open(os.path.join(root, "compare.txt"), "w") as f:
        f.write(table + "\n")
    return results


def compare_table(model: str, results: Dict[str, dict]) -> str:
    name = {"clip": "CLIP", "albef": "ALBEF"}[model]
    rows = [("method", "zero-shot acc", "R@1 i2t", "R@1 t2i", "final loss")]
    for reg, m in results.items():
        label = name if reg == "none" else f"{name} + {'all (sep, br, gc)' if reg == 'all' else reg}"
        rows.append((label, _pct(m["zero_shot_acc"]), _pct(m["retrieval_r1"]), _pct(m["retrieval_r1_t2i"]),
                     _fmt(m["final_loss"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _report(error) -> int:
    """One clear line on stderr for an error found before training; the exit code for it."""
    print(f"lsr-train: error: {error}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    ranks, code = Ranks(), 0
    try:
        # Under torchrun the process group lives for the whole command (every --compare run shares it).
        with process_group(args.device) as ranks:
            try:
                if args.compare:
                    compare(args)
                else:
                    train(args)
            except InputError as err:
                # Bad data or configuration found before training, on every rank (_raise_on_every_rank):
                # reported inside the group, whose exit then waits for every rank to have reported (a
                # rank that exited first would have torchrun stop the others before they could).
                code = _report(err)
    except InputError as err:  # from joining the group itself
        code = _report(err)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        code = _report(f"{err.name} is missing: lsr-train needs the [train] extra "
                       f"(pip install 'lsr-kernels[train]', or -e '.[train]' in a checkout)")
    if ranks.owns_group:
        exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
