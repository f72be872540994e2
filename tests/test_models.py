"""The CLIP and ALBEF models, their building blocks, the data and the augmentations (CPU, tiny sizes).

Training-loop behaviour (backend parity over steps, resume, the CLI) is in tests/test_train.py.
"""
import copy
import csv
import random

import pytest
import torch

from lsr_kernels import LSRLoss
from lsr_kernels import reference as R
from lsr_kernels.augment import (SYNONYMS, CaptionAugment, ImageAugment, random_deletion, random_resized_crop,
                                 random_swap, synonym_replacement, synonym_words)
from lsr_kernels.data import (CLS_ID, DIGIT_WORDS, EOS_ID, MASK_ID, PAD_ID, UNK_ID, WordTokenizer, batch_indices,
                              load_csv_pairs, load_digits_pairs, split_pairs)
from lsr_kernels.models import ALBEF, ALBEFConfig, CLIP, CLIPConfig, build_model
from lsr_kernels.models.albef import _sample_hard_negatives, mask_tokens
from helpers import weighted_parts, weights_only

VOCAB = 40
TINY = dict(vocab_size=VOCAB, context_length=10, image_size=8, channels=1, patch_size=4, vision_width=16,
            vision_layers=1, vision_heads=2, text_width=16, text_layers=1, text_heads=2, embed_dim=8)


