"""Public API: keys and weights, modules, the queue, backend resolution, and every bad input of SPEC 6."""
import subprocess
import sys

import pytest
import torch

import lsr_kernels
from lsr_kernels import FeatureQueue, ITCLoss, LSRLoss, backends, reference as R
from helpers import ALL_ON, backend_available, lsr_inputs, rel_err, unit_rows, weights_only

open_clip_loss = pytest.importorskip("open_clip.loss")



def _call(feats, s, **kw):
    return lsr_kernels.lsr_loss(feats["image_features"], feats["text_features"], s,
                                **{k: v for k, v in feats.items() if k not in ("image_features", "text_features")},
                                **kw)


def test_lsr_loss_keys_and_weighted_total():
    feats, s = lsr_inputs(9, 5)
    plain = _call(feats, s, backend="reference", **weights_only())
    assert set(plain) == {"loss", "contrastive_loss"}
    out = _call(feats, s, backend="reference", sep_weight=0.5, bridge_weight=2.0, gc_weight=0.25)
    assert set(out) == {"loss", "contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"}
    total = out["contrastive_loss"] + 0.5 * out["separation_loss"] + 2.0 * out["bridge_loss"] \
        + 0.25 * out["geometric_loss"]
    assert rel_err(out["loss"], total) < 1e-7
    assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0


def test_default_weights_are_the_papers():
    feats, s = lsr_inputs(5, 4)
    default = _call(feats, s, backend="reference")
    assert set(default) == {"loss", "contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"}
    assert rel_err(default["loss"], _call(feats, s, backend="reference", **ALL_ON)["loss"]) < 1e-7
    module = LSRLoss()
    assert (module.sep_weight, module.bridge_weight, module.gc_weight) == (1.0, 1.0, 0.25)
    # what the default terms need is asked for by name, not silently dropped
    with pytest.raises(ValueError, match="separation .* image_ind, text_ind, image_ind_aug, text_ind_aug are missing"):
        lsr_kernels.lsr_loss(feats["image_features"], feats["text_features"], s)
    with pytest.raises(ValueError, match="the bridge .* image_aug is missing"):
        lsr_kernels.lsr_loss(feats["image_features"], feats["text_features"], s, sep_weight=0.0)


def test_weights_switch_terms_and_inputs_become_optional():
    v, t = unit_rows(6, 4), unit_rows(6, 4)
    s = torch.tensor(5.0)
    out = lsr_kernels.lsr_loss(v, t, s, **weights_only(gc_weight=1.0), backend="reference")
    assert set(out) == {"loss", "contrastive_loss", "geometric_loss"}
    va = unit_rows(6, 4)
    out = lsr_kernels.lsr_loss(v, t, s, image_aug=va, **weights_only(bridge_weight=1.0), backend="reference")
    assert set(out) == {"loss", "contrastive_loss", "bridge_loss"}
    # image_aug alone (bridge only) leaves the contrastive term in its two-view form
    assert rel_err(out["contrastive_loss"], R.contrastive_loss(v, t, s)) < 1e-7


def test_clip_loss_and_module_match_open_clip_dropin():
    v, t = unit_rows(33, 16), unit_rows(33, 16)
    s = torch.tensor(20.0, requires_grad=True)
    theirs = open_clip_loss.ClipLoss()(v, t, s)
    for loss in (lsr_kernels.clip_loss(v, t, s, backend="reference"),
                 lsr_kernels.ClipLoss(backend="reference")(v, t, s),
                 lsr_kernels.ClipLoss(backend="reference")(v, t, s, output_dict=True)["contrastive_loss"]):
        assert rel_err(loss, theirs) < 1e-6


