"""Multi-process semantics (SPEC 5, :mod:`lsr_kernels.distributed`): gloo on CPU with 2 and 4
processes; NCCL (two or more GPUs) and gloo on one GPU under the ``gpu`` marker.

Spawning costs seconds per process (importing torch), so each test starts one process group and runs
many checks in it; a failing check raises in the worker and its traceback becomes the test failure.
Every job is bounded (``JOB_TIMEOUT_S``) and every collective times out (``COLLECTIVE_TIMEOUT_S``),
so nothing hangs the suite.

What is checked against what:
- ``ClipLoss`` against open_clip's ``ClipLoss`` with the same flags (all four ``local_loss`` x
  ``gather_with_grad`` combinations), loss and gradients of both features and the scale, per rank.
- ``LSRLoss`` (every term on) and ``ITCLoss`` (queues longer than the global batch) against the
  single-process reference on the global batch, under the scaling that holds for each flag
  combination (see ``_feature_factor`` and ``_check_contract``).
- gather and ring modes, backends ``reference`` and ``chunked``, tiles small enough to cross tile
  borders, float64 (tight) and float32.
- bad setups raise on every rank, quickly, and leave the ranks able to run the next call.
"""
from __future__ import annotations

import datetime
import gc
import importlib.util
import os
import re
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lsr_kernels
from lsr_kernels import ClipLoss, FeatureQueue, ITCLoss, LSRLoss, distributed as D, reference as R
from lsr_kernels.train import exit_worker
from helpers import ALL_ON, FEATURE_NAMES, backend_available, rel_err, unit_rows, weighted_parts, weights_only

JOB_TIMEOUT_S = 170
GPU_JOB_TIMEOUT_S = 90  # the GPU jobs run inside scripts/gpu_check.sh's 150 s test stage
# two or more GPUs only (skipped on one): cold Triton compiles of every fp64 shape in both ranks; give
# scripts/gpu_check.sh a larger TESTS_TIMEOUT on such a machine
NCCL_JOB_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 45
FLAGS = [(True, True), (False, True), (False, False), (True, False)]  # (local_loss, gather_with_grad)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


# ------------------------------------------------------------------------------------- harness
def _worker(rank, world_size, init_file, pg_backend, job, args):
    torch.set_num_threads(1)  # several processes share two cores
    if pg_backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, init_method="file://" + init_file, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        job(rank, world_size, *args)
        # Free, while the group is alive, autograd graphs that caught errors keep in reference cycles
        # (an error raised in a backward): freed later, at interpreter exit, they aborted the process
        # about one run in 20 ("terminate called without an active exception").
        gc.collect()
        # Tear down together: a rank destroying its gloo group while the other still has collectives
        # in flight aborted once (the same message).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # torch keeps the destroyed group referenced, so the interpreter's teardown would free it, and that
    # can abort a finished worker the same way. A failed job raises above instead and reaches the
    # parent through torch.multiprocessing's error queue.
    exit_worker(0)


def _run(job, world_size, *args, pg_backend="gloo", timeout=JOB_TIMEOUT_S):
    """Run ``job(rank, world_size, *args)`` in ``world_size`` spawned processes; fail on any error or
    when they do not finish within ``timeout`` seconds (then they are killed)."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "store"), pg_backend, job, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    pytest.fail(f"{job.__name__} on {world_size} processes did not finish in {timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()


def _open_clip_loss():
    """open_clip's ``loss.py`` itself, loaded without the package ``__init__`` (which imports every
    model and costs seconds per spawned process); it needs only torch."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_tests", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _needs_open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")


# ------------------------------------------------------------------------------ check helpers
def _mean_over_ranks(x):
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def _same_on_every_rank(x):
    y = x.detach().clone()
    table = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(table, y)
    return all(torch.equal(t, table[0]) for t in table)


# Roundoff of O(1) quantities: the floor for values that are zero in exact arithmetic (with D = 1
# every row is +-1 and many gradients cancel exactly); a fixed floor, never scaled up to pass.
ROUNDOFF = {torch.float64: 1e-13, torch.float32: 1e-6}