def _tokens(b, length=10, min_len=3, seed=0):
    """Random captions as token ids: [CLS] words [EOS] then padding."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((b, length), PAD_ID, dtype=torch.long)
    for i in range(b):
        n = int(torch.randint(min_len, length - 1, (1,), generator=g))
        out[i, 0] = CLS_ID
        out[i, 1:n + 1] = torch.randint(5, VOCAB, (n,), generator=g)
        out[i, n + 1] = EOS_ID
    return out


def _images(b, seed=0, size=8):
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _albef(**over):
    torch.manual_seed(0)
    return ALBEF(ALBEFConfig(**{**TINY, "fusion_layers": 1, "queue_size": 20, **over}))


# ------------------------------------------------------------------------------------------- CLIP
def test_clip_features_are_unit_rows_and_scale_is_clamped():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY))
    out = model(_images(5), _tokens(5), independent=True)
    for key in ("image_features", "text_features", "image_ind", "text_ind"):
        assert out[key].shape == (5, 8)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_clip_pools_at_eos_and_ignores_what_follows():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY))
    text = _tokens(4)
    noisy = text.clone()
    eos = (text == EOS_ID).float().argmax(1)
    for i, pos in enumerate(eos.tolist()):  # causal attention: tokens after [EOS] cannot matter
        noisy[i, pos + 1:] = torch.randint(5, VOCAB, (text.shape[1] - pos - 1,))
    hidden_a, hidden_b = model.text(text), model.text(noisy)
    rows = torch.arange(4)
    torch.testing.assert_close(hidden_a[rows, eos], hidden_b[rows, eos])


def test_clip_losses_match_the_reference_terms_and_reach_every_head():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY))
    images, text = _images(6), _tokens(6)
    images_aug, text_aug = _images(6, seed=1), _tokens(6, seed=1)
    loss_fn = LSRLoss(sep_weight=1.0, bridge_weight=1.0, gc_weight=0.25, backend="reference")
    out = model.losses(images, text, loss_fn, images_aug, text_aug)
    with torch.no_grad():
        a = model(images, text, independent=True)
        b = model(images_aug, text_aug, independent=True)
        terms = R.lsr_terms(a["image_features"], a["text_features"], a["logit_scale"],
                            image_aug=b["image_features"], text_aug=b["text_features"], image_ind=a["image_ind"],
                            text_ind=a["text_ind"], image_ind_aug=b["image_ind"], text_ind_aug=b["text_ind"],
                            separation=True, bridge=True, geometric=True)
    for key, value in weighted_parts(terms, sep_weight=1.0, bridge_weight=1.0, gc_weight=0.25).items():
        torch.testing.assert_close(out[key].detach(), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], sum(v for k, v in out.items() if k not in ("loss", "logit_scale")))
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.logit_scale.grad.abs() > 0


def test_clip_baseline_needs_no_views_and_leaves_independent_heads_alone():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY))
    out = model.losses(_images(4), _tokens(4), LSRLoss(**weights_only(), backend="reference"))
    assert set(out) == {"loss", "contrastive_loss", "logit_scale"}
    out["loss"].backward()
    assert model.image_ind_proj.linear.weight.grad is None
    with pytest.raises(ValueError, match="images_aug and text_aug"):
        model.losses(_images(4), _tokens(4), LSRLoss(**weights_only(), backend="reference"), images_aug=_images(4))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="CLIPConfig.embed_dim"):
        CLIPConfig(embed_dim=0)
    with pytest.raises(ValueError, match="patch_size"):
        CLIP(CLIPConfig(**{**TINY, "patch_size": 3}))
    with pytest.raises(ValueError, match="ALBEFConfig.momentum"):
        ALBEFConfig(momentum=1.0)
    with pytest.raises(ValueError, match="family"):
        build_model("blip")
    model = CLIP(CLIPConfig(**TINY))
    with pytest.raises(ValueError, match=r"images: expected \[B, 1, 8, 8\]"):
        model.encode_image(torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------------------------------ ALBEF
def test_albef_text_encoder_masks_padding():
    model = _albef()
    short = _tokens(3, length=8)
    padded = torch.nn.functional.pad(short, (0, 2), value=PAD_ID)  # the same captions, more padding
    torch.testing.assert_close(model.encode_text(padded), model.encode_text(short), rtol=1e-5, atol=1e-6)


def test_albef_momentum_update_is_an_ema_taken_before_the_features():
    model = _albef(momentum=0.9)
    with torch.no_grad():  # make online and momentum weights differ
        for p in model.visual_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    online = {n: p.detach().clone() for n, p in model.visual_encoder.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.visual_encoder_m.named_parameters()}
    model.losses(_images(4), _tokens(4), LSRLoss(**weights_only(), backend="reference"))
    for name, p_m in model.visual_encoder_m.named_parameters():
        torch.testing.assert_close(p_m, 0.9 * before[name] + 0.1 * online[name])
        assert not p_m.requires_grad


def test_albef_queue_holds_the_momentum_features_across_the_wrap_around():
    model = _albef(queue_size=20)
    loss_fn = LSRLoss(**weights_only(), backend="reference")
    batches = [(_images(8, seed=s), _tokens(8, seed=s)) for s in range(3)]
    for images, text in batches:
        model.losses(images, text, loss_fn)
    assert model.image_queue.ptr.item() == (3 * 8) % 20
    # The momentum weights are those the last call used (the EMA runs at the start of a call).
    with torch.no_grad():
        images, text = batches[-1]
        feat_m = model.vision_proj_m(model.visual_encoder_m(images)[:, 0])
        text_m = model.text_proj_m(model.text_encoder_m(text)[:, 0])
    slots = torch.tensor([16, 17, 18, 19, 0, 1, 2, 3])
    torch.testing.assert_close(model.image_queue.features[slots], feat_m)
    torch.testing.assert_close(model.text_queue.features[slots], text_m)


def test_albef_itc_term_equals_reference_with_queue_longer_than_batch():
    model = _albef(queue_size=20, alpha=0.4)
    images, text = _images(6), _tokens(6)
    queue_v, queue_t = model.image_queue.features.clone(), model.text_queue.features.clone()
    out = model.losses(images, text, LSRLoss(**weights_only(), backend="reference"), alpha=0.4)
    with torch.no_grad():
        v, t = model.encode_image(images), model.encode_text(text)
        vm = model.vision_proj_m(model.visual_encoder_m(images)[:, 0])
        tm = model.text_proj_m(model.text_encoder_m(text)[:, 0])
        expected = R.itc_loss(v, t, vm, tm, model.scale(), queue_v, queue_t, alpha=0.4)
    torch.testing.assert_close(out["itc_loss"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_albef_losses_all_terms_and_gradients():
    model = _albef()
    loss_fn = LSRLoss(sep_weight=1.0, bridge_weight=1.0, gc_weight=0.25, backend="reference")
    out = model.losses(_images(6), _tokens(6), loss_fn, generator=torch.Generator().manual_seed(1),
                       pair_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    expected = {"loss", "itc_loss", "itm_loss", "mlm_loss", "separation_loss", "bridge_loss", "geometric_loss",
                "logit_scale"}
    assert set(out) == expected
    # the regulariser terms come weighted, as LSRLoss's output_dict has them
    total = out["itc_loss"] + out["itm_loss"] + out["mlm_loss"] + out["separation_loss"] + out["bridge_loss"] \
        + out["geometric_loss"]
    torch.testing.assert_close(out["loss"], total)
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.split(".")[0].endswith("_m"):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.temp.grad.abs() > 0


def test_albef_itm_gradients_are_the_same_every_run():
    # At the default width the hard negatives' rows exceed the size where x[idx]'s backward adds
    # repeated rows with parallel atomics on a multi-threaded CPU (run-to-run differences, so a
    # resumed run did not repeat the uninterrupted one); index_select's backward adds in order.
    torch.manual_seed(0)
    config = ALBEFConfig(queue_size=64)
    model = ALBEF(config)
    b = 64
    images = torch.randn(b, 1, 16, 16)
    text = torch.randint(5, config.vocab_size, (b, 16))
    text[:, 0], text[:, -1], text[:20, 9:] = config.cls_id, config.eos_id, config.pad_id

    def itm_grads():
        trial = copy.deepcopy(model)
        out = trial.losses(images, text, LSRLoss(**weights_only(), backend="chunked"),
                           generator=torch.Generator().manual_seed(1), pair_ids=torch.arange(b) % 10)
        out["itm_loss"].backward()
        return {n: p.grad for n, p in trial.named_parameters() if p.grad is not None}

    first = itm_grads()
    for _ in range(3):
        assert all(torch.equal(first[n], g) for n, g in itm_grads().items())


def test_albef_losses_under_autocast():
    # the fp32 queues follow the features' dtype: under autocast they were a dtype mismatch for ITC
    model = _albef()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.losses(_images(4), _tokens(4), LSRLoss(backend="chunked"))
    assert torch.isfinite(out["loss"]) and model.image_queue.features.dtype == torch.float32
    out["loss"].backward()


def test_albef_temperature_is_clamped_and_batch_of_one_refused():
    model = _albef()
    with torch.no_grad():
        model.temp.fill_(3.0)
    out = model.losses(_images(3), _tokens(3), LSRLoss(**weights_only(), backend="reference"))
    assert model.temp.item() == pytest.approx(0.5)
    assert out["logit_scale"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model.losses(_images(1), _tokens(1), LSRLoss(**weights_only(), backend="reference"))


def test_hard_negatives_follow_softmax_and_skip_positives():
    sim = torch.tensor([[0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    ids = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([_sample_hard_negatives(sim, ids, ids, g) for _ in range(1500)])
    assert (draws != torch.arange(4)).all()
    probs = torch.softmax(sim, 1).masked_fill(torch.eye(4, dtype=torch.bool), 0)
    probs = probs / probs.sum(1, keepdim=True)
    freq = torch.stack([(draws == j).float().mean(0) for j in range(4)], 1)
    torch.testing.assert_close(freq, probs, atol=0.045, rtol=0)  # 3.5 sigma at 1500 draws
    # same pair id: never a negative; a row with no candidate falls back to uniform over the others
    same = torch.tensor([0, 0, 1, 1])
    draws = torch.stack([_sample_hard_negatives(sim, same, same, g) for _ in range(200)])
    assert (same[draws] != same).all()
    all_same = torch.zeros(4, dtype=torch.long)
    draws = torch.stack([_sample_hard_negatives(sim, all_same, all_same, g) for _ in range(200)])
    assert (draws != torch.arange(4)).all()


def test_hard_negatives_at_a_large_scale_keep_to_the_allowed_columns():
    """Logits 100 x cosine: a row's own pair dominates so far that softmax weights of the others
    underflow to 0 in fp32. The draw must still be the most similar allowed column (the limit of the
    softmax), never a same-id column, and never uniform noise."""
    sim = 100.0 * torch.tensor([[1.0, 0.9, -0.5, -0.6, -0.7], [0.9, 1.0, -0.5, -0.6, -0.7],
                                [-0.5, -0.5, 1.0, -0.2, -0.9], [-0.6, -0.6, -0.2, 1.0, -0.8],
                                [-0.6, -0.8, -0.9, -0.85, 1.0]])
    ids = torch.tensor([0, 0, 1, 2, 3])  # rows 0 and 1 describe the same image
    assert (torch.softmax(sim, 1).masked_fill(ids[:, None] == ids[None, :], 0).sum(1)[:2] == 0).all()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([_sample_hard_negatives(sim, ids, ids, g) for _ in range(50)])
    assert (draws == torch.tensor([2, 2, 3, 2, 0])).all()


def test_sharded_draws_are_the_rows_of_the_global_draws():
    """Data parallel: a rank holding rows r n .. (r + 1) n draws its hard negatives and MLM masks as
    the single process draws them for those rows."""
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 2, 0, 1, 5])
    full = _sample_hard_negatives(sim, ids, ids, torch.Generator().manual_seed(3))
    parts = [_sample_hard_negatives(sim[r * 3:(r + 1) * 3], ids[r * 3:(r + 1) * 3], ids,
                                    torch.Generator().manual_seed(3), r * 3) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)
    config = ALBEFConfig(**{**TINY, "fusion_layers": 1})
    text = _tokens(6, length=10, seed=2)
    full = mask_tokens(text, config, torch.Generator().manual_seed(4))
    parts = [mask_tokens(text[r * 2:(r + 1) * 2], config, torch.Generator().manual_seed(4), shard=(r, 3))
             for r in range(3)]
    for k in range(2):
        assert torch.equal(torch.cat([p[k] for p in parts]), full[k])


def test_mlm_masking_rates_and_special_tokens():
    config = ALBEFConfig(**{**TINY, "fusion_layers": 1})
    text = _tokens(2000, length=10, seed=3)
    inputs, labels = mask_tokens(text, config, torch.Generator().manual_seed(0))
    special = (text == PAD_ID) | (text == CLS_ID) | (text == EOS_ID)
    chosen = labels != -100
    assert not (chosen & special).any()
    torch.testing.assert_close(labels[chosen], text[chosen])
    assert (inputs[~chosen] == text[~chosen]).all()
    rate = chosen.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.01
    masked = (inputs[chosen] == MASK_ID).float().mean().item()
    kept = (inputs[chosen] == text[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.03
    assert abs(kept - 0.1) < 0.02 + 1 / VOCAB  # a random word may equal the original
    assert (inputs[chosen] >= 5).logical_or(inputs[chosen] == MASK_ID).all()


# ------------------------------------------------------------------------------------ augmentation
def test_random_resized_crop_identity_flip_and_seed():
    x = torch.randn(3, 2, 8, 8)
    ident = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(ident, x, rtol=1e-5, atol=1e-5)
    flipped = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=1e-5, atol=1e-5)
    aug = ImageAugment(scale=(0.3, 0.6))
    a, b = aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    # a crop inside the image: values stay in the input's range
    assert a.min() >= x.min() - 1e-5 and a.max() <= x.max() + 1e-5
    with pytest.raises(ValueError, match="scale"):
        ImageAugment(scale=(0.0, 1.0))


def test_eda_operations():
    rng = random.Random(0)
    words = "a handwritten digit seven on a grid".split()
    assert sorted(random_swap(words, 3, rng)) == sorted(words)
    for _ in range(20):
        assert len(random_deletion(words, 0.99, rng)) >= 1
    replaced = synonym_replacement(words, 2, rng)
    changed = [w for w in replaced if w not in words]
    assert changed and all(any(c in alts for alts in SYNONYMS.values()) for c in changed)
    aug = CaptionAugment(alpha=0.2)
    captions = ["a handwritten digit seven", "the number 7 written by hand"] * 4
    assert aug(captions, random.Random(1)) == aug(captions, random.Random(1))
    assert aug(captions, random.Random(1)) != captions
    with pytest.raises(ValueError, match="ops"):
        CaptionAugment(ops=("shuffle",))


# -------------------------------------------------------------------------------------------- data
def test_tokenizer_encodes_truncates_and_round_trips():
    tok = WordTokenizer.from_texts(["a handwritten digit seven", "the digit 7"], context_length=5)
    ids = tok(["a digit seven", "a handwritten digit seven the", "zebra"])
    assert ids.shape == (3, 5)
    assert ids[0].tolist()[:5] == [CLS_ID, tok.index["a"], tok.index["digit"], tok.index["seven"], EOS_ID]
    assert ids[1, -1] == EOS_ID  # truncated, [EOS] kept
    assert ids[2].tolist() == [CLS_ID, UNK_ID, EOS_ID, PAD_ID, PAD_ID]
    assert tok.decode(ids[0]) == "a digit seven"
    again = WordTokenizer.from_state_dict(tok.state_dict())
    assert torch.equal(again(["a digit seven"]), ids[:1])


def test_digits_pairs_split_and_batches():
    data = load_digits_pairs(image_size=16, channels=3, seed=0)
    assert data.images.shape == (1797, 3, 16, 16)
    assert data.images.min() >= -1 and data.images.max() <= 1
    for caption, label in zip(data.captions[:50], data.labels[:50].tolist()):
        words = caption.split()
        assert DIGIT_WORDS[label] in words or str(label) in words
    train, held_out = split_pairs(data, 0.2, seed=0)
    assert len(train) + len(held_out) == 1797
    assert torch.bincount(held_out.labels).min() >= 30  # stratified
    tok_words = set(synonym_words())
    assert {"numeral", "sketch"} <= tok_words
    epoch = torch.cat([batch_indices(100, 30, seed=1, step=s) for s in range(3)])
    assert len(set(epoch.tolist())) == 90  # one epoch: no row twice
    assert torch.equal(batch_indices(100, 30, 1, 4), batch_indices(100, 30, 1, 4))
    assert not torch.equal(batch_indices(100, 30, 1, 3), batch_indices(100, 30, 1, 0))
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 11, 0, 0)


def _write_csv(tmp_path, rows, header=("filepath", "title"), sep="\t"):
    path = tmp_path / "pairs.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _write_images(tmp_path, n):
    from PIL import Image

    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.new("RGB", (12 + i, 10), color=(20 * i % 255, 40, 200)).save(tmp_path / name)
        names.append(name)
    return names


def test_csv_loader_reads_open_clip_format(tmp_path):
    names = _write_images(tmp_path, 4)
    path = _write_csv(tmp_path, [(n, f"a photo number {i % 2}") for i, n in enumerate(names)])
    data = load_csv_pairs(path, image_size=8, channels=3)
    assert data.images.shape == (4, 3, 8, 8)
    assert data.labels.tolist() == [0, 1, 0, 1]  # identical captions share an id
    assert data.class_prompts is None


def test_csv_loader_errors_name_the_option(tmp_path):
    names = _write_images(tmp_path, 2)
    path = _write_csv(tmp_path, [(n, "a caption") for n in names])
    with pytest.raises(ValueError, match="--csv-caption-key: column 'caption'"):
        load_csv_pairs(path, caption_key="caption")
    with pytest.raises(ValueError, match="--csv-img-key"):
        load_csv_pairs(path, img_key="image", separator=",")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad = _write_csv(tmp_path, [(names[0], "ok"), ("broken.png", "bad")])
    with pytest.raises(ValueError, match="line 3: cannot read image .*broken.png"):
        load_csv_pairs(bad)
    with pytest.raises(ValueError, match="no such file"):
        load_csv_pairs(str(tmp_path / "missing.tsv"))
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("filepath\ttitle\nimg0.png\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="--csv: .*latin1.tsv' is not a readable UTF-8 CSV file"):
        load_csv_pairs(str(latin1))
    huge = _write_csv(tmp_path, [(names[0], "x" * 200_000)])  # past the csv module's field limit
    with pytest.raises(ValueError, match="--csv: .*pairs.tsv' is not a readable UTF-8 CSV file: field larger"):
        load_csv_pairs(huge)