def test_clip_module_logit_bias_as_open_clip():
    v, t = unit_rows(8, 4), unit_rows(8, 4)
    s = torch.tensor(10.0)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = lsr_kernels.ClipLoss(backend="reference")(v, t, s, bias)
    bias_theirs = bias.detach().clone().requires_grad_()
    theirs = open_clip_loss.ClipLoss()(v, t, s, bias_theirs)
    assert rel_err(ours, theirs) < 1e-6 and ours.dtype == torch.float32
    # in the graph with a zero gradient (DDP needs every parameter to get one), as in open_clip
    (g,) = torch.autograd.grad(ours, [bias])
    assert g is not None and torch.count_nonzero(g) == 0
    assert rel_err(lsr_kernels.ClipLoss(backend="reference")(v, t, s, 0.5), theirs) < 1e-6
    # a per-column bias changes open_clip's loss: refused, not silently dropped
    with pytest.raises(ValueError, match=r"logit_bias: expected a scalar .* got shape \(8,\)"):
        lsr_kernels.ClipLoss()(v, t, s, torch.linspace(-2, 2, 8))
    with pytest.raises(TypeError, match="logit_bias: expected None, a number or a scalar tensor, got str"):
        lsr_kernels.ClipLoss()(v, t, s, "bias")


def test_out_of_range_scale_under_torch_compile_gives_nan_not_a_number():
    # eager raises (a host sync); a compiled graph cannot, so the loss becomes NaN instead of finite
    torch._dynamo.reset()
    v, t = unit_rows(4, 3), unit_rows(4, 3)
    compiled = torch.compile(lambda a, b, s: lsr_kernels.clip_loss(a, b, s, backend="reference"), backend="eager")
    for bad in (-5.0, 0.0, float("nan"), 2e6):
        assert torch.isnan(compiled(v, t, torch.tensor(bad)))
    s = torch.tensor(3.0, requires_grad=True)
    eager = lsr_kernels.clip_loss(v, t, s, backend="reference")
    loss = compiled(v, t, s)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(torch.autograd.grad(loss, [s])[0], torch.autograd.grad(eager, [s])[0])


def test_lsr_module_and_itc_module():
    feats, s = lsr_inputs(7, 6)
    mod = LSRLoss(**ALL_ON, backend="reference")
    kw = {k: v for k, v in feats.items() if k not in ("image_features", "text_features")}
    total = mod(feats["image_features"], feats["text_features"], s, **kw)
    assert total.dim() == 0
    assert rel_err(total, _call(feats, s, backend="reference", **ALL_ON)["loss"]) < 1e-7
    v, t, vm, tm = (feats[k] for k in ("image_features", "text_features", "image_aug", "text_aug"))
    q = unit_rows(12, 6, requires_grad=False)
    loss = ITCLoss(alpha=0.3, backend="reference")(v, t, vm, tm, s, image_queue=q, text_queue=q)
    assert rel_err(loss, R.itc_loss(v, t, vm, tm, s, q, q, 0.3)) < 1e-7


def test_lsr_module_output_dict_sums_to_the_total_as_open_clip_sums_it():
    """open_clip's training loop: ``losses = loss(**model_out, output_dict=True)``, then
    ``total_loss = sum(losses.values())``. The values are the weighted terms (no total among them,
    which the sum would count twice); ``logit_bias`` in ``model_out`` is taken as ClipLoss takes it."""
    feats, s = lsr_inputs(7, 6)
    weights = dict(sep_weight=0.5, bridge_weight=2.0, gc_weight=0.25)
    want = _call(feats, s, backend="reference", **weights)
    bias = torch.tensor(-10.0, requires_grad=True)
    model_out = {**feats, "logit_scale": s, "logit_bias": bias}
    losses = LSRLoss(**weights, backend="reference")(**model_out, output_dict=True)
    assert set(losses) == {"contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"}
    assert rel_err(losses["separation_loss"], 0.5 * want["separation_loss"]) < 1e-7
    assert rel_err(losses["bridge_loss"], 2.0 * want["bridge_loss"]) < 1e-7
    total_loss = sum(losses.values())
    assert rel_err(total_loss, want["loss"]) < 1e-6
    g_bias, g_s = torch.autograd.grad(total_loss, [bias, s])
    assert g_bias.item() == 0.0
    assert rel_err(g_s, torch.autograd.grad(want["loss"], [s])[0]) < 1e-6
    plain = LSRLoss(**weights_only(), backend="reference")(**model_out, output_dict=True)
    assert set(plain) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="logit_bias: expected a scalar"):
        LSRLoss(**weights, backend="reference")(**{**model_out, "logit_bias": torch.zeros(7, 7)})