def _close(tag, got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    floor = ROUNDOFF[torch.float64 if tol < 1e-8 else torch.float32]
    err = (got - want).norm().item()
    bound = tol * want.norm().item() + floor
    assert err <= bound, (f"{tag}: error {err:.3e} > {bound:.3e} (relative {rel_err(got, want):.3e}, "
                          f"tolerance {tol:.0e})")


def _feature_factor(local_loss, gather_with_grad, world):
    """Feature gradient on a rank / the global gradient of its rows. The gradient through every
    gathered column comes home (``W dL/dX_r``) unless the loss is global and gathered without grad,
    where each rank holds ``dL/dX_r`` (open_clip's default flags)."""
    return 1.0 if (not local_loss and not gather_with_grad) else float(world)


def _check_contract(tag, values, feature_grads, scale_grad, ref_values, ref_grads, ref_scale_grad, rows,
                    local_loss, gather_with_grad, tol):
    """SPEC 5 for one call: ``local_loss``: the mean over ranks of each value and of the scale's
    gradient is the single-process one; else every rank holds them. Feature gradients: the global
    rows times :func:`_feature_factor`."""
    world = dist.get_world_size()
    for key, want in ref_values.items():
        got = _mean_over_ranks(values[key]) if local_loss else values[key]
        _close(f"{tag} {key}", got, want, tol)
    factor = _feature_factor(local_loss, gather_with_grad, world)
    for name, grad in feature_grads.items():
        _close(f"{tag} d/d{name}", grad, factor * ref_grads[name][rows], tol)
    got_scale = _mean_over_ranks(scale_grad) if local_loss else scale_grad
    _close(f"{tag} d/dlogit_scale", got_scale, ref_scale_grad, tol)


def _global_batch(names, n_global, d, dtype, device, seed):
    """The same L2-normalised global rows on every rank (a seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: F.normalize(torch.randn(n_global, d, generator=gen, dtype=torch.float64), dim=-1)
            .to(device=device, dtype=dtype) for name in names}


def _local_leaves(global_feats, rows, no_grad=()):
    return {k: v[rows].clone().requires_grad_(k not in no_grad) for k, v in global_feats.items()}


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors)]


def _expect_error(tag, fn, pattern, exc=ValueError, limit_s=15.0):
    start = time.monotonic()
    try:
        fn()
    except exc as err:
        assert re.search(pattern, str(err)), f"{tag}: {type(err).__name__}({err}) does not match {pattern!r}"
    else:
        raise AssertionError(f"{tag}: no {exc.__name__} raised")
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f"{tag}: took {elapsed:.1f} s to raise (a collective waited)"


def _aligned(tag):
    """The ranks still meet in the same collective (nothing left pending by an error)."""
    probe = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(probe)
    world = dist.get_world_size()
    assert probe.item() == world * (world + 1) / 2, f"{tag}: ranks out of step"


# ------------------------------------------------------------------------------- job: LSRLoss
def _lsr_case(rank, world, device, *, backend, mode, local_loss, gather_with_grad, dtype=torch.float64, n=3,
              d=5, weights=ALL_ON, names=FEATURE_NAMES, no_grad=(), tile=None, seed=0):
    tag = (f"LSR[{backend} {mode} local_loss={local_loss} gather_with_grad={gather_with_grad} {dtype} "
           f"n={n} d={d} tile={tile} no_grad={no_grad}] rank {rank}")
    D.TILE_SHAPE = tile
    glob = _global_batch(names, world * n, d, dtype, device, seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    s_ref = torch.tensor(4.0, dtype=sdt, device=device, requires_grad=True)
    ref_leaves = {k: v.clone().requires_grad_(k not in no_grad) for k, v in glob.items()}
    ref = lsr_kernels.lsr_loss(ref_leaves["image_features"], ref_leaves["text_features"], s_ref,
                               **{k: v for k, v in ref_leaves.items() if k not in ("image_features", "text_features")},
                               backend="reference", **weights)
    grad_names = [k for k in names if k not in no_grad]
    *ref_grads, ref_scale_grad = _grads(ref["loss"], [ref_leaves[k] for k in grad_names] + [s_ref])

    rows = slice(rank * n, (rank + 1) * n)
    local = _local_leaves(glob, rows, no_grad)
    s = s_ref.detach().clone().requires_grad_()
    loss_fn = LSRLoss(**weights, backend=backend, local_loss=local_loss, gather_with_grad=gather_with_grad,
                      rank=rank, world_size=world, distributed_mode=mode)
    out = loss_fn(local["image_features"], local["text_features"], s, output_dict=True,
                  **{k: v for k, v in local.items() if k not in ("image_features", "text_features")})
    want = {k: v.detach() for k, v in weighted_parts(ref, **weights).items()}
    assert set(out) == set(want), f"{tag}: keys {sorted(out)} != {sorted(want)}"
    out["loss"], want["loss"] = sum(out.values()), ref["loss"].detach()  # open_clip's training loop's sum
    *got_grads, scale_grad = _grads(out["loss"], [local[k] for k in grad_names] + [s])
    _check_contract(tag, out, dict(zip(grad_names, got_grads)), scale_grad, want,
                    dict(zip(grad_names, ref_grads)), ref_scale_grad, rows, local_loss, gather_with_grad, TOL[dtype])
    D.TILE_SHAPE = None


def _device(rank, device_name):
    # "cuda:rank": one GPU per rank (NCCL).
    return torch.device("cuda", rank) if device_name == "cuda:rank" else torch.device(device_name)


def _job_lsr(rank, world, device_name="cpu", backends=("reference", "chunked"), dtypes=(torch.float64,)):
    device = _device(rank, device_name)
    for backend in backends:
        for mode in D.MODES:
            for local_loss, gather_with_grad in FLAGS[:3]:
                for dtype in dtypes:
                    _lsr_case(rank, world, device, backend=backend, mode=mode, local_loss=local_loss,
                              gather_with_grad=gather_with_grad, dtype=dtype)
    fast = backends[-1]
    # Tiles that cross every border (rows and columns of each block), both modes.
    for mode in D.MODES:
        _lsr_case(rank, world, device, backend=fast, mode=mode, local_loss=True, gather_with_grad=True, n=5,
                  d=3, tile=(2, 3))
    # float32; N_local = 1 with D = 1; D not a power of two, N_global prime-free but odd D.
    _lsr_case(rank, world, device, backend=fast, mode="ring", local_loss=True, gather_with_grad=True,
              dtype=torch.float32, n=4, d=7)
    _lsr_case(rank, world, device, backend=fast, mode="gather", local_loss=False, gather_with_grad=True, n=1, d=1)
    # ALBEF-style views (momentum features: no gradient through the in-modal columns or the bridge target).
    _lsr_case(rank, world, device, backend=fast, mode="ring", local_loss=True, gather_with_grad=True,
              no_grad=("image_aug", "text_aug"))
    # Without views: the two-term contrastive form, the geometric term without L_gca.
    _lsr_case(rank, world, device, backend=fast, mode="ring", local_loss=False, gather_with_grad=False,
              weights=weights_only(gc_weight=1.0), names=("image_features", "text_features"))
    # The bridge alone with image_aug only.
    _lsr_case(rank, world, device, backend="reference", mode="gather", local_loss=True, gather_with_grad=True,
              weights=weights_only(bridge_weight=2.0), names=("image_features", "text_features", "image_aug"))
    # ClipLoss under SPEC 5 with W ranks in ring mode: the global contrastive loss and gradients.
    _clip_contract(rank, world, device, backend=fast, mode="ring")
    _expect_error("LSRLoss local_loss without gather_with_grad",
                  lambda: LSRLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world),
                  r"local_loss=True with gather_with_grad=False")


def _clip_contract(rank, world, device, *, backend, mode, n=3, d=6):
    glob = _global_batch(("image_features", "text_features"), world * n, d, torch.float64, device, seed=5)
    s_ref = torch.tensor(7.0, dtype=torch.float64, device=device, requires_grad=True)
    v_ref, t_ref = (x.clone().requires_grad_() for x in glob.values())
    ref = R.contrastive_loss(v_ref, t_ref, s_ref)
    ref_grads = _grads(ref, [v_ref, t_ref, s_ref])
    rows = slice(rank * n, (rank + 1) * n)
    v, t = (x[rows].clone().requires_grad_() for x in glob.values())
    s = s_ref.detach().clone().requires_grad_()
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, backend=backend,
                    distributed_mode=mode)(v, t, s)
    got = _grads(loss, [v, t, s])
    _check_contract(f"ClipLoss SPEC 5 [{backend} {mode}] rank {rank}", {"loss": loss}, {"v": got[0], "t": got[1]},
                    got[2], {"loss": ref.detach()}, {"v": ref_grads[0], "t": ref_grads[1]}, ref_grads[2], rows,
                    True, True, TOL[torch.float64])


# ---------------------------------------------------------------- job: ClipLoss vs open_clip, ITC
def _clip_vs_open_clip(rank, world, device, oc, *, backend, mode, local_loss, gather_with_grad, n, d, dtype):
    tag = (f"ClipLoss vs open_clip [{backend} {mode} local_loss={local_loss} gather_with_grad={gather_with_grad} "
           f"{dtype} n={n} d={d}] rank {rank}")
    glob = _global_batch(("image_features", "text_features"), world * n, d, dtype, device, seed=11)
    rows = slice(rank * n, (rank + 1) * n)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    results = []
    for loss_fn in (oc.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world),
                    ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world,
                             backend=backend, distributed_mode=mode)):
        v, t = (x[rows].clone().requires_grad_() for x in glob.values())
        s = torch.tensor(9.0, dtype=sdt, device=device, requires_grad=True)
        out = loss_fn(v, t, s, output_dict=True)
        results.append((out["contrastive_loss"], *_grads(out["contrastive_loss"], [v, t, s])))
    for label, theirs, ours in zip(("loss", "d/dimage", "d/dtext", "d/dlogit_scale"), *results):
        _close(f"{tag} {label}", ours, theirs, TOL[dtype])


def _itc_case(rank, world, device, *, backend, local_loss, gather_with_grad, n=3, d=5, k_image=7, k_text=9,
              alpha=0.4, dtype=torch.float64):
    tag = f"ITC[{backend} local_loss={local_loss} gather_with_grad={gather_with_grad} {dtype}] rank {rank}"
    names = ("image_features", "text_features", "image_features_m", "text_features_m")
    glob = _global_batch(names, world * n, d, dtype, device, seed=21)
    queues = _global_batch(("image_queue",), k_image, d, dtype, device, seed=22)
    queues.update(_global_batch(("text_queue",), k_text, d, dtype, device, seed=23))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    s_ref = torch.tensor(6.0, dtype=sdt, device=device, requires_grad=True)
    v_ref, t_ref = (glob[k].clone().requires_grad_() for k in names[:2])
    ref = R.itc_loss(v_ref, t_ref, glob["image_features_m"], glob["text_features_m"], s_ref,
                     queues["image_queue"], queues["text_queue"], alpha)
    ref_grads = _grads(ref, [v_ref, t_ref, s_ref])

    rows = slice(rank * n, (rank + 1) * n)
    v, t = (glob[k][rows].clone().requires_grad_() for k in names[:2])
    vm, tm = (glob[k][rows].clone() for k in names[2:])
    s = s_ref.detach().clone().requires_grad_()
    loss = ITCLoss(alpha=alpha, backend=backend, local_loss=local_loss, gather_with_grad=gather_with_grad,
                   rank=rank, world_size=world)(v, t, vm, tm, s, image_queue=queues["image_queue"],
                                                 text_queue=queues["text_queue"])
    got = _grads(loss, [v, t, s])
    _check_contract(tag, {"itc": loss}, {"v": got[0], "t": got[1]}, got[2], {"itc": ref.detach()},
                    {"v": ref_grads[0], "t": ref_grads[1]}, ref_grads[2], rows, local_loss, gather_with_grad,
                    TOL[dtype])


def _queue_case(rank, world, device, n=3, d=4, size=5):
    """ITCLoss.dequeue_and_enqueue: every rank's momentum rows in rank order, identical queues, and the
    same state as one process enqueueing the global batch (size 5 < N = 3 W: wraps around)."""
    ours = [FeatureQueue(size, d, dtype=torch.float64, device=device, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    single = [FeatureQueue(size, d, dtype=torch.float64, device=device, generator=torch.Generator().manual_seed(3))
              for _ in range(2)]
    loss_fn = ITCLoss(rank=rank, world_size=world)
    for step in range(2):
        glob = _global_batch(("image_m", "text_m"), world * n, d, torch.float64, device, seed=30 + step)
        rows = slice(rank * n, (rank + 1) * n)
        loss_fn.dequeue_and_enqueue(ours[0], ours[1], glob["image_m"][rows], glob["text_m"][rows])
        single[0].enqueue(glob["image_m"])
        single[1].enqueue(glob["text_m"])
        for q_ours, q_single in zip(ours, single):
            assert torch.equal(q_ours.features, q_single.features), f"queue step {step} rank {rank}: features"
            assert int(q_ours.ptr) == int(q_single.ptr), f"queue step {step} rank {rank}: ptr"
            assert _same_on_every_rank(q_ours.features), f"queue step {step}: ranks differ"


def _job_clip_itc(rank, world, device_name="cpu", backends=("reference", "chunked")):
    device = _device(rank, device_name)
    oc = _open_clip_loss()
    for backend in backends:
        for mode in D.MODES:
            for local_loss, gather_with_grad in FLAGS:
                _clip_vs_open_clip(rank, world, device, oc, backend=backend, mode=mode, local_loss=local_loss,
                                   gather_with_grad=gather_with_grad, n=3, d=5, dtype=torch.float64)
    fast = backends[-1]
    for local_loss, gather_with_grad in FLAGS:
        _clip_vs_open_clip(rank, world, device, oc, backend=fast, mode="ring", local_loss=local_loss,
                           gather_with_grad=gather_with_grad, n=1, d=1, dtype=torch.float64)
    D.TILE_SHAPE = (2, 2)
    _clip_vs_open_clip(rank, world, device, oc, backend=fast, mode="gather", local_loss=True, gather_with_grad=False,
                       n=5, d=3, dtype=torch.float64)
    D.TILE_SHAPE = None
    _clip_vs_open_clip(rank, world, device, oc, backend=fast, mode="ring", local_loss=False, gather_with_grad=True,
                       n=4, d=7, dtype=torch.float32)
    for backend in backends:
        # Triton and CUDA kernels have no float64.
        dtype = torch.float64 if backend in ("reference", "chunked") else torch.float32
        for local_loss, gather_with_grad in FLAGS:
            _itc_case(rank, world, device, backend=backend, local_loss=local_loss, gather_with_grad=gather_with_grad,
                      dtype=dtype)
    _queue_case(rank, world, device)


# ---------------------------------------------------------------------------- job: bad setups
def _job_bad_setups(rank, world):
    def clip(n=3, d=4, backend="chunked", loss_rank=None, loss_world=None, mode="gather", scale=5.0):
        v, t = unit_rows(n, d), unit_rows(n, d)
        fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank if loss_rank is None else loss_rank,
                      world_size=world if loss_world is None else loss_world, backend=backend, distributed_mode=mode)
        return fn(v, t, torch.tensor(scale))

    _expect_error("different local batch sizes", lambda: clip(n=3 + rank),
                  r"local batch sizes differ across ranks: image_features has N = \(rank 0: 3, rank 1: 4\)")
    _aligned("after batch sizes")
    _expect_error("different feature widths", lambda: clip(d=4 + 2 * rank),
                  r"feature widths differ across ranks: image_features has D = \(rank 0: 4, rank 1: 6\)")
    _aligned("after widths")
    _expect_error("one rank's invalid input",
                  lambda: clip(scale=float("nan") if rank == 1 else 5.0),
                  r"logit_scale: expected a finite positive" if rank == 1 else r"rank\(s\) \[1\] rejected their inputs")
    _aligned("after a local error")
    _expect_error("rank argument wrong on one process", lambda: clip(loss_rank=0),
                  r"rank: the loss was built with rank = 0 but this process is rank 1" if rank == 1
                  else r"rank\(s\) \[1\] rejected their inputs")
    _aligned("after a wrong rank")
    _expect_error("world_size of the loss is not the group's", lambda: clip(loss_world=4),
                  r"world_size: the loss was built for world_size = 4 but the process group has 2 ranks")
    _aligned("after a wrong world size")
    _expect_error("world_size wrong on one rank only", lambda: clip(loss_world=3 if rank == 0 else None),
                  r"world_size: the loss was built for world_size = 3" if rank == 0
                  else r"rank\(s\) \[0\] rejected their inputs")
    _aligned("after a wrong world size on one rank")
    _expect_error("different modes", lambda: clip(mode=D.MODES[rank]),
                  r"distributed_mode differs across ranks \(rank 0: 'gather', rank 1: 'ring'\)")
    _aligned("after different modes")
    _expect_error("different backends", lambda: clip(backend=("reference", "chunked")[rank]),
                  r"backend differs across ranks \(rank 0: 'reference', rank 1: 'chunked'\)")
    _aligned("after different backends")

    feats = {name: unit_rows(3, 4) for name in FEATURE_NAMES}
    if rank == 1:
        feats["image_aug"] = feats["text_aug"] = None
    lsr = LSRLoss(**weights_only(gc_weight=1.0), local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    _expect_error("views on one rank only",
                  lambda: lsr(feats["image_features"], feats["text_features"], torch.tensor(3.0),
                              image_aug=feats["image_aug"], text_aug=feats["text_aug"]),
                  r"image_aug is given on rank\(s\) \[0\] but not on rank\(s\) \[1\]")
    _aligned("after views on one rank")
    lsr_weights = LSRLoss(**weights_only(gc_weight=0.5 + rank), local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    _expect_error("different weights",
                  lambda: lsr_weights(feats["image_features"], feats["text_features"], torch.tensor(3.0)),
                  r"gc_weight differs across ranks \(rank 0: 0.5, rank 1: 1.5\)")
    _aligned("after different weights")

    v, t, vm, tm = (unit_rows(3, 4) for _ in range(4))
    itc = ITCLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    _expect_error("different queue lengths",
                  lambda: itc(v, t, vm, tm, torch.tensor(5.0), image_queue=unit_rows(6 + rank, 4, requires_grad=False)),
                  r"queue lengths differ across ranks: image_queue has K = \(rank 0: 6, rank 1: 7\)")
    _aligned("after queue lengths")
    _expect_error("ITC on one rank, ClipLoss on the other",
                  lambda: itc(v, t, vm, tm, torch.tensor(5.0)) if rank == 0 else clip(),
                  r"ranks called different losses \(rank 0: itc, rank 1: clip\)")
    _aligned("after different calls")
    v, t = unit_rows(3, 4), unit_rows(3, 4)
    _expect_error("world_size as a string on one rank",
                  lambda: D.clip_loss(v, t, 5.0, world_size="2" if rank == 0 else None),
                  r"world_size: expected an int or None, got str '2'" if rank == 0
                  else r"rank\(s\) \[0\] rejected their inputs", exc=TypeError if rank == 0 else ValueError)
    _aligned("after a string world_size")
    _expect_error("group that is not a process group", lambda: D.clip_loss(v, t, 5.0, group="default"),
                  r"group: expected a torch.distributed ProcessGroup or None, got str", exc=TypeError)
    _aligned("after a string group")
    queue = FeatureQueue(5, 4)
    _expect_error("different enqueue sizes", lambda: queue.enqueue_gathered(unit_rows(2 + rank, 4)),
                  r"local batch sizes differ across ranks: rows has N")
    _aligned("after enqueue sizes")
    _expect_error("requires_grad on one rank only",
                  lambda: ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
                      unit_rows(3, 4, requires_grad=rank == 0), unit_rows(3, 4), torch.tensor(5.0)),
                  r"requires_grad differs across ranks: image_features")
    _aligned("after requires_grad")
    _expect_error("a missing feature on one rank",
                  lambda: ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
                      unit_rows(3, 4), None if rank == 1 else unit_rows(3, 4), torch.tensor(5.0)),
                  r"text_features: expected a torch.Tensor, got None" if rank == 1
                  else r"rank\(s\) \[1\] rejected their inputs", exc=TypeError if rank == 1 else ValueError)
    _aligned("after a missing feature")

    def fails_unexpectedly():
        raise RuntimeError("an unforeseen failure in validation")

    # Whatever a rank's validation raises reaches the agreement step: the other ranks must not wait.
    _expect_error("an unforeseen exception on one rank",
                  lambda: D._start("clip", {"image_features": unit_rows(3, 4)}, {},
                                   fails_unexpectedly if rank == 0 else (lambda: None), None, None, None),
                  r"an unforeseen failure" if rank == 0 else r"rank\(s\) \[0\] rejected their inputs",
                  exc=RuntimeError if rank == 0 else ValueError)
    _aligned("after an unforeseen exception")
    for backend, mode in (("reference", "gather"), ("chunked", "gather"), ("chunked", "ring")):
        v, t = unit_rows(3, 4), unit_rows(3, 4)
        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, backend=backend,
                        distributed_mode=mode)(v, t, torch.tensor(5.0))
        _expect_error(f"double backward ({backend}, {mode})",
                      lambda: torch.autograd.grad(loss, [v, t], create_graph=True),
                      r"double backward \(create_graph=True\) is not supported", exc=RuntimeError)
        _aligned(f"after double backward ({backend}, {mode})")
    # After all that, a good call on both ranks still works and is right.
    glob = _global_batch(("image_features", "text_features"), 2 * 3, 4, torch.float64, "cpu", seed=7)
    v, t = (x[rank * 3:(rank + 1) * 3] for x in glob.values())
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, backend="chunked")(
        v, t, torch.tensor(5.0, dtype=torch.float64))
    _close("good call after the bad ones", _mean_over_ranks(loss),
           R.contrastive_loss(glob["image_features"], glob["text_features"], torch.tensor(5.0, dtype=torch.float64)),
           1e-10)


# ------------------------------------------------------------------------------------ the tests
def test_clip_matches_open_clip_and_itc_with_queues_two_processes():
    _needs_open_clip()
    _run(_job_clip_itc, 2)


def test_lsr_every_term_every_flag_and_mode_four_processes():
    _run(_job_lsr, 4)


def _job_triton_gather(rank, world):
    # The fused primitive's rectangular form (Triton, here under its interpreter) for the contrastive
    # pairs in gather mode; float32, every term on, both gradient flag sets that carry column gradients.
    for local_loss, gather_with_grad in ((True, True), (False, False)):
        _lsr_case(rank, world, torch.device("cpu"), backend="triton", mode="gather", local_loss=local_loss,
                  gather_with_grad=gather_with_grad, dtype=torch.float32, n=5, d=6)


@pytest.mark.slow
def test_triton_interpreter_backend_in_gather_mode_two_processes():
    if not backend_available("triton") or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton under TRITON_INTERPRET=1")
    _run(_job_triton_gather, 2)


def test_bad_setups_raise_on_every_rank_two_processes():
    _run(_job_bad_setups, 2)


def test_world_size_above_one_without_a_process_group():
    v, t = unit_rows(4, 3), unit_rows(4, 3)
    for loss_fn in (ClipLoss(world_size=2, rank=0), LSRLoss(**weights_only(), world_size=2, rank=1, gather_with_grad=True)):
        with pytest.raises(ValueError, match=r"world_size = 2: torch.distributed is not initialised"):
            loss_fn(v, t, torch.tensor(3.0))
    with pytest.raises(ValueError, match=r"torch.distributed is not initialised"):
        ITCLoss(world_size=2)(v, t, v, t, torch.tensor(3.0))
    # Without a group, enqueue_gathered is a plain enqueue.
    queue, plain = FeatureQueue(3, 3), FeatureQueue(3, 3)
    plain.features.copy_(queue.features)
    queue.enqueue_gathered(v.detach())
    plain.enqueue(v.detach())
    assert torch.equal(queue.features, plain.features)


def test_bad_distributed_arguments():
    with pytest.raises(ValueError, match=r"distributed_mode: expected one of \('gather', 'ring'\), got 'tree'"):
        ClipLoss(distributed_mode="tree")
    with pytest.raises(ValueError, match=r"local_loss=True with gather_with_grad=False"):
        LSRLoss(local_loss=True, gather_with_grad=False, world_size=2)
    LSRLoss(local_loss=True, gather_with_grad=False, world_size=1)  # single process: the flags are inert


# ------------------------------------------------------- the blockwise engine in one process (W = 1)
def _engine(pairs, tensors, scale, ring, column_grad=True):
    spec = D._RowTermSpec(None, 1, 0, ring, pairs, column_grad)
    return D._RowTerms.apply(scale, spec, *tensors)


@pytest.mark.parametrize("tile", [None, (2, 3), (1, 1)])
@pytest.mark.parametrize("ring", [False, True])
def test_engine_matches_reference_primitives_and_gradcheck(tile, ring, monkeypatch):
    monkeypatch.setattr(D, "TILE_SHAPE", tile)
    a, b, x = (unit_rows(7, 5, torch.float64) for _ in range(3))
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    pairs = [("nce", 0, 1, 0.0), ("nce", 1, 0, 0.0), ("nce", 0, 0, 0.0), ("gram", 2, 2, 2.0)]
    weights = torch.tensor([0.3, 1.7, -0.4, 0.2], dtype=torch.float64)
    out = _engine(pairs, (a, b, x), s, ring)
    ref = torch.stack([R.info_nce(a, b, s, False), R.info_nce(b, a, s, False), R.info_nce(a, a, s, False),
                       R.exp_gram_sum(x, 2.0)])
    assert rel_err(out, ref) < 1e-13
    got = torch.autograd.grad((out * weights).sum(), [s, a, b, x])
    want = torch.autograd.grad((ref * weights).sum(), [s, a, b, x])
    for name, g, w in zip(("s", "a", "b", "x"), got, want):
        assert rel_err(g, w) < 1e-12, name
    assert torch.autograd.gradcheck(lambda *args: _engine(pairs, args[1:], args[0], ring), (s, a, b, x))


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("tile", [None, (7, 20)])
def test_engine_fp32_loss_is_accurate_to_its_own_size(ring, tile, monkeypatch):
    """Each row's loss as (max - positive) + log(sum), the positive read from the tiles: a well-aligned
    batch at s = 100 gives a loss >= 0 (the row-wise dot product as the positive gave -9.5e-7 in
    ring mode), and a loss of ~2.5 is as accurate as chunked's."""
    monkeypatch.setattr(D, "TILE_SHAPE", tile)
    g = torch.Generator().manual_seed(0)
    for noise, bound in ((0.05, None), (0.3, 5e-7)):
        v = F.normalize(torch.randn(64, 32, generator=g), dim=1)
        t = F.normalize(v + noise * torch.randn(64, 32, generator=g), dim=1)
        ours, exact = (_engine([("nce", 0, 1, 0.0)], (v.to(dt), t.to(dt)), torch.tensor(100.0, dtype=dt), ring)[0]
                       for dt in (torch.float32, torch.float64))
        if bound is None:
            assert 0.0 <= ours.item() <= 1e-7, ours.item()
        else:
            assert abs(ours.item() - exact.item()) <= bound * exact.item()


def test_engine_rows_only_gradient_is_open_clips_detached_columns():
    a, b = unit_rows(6, 4, torch.float64), unit_rows(6, 4, torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = _engine([("nce", 0, 1, 0.0)], (a, b), s, ring=False, column_grad=False)[0]
    ga, gb, gs = _grads(out, [a, b, s])
    want = _grads(R.info_nce(a, b.detach(), s, False), [a, s])
    assert rel_err(ga, want[0]) < 1e-12 and rel_err(gs, want[1]) < 1e-12
    assert torch.count_nonzero(gb) == 0
    b_const = b.detach()
    assert torch.autograd.gradcheck(
        lambda s_, a_: _engine([("nce", 0, 1, 0.0)], (a_, b_const), s_, ring=True, column_grad=False), (s, a))


@pytest.mark.parametrize("ring", [False, True])
def test_engine_ignores_an_enclosing_autocast(ring):
    # open_clip computes its loss inside autocast: rounding the forward's products and not the
    # backward's made the backward's softmax rows sum to 0.89..1.13 (2.5% gradient error in ring mode)
    a, b, x = (unit_rows(64, 16) for _ in range(3))
    s = torch.tensor(50.0, requires_grad=True)
    pairs = [("nce", 0, 1, 0.0), ("nce", 1, 0, 0.0), ("gram", 2, 2, 2.0)]
    plain = _engine(pairs, (a, b, x), s, ring)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = _engine(pairs, (a, b, x), s, ring)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    for g, w in zip(_grads(under.sum(), [a, b, x, s]), _grads(plain.sum(), [a, b, x, s])):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_low_precision_error_is_pytorchs(dtype):
    """flash-attention's rule: the engine's error against the float64 reference is at most a small
    multiple of PyTorch's own error (the reference run in that dtype)."""
    torch.manual_seed(1)
    a64, b64, x64 = (unit_rows(33, 24, torch.float64, requires_grad=False) for _ in range(3))
    s64 = torch.tensor(20.0, dtype=torch.float64)
    pairs = [("nce", 0, 1, 0.0), ("nce", 1, 0, 0.0), ("gram", 2, 2, 2.0)]

    def run(fn, dtype_):
        a, b, x = (t.to(dtype_).requires_grad_() for t in (a64, b64, x64))
        s = s64.to(torch.float64 if dtype_ == torch.float64 else torch.float32).requires_grad_()
        vals = fn(a, b, x, s)
        grads = torch.autograd.grad(vals.sum(), [a, b, x, s])
        return [vals] + list(grads)

    reference = lambda a, b, x, s: torch.stack([R.info_nce(a, b, s, False), R.info_nce(b, a, s, False),
                                                R.exp_gram_sum(x, 2.0)])
    engine = lambda a, b, x, s: _engine(pairs, (a, b, x), s, ring=True)
    exact = run(reference, torch.float64)
    torch_lp = run(reference, dtype)
    ours = run(engine, dtype)
    for name, e, t, o in zip(("values", "da", "db", "dx", "ds"), exact, torch_lp, ours):
        ours_err, torch_err = rel_err(o, e), rel_err(t, e)
        assert ours_err <= 3.0 * torch_err + 1e-6, f"{name}: ours {ours_err:.2e}, PyTorch {torch_err:.2e}"


# ------------------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
def test_nccl_lsr_and_clip_on_two_or_more_gpus(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank: fewer than 2 GPUs visible")
    fast = ("reference", "triton") if backend_available("triton") else ("reference", "chunked")
    _run(_job_lsr, 2, "cuda:rank", fast, pg_backend="nccl", timeout=NCCL_JOB_TIMEOUT_S)
    _needs_open_clip()  # only the ClipLoss half compares against open_clip
    _run(_job_clip_itc, 2, "cuda:rank", fast, pg_backend="nccl", timeout=NCCL_JOB_TIMEOUT_S)


@pytest.mark.gpu
@pytest.mark.gpu_cost(40)  # two spawned processes, each importing torch and compiling the ITC kernels
def test_gloo_with_cuda_tensors_on_one_gpu(cuda_device):
    """Two ranks sharing one GPU over gloo (which all-gathers and all-reduces CUDA tensors but has no
    CUDA point-to-point): gather mode, the chunked engine and the backends' ITC kernels.

    Bounded by GPU_JOB_TIMEOUT_S, well inside the GPU check's 150 s test stage: a hang fails this test
    instead of taking the whole stage with it."""
    _run(_job_gloo_cuda, 2, timeout=GPU_JOB_TIMEOUT_S)


def _job_gloo_cuda(rank, world):
    device = torch.device("cuda", 0)
    for local_loss, gather_with_grad in FLAGS[:3]:
        for dtype in (torch.float64, torch.float32):
            _lsr_case(rank, world, device, backend="chunked", mode="gather", local_loss=local_loss,
                      gather_with_grad=gather_with_grad, dtype=dtype)
    for local_loss, gather_with_grad in FLAGS:
        _itc_case(rank, world, device, backend="chunked", local_loss=local_loss, gather_with_grad=gather_with_grad)
        if backend_available("triton"):
            _itc_case(rank, world, device, backend="triton", local_loss=local_loss,
                      gather_with_grad=gather_with_grad, dtype=torch.float32)