def test_modules_print_their_settings():
    """print(model) shows each loss's hyper-parameters and backend (and its placement when distributed)."""
    assert repr(LSRLoss(sep_weight=0.5, backend="chunked")) == (
        "LSRLoss(sep_weight=0.5, bridge_weight=1.0, gc_weight=0.25, bridge_t=0.25, uniformity_t=2.0, "
        "backend='chunked')")
    assert repr(lsr_kernels.ClipLoss()) == "ClipLoss(backend='auto')"
    assert repr(ITCLoss(alpha=0.3, rank=1, world_size=2, local_loss=True, gather_with_grad=True)) == (
        "ITCLoss(alpha=0.3, backend='auto', rank=1, world_size=2, local_loss=True, gather_with_grad=True, "
        "distributed_mode='gather')")


def test_logit_scale_as_number_and_shape_one():
    v, t = unit_rows(5, 3), unit_rows(5, 3)
    ref = lsr_kernels.clip_loss(v, t, torch.tensor(7.0), backend="reference")
    assert rel_err(lsr_kernels.clip_loss(v, t, 7.0, backend="reference"), ref) < 1e-7
    assert rel_err(lsr_kernels.clip_loss(v, t, torch.tensor([7.0]), backend="reference"), ref) < 1e-7


def test_non_contiguous_inputs():
    v = unit_rows(8, 12).detach()[:, ::2]
    t = unit_rows(12, 8).detach().T
    s = torch.tensor(3.0)
    a = lsr_kernels.lsr_loss(v, t[:, :6], s, **weights_only(gc_weight=1.0), backend="reference")
    b = lsr_kernels.lsr_loss(v.contiguous(), t[:, :6].contiguous(), s, **weights_only(gc_weight=1.0),
                             backend="reference")
    assert rel_err(a["loss"], b["loss"]) < 1e-7


# ------------------------------------------------------------------------------------ the queue
def test_queue_wraps_around_like_one_row_at_a_time():
    for size, batches in [(5, [2, 2, 2, 3]), (4, [4, 4]), (3, [7]), (6, [0, 1, 5, 8])]:
        queue = FeatureQueue(size, 2)
        expected = queue.features.clone()
        ptr = 0
        counter = 0
        for b in batches:
            rows = torch.arange(counter, counter + b, dtype=torch.float32)[:, None].repeat(1, 2)
            counter += b
            queue.enqueue(rows)
            for r in rows:
                expected[ptr] = r
                ptr = (ptr + 1) % size
            assert torch.equal(queue.features, expected), (size, batches)
            assert int(queue.ptr) == ptr


def test_queue_state_is_in_the_state_dict_and_rejects_wrong_width():
    queue = FeatureQueue(4, 3)
    assert set(queue.state_dict()) == {"features", "ptr"}
    assert torch.allclose(queue.features.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match=r"rows: expected \[B, 3\]"):
        queue.enqueue(torch.zeros(2, 4))


# ----------------------------------------------------------------------------- backend selection
def test_backend_resolution_rule():
    assert backends.resolve("auto", torch.device("cpu")) == "chunked"
    assert backends.resolve("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend"):
        backends.resolve("fast", torch.device("cpu"))


@pytest.mark.parametrize("version,usable", [("3.4.0", False), ("2.3.0", False), ("3.5.0", True),
                                            ("3.10.0+git1a2b3c", True), ("main", True)])
def test_triton_older_than_the_kernels_need_is_not_chosen(monkeypatch, version, usable):
    """A Triton whose compiler lacks what the kernels use (tl.range(flatten=...), fp64 tl.dot) is not
    this backend: auto on a GPU without a measurement falls back to chunked."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    reason = backends.triton_unusable_reason()
    assert (reason is None) == usable, reason
    if not usable:
        assert f"Triton {version} is installed; the kernels need Triton >= 3.5" in reason
    assert backends.resolve("auto", torch.device("cuda")) == ("triton" if usable else "chunked")


def test_triton_backend_with_an_old_triton_says_what_it_needs():
    pytest.importorskip("triton")
    script = ("import triton; triton.__version__ = '3.2.0'\n"
              "from lsr_kernels.backends import triton as T")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("ImportError: backend='triton': Triton 3.2.0 is installed; the kernels need Triton >= 3.5 "
            "(torch >= 2.9 brings it). Install a newer Triton (or torch) or choose backend='chunked'") in proc.stderr


# ----------------------------------------------------------------------------------- bad inputs
def _bad(match, exc=ValueError, **overrides):
    feats, s = lsr_inputs(6, 4)
    kw = dict(backend="reference")
    args = dict(feats)
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    scale = kw.pop("logit_scale", s)
    with pytest.raises(exc, match=match):
        lsr_kernels.lsr_loss(args.pop("image_features"), args.pop("text_features"), scale, **args, **kw)


@pytest.mark.parametrize("case", [
    dict(match=r"image_features: expected a 2-D \[N, D\].*shape \(6,\)", image_features=torch.zeros(6)),
    dict(match=r"text_features: batch size N = 5 does not match image_features's N = 6",
         text_features=torch.zeros(5, 4)),
    dict(match=r"image_aug: feature width D = 3 does not match", image_aug=torch.zeros(6, 3)),
    dict(match=r"text_ind: dtype torch.float64 differs from image_features's torch.float32 \(got shape \(6, 4\), "
               r"dtype torch.float64, device cpu, image_features has shape \(6, 4\)", exc=TypeError, text_ind=torch.zeros(6, 4, dtype=torch.float64),
         sep_weight=1.0),
    dict(match=r"image_features: expected float16.*torch.int64", exc=TypeError,
         image_features=torch.zeros(6, 4, dtype=torch.long)),
    dict(match=r"image_features: empty batch", image_features=torch.zeros(0, 4), text_features=torch.zeros(0, 4)),
    dict(match=r"image_features: expected a torch.Tensor, got list", exc=TypeError, image_features=[[1.0]]),
    dict(match=r"logit_scale: expected a scalar.*shape \(2,\)", logit_scale=torch.ones(2)),
    dict(match=r"logit_scale: expected a finite positive", logit_scale=torch.tensor(0.0)),
    dict(match=r"logit_scale: expected a finite positive", logit_scale=torch.tensor(-3.0)),
    dict(match=r"logit_scale: expected a finite positive", logit_scale=torch.tensor(float("nan"))),
    dict(match=r"logit_scale: expected a floating", exc=TypeError, logit_scale=torch.tensor(3)),
    dict(match=r"bridge_t: expected a number in \(0.0, 1.0\), got 1.0", bridge_t=1.0, bridge_weight=1.0),
    dict(match=r"bridge_t: expected a number in \(0.0, 1.0\), got 0", bridge_t=0),
    dict(match=r"uniformity_t: expected a finite positive", uniformity_t=-1.0),
    dict(match=r"sep_weight: expected a finite weight >= 0", sep_weight=-1.0),
    dict(match=r"backend: expected one of", backend="fastest"),
    dict(match=r"separation \(sep_weight > 0\) is on but image_ind_aug, text_ind_aug are missing",
         image_ind_aug=None, text_ind_aug=None, sep_weight=1.0),
    dict(match=r"bridge \(bridge_weight > 0\) is on but image_aug is missing",
         image_aug=None, text_aug=None, bridge_weight=1.0),
    dict(match=r"text_aug was given without image_aug", image_aug=None),
    dict(match=r"image_features: expected a torch.Tensor, got None", exc=TypeError, image_features=None),
    dict(match=r"text_features: expected a torch.Tensor, got None", exc=TypeError, text_features=None),
    dict(match=r"text_features: expected a dense \(strided\) tensor, got layout torch.sparse_coo", exc=TypeError,
         text_features=unit_rows(6, 4).detach().to_sparse()),
    dict(match=r"logit_scale: expected a finite positive multiplier of at most 1e\+06 .*got 1e\+39", logit_scale=1e39),
    dict(match=r"logit_scale: .*of at most 1e\+06 .*got 1e\+39", logit_scale=torch.tensor(1e39, dtype=torch.float64)),
    # Past the ceiling the fused kernels' -1e30 padding would count in the softmax: a wrong number.
    dict(match=r"logit_scale: .*of at most 1e\+06 .*got 1e\+30", logit_scale=torch.tensor(1e30, dtype=torch.float64)),
    dict(match=r"logit_scale: .*of at most 1e\+06 .*got 1000001.0", logit_scale=1e6 + 1),
    dict(match=r"logit_scale: expected a finite positive", logit_scale=float("inf")),
    dict(match=r"uniformity_t: expected at most 10000", uniformity_t=1e6),
    dict(match=r"gc_weight: expected a Python number, got a Tensor", exc=TypeError, gc_weight=torch.tensor(0.5)),
    dict(match=r"sep_weight: expected a number, got str", exc=TypeError, sep_weight="1"),
])
def test_bad_lsr_inputs(case):
    _bad(**case)


def test_bad_device_names_argument():
    v = unit_rows(4, 3)
    with pytest.raises(ValueError, match=r"text_features: device meta differs from image_features's cpu \(got "
                                         r"shape \(4, 3\), dtype torch.float32, device meta, image_features has "
                                         r"shape \(4, 3\)\)"):
        lsr_kernels.clip_loss(v, torch.zeros(4, 3, device="meta"), 1.0, backend="reference")
    with pytest.raises(ValueError, match=r"logit_scale: device meta differs from the features' cpu \(logit_scale "
                                         r"has shape \(\), the features \(4, 3\)\)"):
        lsr_kernels.clip_loss(v, v, torch.tensor(1.0, device="meta"), backend="reference")


def test_import_stays_light():
    """``import lsr_kernels`` loads no backend module and not torch._dynamo (about a second, and with a
    sanitizer preloaded, C++ exceptions it throws at import broke scripts/cuda_emu_sanitize.py)."""
    code = ("import sys, lsr_kernels; print(sorted(m for m in sys.modules if m.startswith("
            "('torch._dynamo', 'lsr_kernels.backends.', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_bad_features_next_to_a_tensor_logit_bias_name_the_features():
    v = unit_rows(4, 3)
    with pytest.raises(TypeError, match=r"image_features: expected a torch.Tensor, got NoneType"):
        lsr_kernels.ClipLoss()(None, v, 10.0, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"image_features: expected a torch.Tensor, got list"):
        lsr_kernels.ClipLoss()(v.tolist(), v, 10.0, torch.zeros(2))


@pytest.mark.parametrize("kw,name", [(dict(logit_scale=10**400), "logit_scale"),
                                     (dict(sep_weight=10**400), "sep_weight"),
                                     (dict(uniformity_t=10**400), "uniformity_t")])
def test_integers_past_floats_range_name_the_argument(kw, name):
    v = unit_rows(4, 3)
    kw = {"logit_scale": 10.0, **weights_only(), **kw}
    with pytest.raises(ValueError, match=rf"^{name}: an integer of 1329 bits is too large for a float"):
        lsr_kernels.lsr_loss(v, v, kw.pop("logit_scale"), backend="reference", **kw)
    with pytest.raises(ValueError, match=r"^alpha: an integer of 16610 bits is too large for a float"):
        lsr_kernels.itc_loss(v, v, v, v, 10.0, alpha=10**5000, backend="reference")  # (str() refuses it)


def test_kernel_backend_on_cpu_tensors_names_the_api_argument(monkeypatch):
    """An explicit triton/cuda backend on CPU features is refused before any primitive runs, naming the
    argument the caller passed (not a primitive's operand)."""
    v = unit_rows(4, 3)
    with pytest.raises(ValueError, match=r"^image_features: backend='cuda' needs CUDA tensors, got device cpu "
                                         r"\(shape \(4, 3\)\)"):
        lsr_kernels.clip_loss(v, v, 1.0, backend="cuda")
    with pytest.raises(ValueError, match=r"^image_features: backend='cuda'"):
        lsr_kernels.itc_loss(v, v, v, v, 1.0, backend="cuda")
    if backends.triton_unusable_reason() is None:
        from lsr_kernels.backends.triton import _common
        monkeypatch.setattr(_common, "interpreting", lambda: False)
        with pytest.raises(ValueError, match=r"^image_features: the triton backend needs CUDA tensors"):
            lsr_kernels.clip_loss(v, v, 1.0, backend="triton")
        with pytest.raises(ValueError, match=r"^image_features: the triton backend needs CUDA tensors"):
            lsr_kernels.itc_loss(v, v, v, v, 1.0, backend="triton")


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_meta_inputs_trace_shapes(backend):
    """Meta tensors (shape inference, no data): the scale's value check is skipped, nothing reads data."""
    v, t = torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")
    for scale in (5.0, torch.tensor(5.0, device="meta")):
        loss = lsr_kernels.clip_loss(v, t, scale, backend=backend)
        assert loss.device.type == "meta" and loss.shape == ()


def test_largest_logit_scale_is_accepted_and_exact():
    """s = 1e6 on a lone pair at cosine -1: the loss and its gradients are exactly 0 on every backend
    that runs here (a padded column counting in the softmax would make them 1e6-sized)."""
    v = unit_rows(1, 8).detach()
    for backend in ["reference", "chunked"] + (["triton"] if backend_available("triton") else []):
        a, b, s = v.clone().requires_grad_(), (-v).clone().requires_grad_(), torch.tensor(1e6, requires_grad=True)
        loss = lsr_kernels.clip_loss(a, b, s, backend=backend)
        loss.backward()
        assert loss.item() == 0.0, backend
        assert s.grad.item() == 0.0 and not a.grad.any() and not b.grad.any(), backend


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), r"alpha: expected a number in \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha: expected a number in \[0, 1\]"),
    (dict(image_queue=torch.zeros(10, 5)), r"image_queue: feature width D = 5 does not match image_features's D = 4"),
    (dict(text_queue=torch.zeros(4, 10)), r"text_queue: feature width D = 10 .*ALBEF's queue buffers are \[D, K\]: "
                                          r"pass text_queue\.T\)"),
    (dict(text_queue=torch.zeros(10)), r"text_queue: expected a 2-D"),
])
def test_bad_itc_inputs(kw, match):
    v, t, vm, tm = (unit_rows(6, 4) for _ in range(4))
    with pytest.raises(ValueError, match=match):
        lsr_kernels.itc_loss(v, t, vm, tm, torch.tensor(10.0), backend="reference", **kw)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("missing", ["image_features", "text_features", "image_features_m", "text_features_m"])
def test_itc_missing_feature_names_it(backend, missing):
    args = {k: unit_rows(6, 4) for k in ("image_features", "text_features", "image_features_m", "text_features_m")}
    args[missing] = None
    with pytest.raises(TypeError, match=rf"{missing}: expected a torch.Tensor, got None"):
        lsr_kernels.itc_loss(*args.values(), torch.tensor(10.0), backend=backend)


def test_itc_alpha_must_be_a_number():
    v, t, vm, tm = (unit_rows(6, 4) for _ in range(4))
    with pytest.raises(TypeError, match=r"alpha: expected a Python number, got a Tensor"):
        lsr_kernels.itc_loss(v, t, vm, tm, 10.0, alpha=torch.tensor(0.4), backend="reference")


def test_fused_backend_ignores_autocast():
    """README: the fused backends compute in the features' dtype under an enclosing autocast."""
    feats, s = lsr_inputs(7, 5)
    plain = _call(feats, s, backend="chunked", **ALL_ON)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _call(feats, s, backend="chunked", **ALL_ON)
    for key in plain:
        assert torch.equal(plain[key], under[key]), key


def test_numpy_scalars_are_numbers():
    """Settings read from configs arrive as NumPy scalars: they act as the Python numbers they hold."""
    np = pytest.importorskip("numpy")
    feats, s = lsr_inputs(6, 4)
    plain = _call(feats, s, backend="reference", sep_weight=0.5, gc_weight=0.25, bridge_t=0.25)
    as_numpy = _call(feats, s, backend="reference", sep_weight=np.float32(0.5), gc_weight=np.float64(0.25),
                     bridge_t=np.float32(0.25))
    assert torch.equal(plain["loss"], as_numpy["loss"])
    v, t = feats["image_features"], feats["text_features"]
    assert torch.equal(lsr_kernels.clip_loss(v, t, np.float32(10.0), backend="reference"),
                       lsr_kernels.clip_loss(v, t, 10.0, backend="reference"))
    module = lsr_kernels.ClipLoss(rank=np.int64(0), world_size=np.int64(1))
    assert module.world_size == 1 and type(module.world_size) is int


@pytest.mark.parametrize("module", [lsr_kernels.ClipLoss, LSRLoss, ITCLoss])
def test_module_rejects_an_unknown_backend_when_built(module):
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'tritn'"):
        module(backend="tritn")


@pytest.mark.parametrize("rows,exc,match", [
    (None, TypeError, r"rows: expected a torch.Tensor, got NoneType"),
    ([[1.0, 0.0, 0.0]], TypeError, r"rows: expected a torch.Tensor, got list"),
    (torch.ones(2, 3, dtype=torch.long), TypeError, r"rows: expected floating features, got dtype torch.int64"),
    (torch.ones(2, 3, dtype=torch.bool), TypeError, r"rows: expected floating features"),
    (torch.ones(2, 3, device="meta"), ValueError, r"rows: device meta differs from the queue's cpu"),
    (torch.ones(2, 3).to_sparse(), TypeError, r"rows: expected a dense"),
])
def test_queue_rejects_bad_rows(rows, exc, match):
    queue = FeatureQueue(4, 3)
    before = queue.features.clone()
    with pytest.raises(exc, match=match):
        queue.enqueue(rows)
    assert torch.equal(queue.features, before) and int(queue.ptr) == 0


@pytest.mark.parametrize("args,kw,exc,match", [
    ((True, 8), {}, ValueError, r"size: expected an int >= 1, got True"),
    ((4, 2.0), {}, ValueError, r"dim: expected an int >= 1, got 2.0"),
    ((4, 8), dict(dtype=torch.int64), TypeError, r"dtype: expected one of .*got torch.int64"),
])
def test_queue_rejects_bad_construction(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        FeatureQueue(*args, **kw)


def test_dequeue_and_enqueue_wants_feature_queues():
    with pytest.raises(TypeError, match=r"image_queue: expected a FeatureQueue .*got Tensor"):
        ITCLoss().dequeue_and_enqueue(torch.zeros(8, 4), FeatureQueue(8, 4), unit_rows(2, 4), unit_rows(2, 4))


@pytest.mark.parametrize("vm,tm,exc,match", [
    (unit_rows(2, 3), unit_rows(2, 4), ValueError, r"text_features_m: feature width D = 4 does not match "
                                                   r"image_features_m's D = 3"),
    (unit_rows(2, 3), unit_rows(2, 3), ValueError, r"image_features_m: feature width D = 3 does not match "
                                                   r"image_queue's D = 4 \(got shape \(2, 3\)\)"),
    (unit_rows(2, 4), None, TypeError, r"text_features_m: expected a torch.Tensor, got None"),
])
def test_dequeue_and_enqueue_names_its_arguments(vm, tm, exc, match):
    queues = FeatureQueue(8, 4), FeatureQueue(8, 4)
    before = [q.features.clone() for q in queues]
    with pytest.raises(exc, match=match):
        ITCLoss().dequeue_and_enqueue(*queues, vm, tm)
    assert all(torch.equal(q.features, b) for q, b in zip(queues, before))


def test_queue_longer_than_batch_with_its_own_length_is_fine():
    v, t, vm, tm = (unit_rows(6, 4) for _ in range(4))
    loss = lsr_kernels.itc_loss(v, t, vm, tm, torch.tensor(10.0), image_queue=unit_rows(50, 4),
                                text_queue=unit_rows(9, 4), backend="reference")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kw,match", [
    (dict(world_size=0), r"world_size: expected an int >= 1"),
    (dict(rank=2, world_size=2), r"rank: expected an int in \[0, world_size = 2\)"),
    (dict(use_horovod=True), r"use_horovod"),
])
def test_bad_module_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        lsr_kernels.ClipLoss(**kw)


def test_bad_module_weights():
    with pytest.raises(ValueError, match=r"gc_weight"):
        LSRLoss(gc_weight=float("inf"))
    with pytest.raises(ValueError, match=r"alpha"):
        ITCLoss(alpha=2)


def test_has_cuda_ext_is_a_bool_and_import_never_fails():
    assert isinstance(lsr_kernels.HAS_CUDA_EXT, bool)



def test_measured_ranking_takes_the_nearest_shape_on_the_same_gpu():
    def entry(device, capability, n, ranking, op="clip", dtype="bfloat16", d=512, k=0):
        return dict(device=device, capability=capability, op=op, dtype=dtype, N=n, D=d, K=k, ranking=ranking)

    table = [entry("H100", "9.0", 1024, ["chunked", "triton"]), entry("H100", "9.0", 32768, ["cuda", "triton"]),
             entry("H200", "9.0", 32768, ["triton", "cuda"]), entry("A100", "8.0", 32768, ["chunked"]),
             entry("H100", "9.0", 4096, ["triton"], op="itc", k=65536)]
    rank = backends.measured_ranking
    assert rank(table, "H100", "9.0", "clip", "bfloat16", 2000, 512) == ("chunked", "triton")
    assert rank(table, "H100", "9.0", "clip", "bfloat16", 20000, 512) == ("cuda", "triton")
    assert rank(table, "H200", "9.0", "clip", "bfloat16", 2000, 512) == ("triton", "cuda")   # its own device first
    assert rank(table, "GH200", "9.0", "clip", "bfloat16", 2000, 512) == ("chunked", "triton")  # same capability
    assert rank(table, "L4", "8.9", "clip", "bfloat16", 2000, 512) == ()
    assert rank(table, "H100", "9.0", "clip", "float32", 2000, 512) == ()
    assert rank(table, "H100", "9.0", "itc", "bfloat16", 4096, 256, 65536) == ("triton",)
    # the later of two equally near measurements
    assert rank(table + [entry("H100", "9.0", 1024, ["cuda"])], "H100", "9.0", "clip", "bfloat16", 1024, 512) == ("cuda",)


@pytest.mark.parametrize("kwargs, op", [
    ({}, "clip"), (dict(gc_weight=0.25), "clip_gc"), (dict(bridge_weight=1.0, image_aug=True), "full"),
    (dict(image_aug=True), "full"),
])
def test_calls_resolve_auto_by_their_op_dtype_and_shape(monkeypatch, kwargs, op):
    seen = []
    real = backends.resolve

    def spy(backend, device, *args):
        seen.append(args)
        return real(backend, device, *args)

    monkeypatch.setattr(backends, "resolve", spy)
    feats, s = lsr_inputs(6, 4)
    args = {k: v for k, v in feats.items() if k in ("image_features", "text_features")}
    if kwargs.pop("image_aug", False):
        args.update(image_aug=feats["image_aug"], text_aug=feats["text_aug"])
    lsr_kernels.lsr_loss(args.pop("image_features"), args.pop("text_features"), s, **args, **weights_only(**kwargs))
    assert seen == [(op, torch.float32, (6, 4, 0))]
    seen.clear()
    v, t = feats["image_features"], feats["text_features"]
    lsr_kernels.itc_loss(v, t, v.detach(), t.detach(), s, text_queue=torch.randn(9, 4))
    assert seen == [("itc", torch.float32, (6, 4, 9))]
