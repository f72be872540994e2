#!/usr/bin/env bash
# The prepared GPU check: environment, CUDA build (beside it, Triton's cache warmed for the benchmarks),
# GPU tests, core benchmarks, in about 8 minutes on one H100/H200, everything logged into $OUT.
#
#   OUT=/path/to/out bash scripts/gpu_check.sh            # on the GPU machine, from the repo root
#   bash scripts/gpu_check.sh --dry-run                    # its CPU-side steps on a CPU machine (CI)
#
# Options: --dry-run (or DRY_RUN=1), --budget SECONDS (total, default 480), --skip STAGE (repeatable:
# build, tests, bench-core, bench-sweep, profile, bench-maxn), -h/--help. Environment: OUT (output folder;
# default ./out/gpu_check), PYTHON (default: python, else python3), LSR_BENCH_COMMIT (the commit
# to record when the tree has no .git), per-stage caps in seconds: BUILD_TIMEOUT (210),
# TESTS_TIMEOUT (150), CORE_TIMEOUT (120), PROFILE_TIMEOUT (60), SWEEP_TIMEOUT (75), MAXN_TIMEOUT (100),
# WARM_TIMEOUT (300, each warm-up process); TEST_WORKERS (the
# cores, at most 12: pytest-xdist processes for the GPU tests, when xdist is installed).
#
# The GPU machine has no network: nothing is downloaded. Inf-CL (a baseline) is installed from the
# wheel in benchmarks/wheels/ with --no-deps --no-index, and open_clip's loss.py is read from its
# wheel there when the package does not import (see benchmarks/NOTES.md); without them the provider
# is recorded as unavailable. Fetch both on the development machine first, and carry the folder (it is
# git-ignored) to the GPU machine, whose copy has no .git either: pass the commit to record.
#   pip download --no-deps -d benchmarks/wheels inf-cl==1.2.1 open_clip_torch==3.3.0
#   device tool: command "LSR_BENCH_COMMIT=<sha> OUT=$OUT bash scripts/gpu_check.sh", carry ["benchmarks/wheels"]
# When the ahead-of-time CUDA build fails the build stage falls back to load_jit(), and the later stages
# load that cached build (the benchmarks with LSR_BENCH_CUDA_JIT=1); with no extension at all the CUDA
# tests skip (LSR_SKIP_CUDA_BUILD=1) and the benchmarks record the provider as unavailable.
# Every stage runs under `timeout` and a global deadline; a failed stage does not stop the next. At most 8 files land in $OUT (the device tool returns no more):
#   summary.txt  env_build.log  tests.log  bench.log  gpu.jsonl  README_table.md  plots.tar.gz  profile.txt
# (profile.txt: each fused kernel's time in units of one cuBLAS N x N x D product, CLIP and full at
# N = 32K, D = 512 bf16: which kernel is how far from the matmul floor; see benchmarks/profile.py).
# Afterwards, on the development machine:
#   cat <out>/gpu.jsonl >> benchmarks/results/gpu.jsonl && python -m benchmarks render --update-readme \
#     && python -m benchmarks choose-auto --update-readme      # auto's GPU choice from those timings
set -uo pipefail

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }  # the header above

DRY_RUN=${DRY_RUN:-0}
BUDGET=480
SKIP=" "
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) shift; BUDGET=${1:?--budget needs a number of seconds} ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        --skip) shift; SKIP="$SKIP${1:?--skip needs a stage name} " ;;
        --skip=*) SKIP="$SKIP${1#--skip=} " ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget expects whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for stage in $SKIP; do
    case "$stage" in build|tests|bench-core|bench-sweep|profile|bench-maxn) ;;
        *) echo "gpu_check.sh: --skip: unknown stage '$stage' (build, tests, bench-core, bench-sweep, profile, bench-maxn)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/gpu.jsonl"
SUMMARY="$OUT/summary.txt"
ENV_LOG="$OUT/env_build.log"
TESTS_LOG="$OUT/tests.log"
BENCH_LOG="$OUT/bench.log"
PROFILE="$OUT/profile.txt"
: >"$SUMMARY"; : >"$ENV_LOG"; : >"$TESTS_LOG"; : >"$BENCH_LOG"; : >"$PROFILE"

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RENDER_RESERVE=25   # seconds kept back for rendering and the summary
FAILED=0

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh: DRY RUN on $(hostname): CPU-side steps only, tiny shapes, into $OUT"
    # The dry run measures on the CPU: never time the Triton interpreter, and no GPU tests.
    export TRITON_INTERPRET=1
else
    # Real kernels, not the interpreter, whatever the calling shell had.
    unset TRITON_INTERPRET
fi
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# Seconds a stage may take: its cap, cut to what the deadline leaves after the render reserve.
stage_limit() {
    local cap=$1 left
    left=$((DEADLINE - $(date +%s) - RENDER_RESERVE))
    [ "$left" -lt "$cap" ] && cap=$left
    echo "$cap"
}

# run_stage NAME CAP LOG CMD...: run CMD under timeout, append its output to LOG, record the outcome.
run_stage() {
    local name=$1 cap=$2 log=$3 limit t0 rc status
    shift 3
    case "$SKIP" in *" $name "*)
        printf '%-12s %-9s %5s s  %s\n' "$name" "skipped" 0 "(--skip)" | tee -a "$SUMMARY"; return 0 ;;
    esac
    limit=$(stage_limit "$cap")
    if [ "$limit" -lt 10 ]; then
        printf '%-12s %-9s %5s s  %s\n' "$name" "NO TIME" 0 "(deadline of ${BUDGET} s reached)" | tee -a "$SUMMARY"
        FAILED=1
        return 1
    fi
    echo "== [$name] limit ${limit} s: $*" | tee -a "$log"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=TIMEOUT; FAILED=1 ;;
        *) status="FAILED($rc)"; FAILED=1 ;;
    esac
    printf '%-12s %-9s %5s s  %s\n' "$name" "$status" $(($(date +%s) - t0)) "(log: $(basename "$log"))" | tee -a "$SUMMARY"
    if [ "$rc" != 0 ]; then
        echo "---- last lines of $(basename "$log") ----"
        tail -n 15 "$log"
        echo "----"
    fi
    return $rc
}

# ------------------------------------------------------------------------------------ env
{
    echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
    else
        echo "nvidia-smi: not found$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
    fi
    command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
    "$PYTHON" - <<'PY'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
for pkg in ("triton", "open_clip_torch", "inf-cl", "pytest", "numpy", "matplotlib", "ninja", "setuptools"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} (not installed)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
else:
    print("GPU: none visible to torch")
PY
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo "no .git (set LSR_BENCH_COMMIT to record the commit)")"
} >>"$ENV_LOG" 2>&1
grep -E "^(python|GPU|triton|inf-cl|open_clip)" "$ENV_LOG"
if [ "$DRY_RUN" != 1 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; use --dry-run on a CPU machine" | tee -a "$SUMMARY"
    exit 3
fi
if [ "$DRY_RUN" != 1 ]; then
    # Only this GPU's architecture (setup.py's default builds 8.0 and 9.0+PTX: twice the compile time),
    # for every stage: a later load_jit() with other flags than the build's would rebuild.
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    export TORCH_CUDA_ARCH_LIST
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >>"$ENV_LOG"
fi

# Inf-CL, offline, from the wheel that travels with the tree.
if ! "$PYTHON" -c "import inf_cl" >/dev/null 2>&1; then
    if [ "$DRY_RUN" = 1 ]; then
        echo "(dry run) would run: $PYTHON -m pip install --no-deps --no-index --find-links benchmarks/wheels inf-cl" >>"$ENV_LOG"
    elif ls benchmarks/wheels/inf_cl-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install --no-deps --no-index --find-links benchmarks/wheels inf-cl >>"$ENV_LOG" 2>&1 \
            || echo "inf-cl: offline install failed; the provider will be recorded as unavailable" >>"$ENV_LOG"
    else
        echo "inf-cl: no wheel in benchmarks/wheels; the provider will be recorded as unavailable" >>"$ENV_LOG"
    fi
fi

# ---------------------------------------------------------------------------------- build
build_cuda() {
    # The ahead-of-time build README documents; the JIT loader when that leaves no extension.
    # Writes how the extension came (aot or jit) to $1: the later stages load a JIT build themselves.
    local kind_file=$1
    if [ -f setup.py ]; then
        LSR_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install --no-deps --no-build-isolation -v -e . \
            || echo "pip install -e . failed: trying the JIT loader"
    else
        echo "no setup.py: trying the JIT loader"
    fi
    # What every later process (tests, benchmarks) will see without loading anything itself.
    if "$PYTHON" -c "import sys, lsr_kernels; print('HAS_CUDA_EXT in a fresh process:', lsr_kernels.HAS_CUDA_EXT); sys.exit(0 if lsr_kernels.HAS_CUDA_EXT else 1)"; then
        echo aot >"$kind_file"
        return 0
    fi
    "$PYTHON" -c "from lsr_kernels.backends import cuda; cuda.load_jit(verbose=True); print('CUDA extension: built by load_jit')" \
        || return 1
    echo jit >"$kind_file"
}
# Warm Triton's cache for the benchmarks beside the build (nvcc leaves most cores idle): their Triton
# kernels, every autotune config, compiled for sm_90 by scripts/triton_launch_rehearsal.py, one process
# per op; otherwise the benchmarks' autotuning compiles them one after another inside the bench stages.
WARM_DIR=$(mktemp -d)
WARM_PIDS=()
if [ "$DRY_RUN" = 1 ]; then
    WARM_OPS=(clip); WARM_ARGS=()           # the wiring only: one op, no autotuning
else
    WARM_OPS=(clip full itc); WARM_ARGS=(--autotune)
fi
for op in "${WARM_OPS[@]}"; do
    timeout "${WARM_TIMEOUT:-300}" "$PYTHON" scripts/triton_launch_rehearsal.py --bench-set --ops "$op" \
        ${WARM_ARGS[@]+"${WARM_ARGS[@]}"} >"$WARM_DIR/$op.log" 2>&1 &
    WARM_PIDS+=($!)
done
finish_warmup() {
    # Before the first timing: a compile beside it would perturb it. Logged into env_build.log.
    [ ${#WARM_PIDS[@]} -eq 0 ] && return
    local pid status=ok
    for pid in "${WARM_PIDS[@]}"; do wait "$pid" || status=FAILED; done
    { echo "---- Triton cache warm-up for the benchmarks ($status)"; cat "$WARM_DIR"/*.log; } >>"$ENV_LOG" 2>&1
    printf '%-12s %-9s\n' warm-up "$status" | tee -a "$SUMMARY"
    WARM_PIDS=()
    rm -rf "$WARM_DIR"
}

if [ "$DRY_RUN" = 1 ]; then
    run_stage build 60 "$ENV_LOG" "$PYTHON" -c \
        "import lsr_kernels; print('(dry run) import ok; would build with LSR_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e . or cuda.load_jit()')"
else
    BUILD_KIND_FILE=$(mktemp)
    run_stage build "${BUILD_TIMEOUT:-210}" "$ENV_LOG" bash -c "$(declare -f build_cuda); PYTHON='$PYTHON' build_cuda '$BUILD_KIND_FILE'"
    CUDA_EXT_KIND=$(cat "$BUILD_KIND_FILE" 2>/dev/null)
    rm -f "$BUILD_KIND_FILE"
fi
# No extension: the CUDA tests skip (one cause, reported by the build stage) instead of each xdist
# worker starting a minutes-long JIT build. A JIT build is in torch's extension cache: the tests'
# load_jit() and the benchmarks' (LSR_BENCH_CUDA_JIT=1) find it there and only load it.
case "${CUDA_EXT_KIND:-none}" in
    aot) ;;
    jit) export LSR_BENCH_CUDA_JIT=1 ;;
    *) export LSR_SKIP_CUDA_BUILD=1 ;;
esac

# ---------------------------------------------------------------------------------- tests
if [ "$DRY_RUN" = 1 ]; then
    # Only that the GPU selection collects (and skips) cleanly without a GPU.
    run_stage tests 120 "$TESTS_LOG" "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider
else
    # One Triton config per kernel (LSR_TRITON_AUTOTUNE=0: autotuning every dtype x width x flag set
    # would spend the stage compiling; test_gpu_every_autotune_config still runs each config), and the
    # fused backends' files first, so a stage cut by its limit has them.
    FIRST="tests/test_parity.py tests/test_triton.py tests/test_cuda.py tests/test_train.py"
    REST=$(for f in tests/test_*.py; do case " $FIRST " in *" $f "*) ;; *) printf '%s ' "$f" ;; esac; done)
    # Most of the stage is Triton compiling a kernel per dtype x shape specialisation, one core each:
    # with pytest-xdist (in the GPU image) TEST_WORKERS processes compile in parallel and share the GPU.
    # -v names each test as it ends, so a stage cut by its limit still says what passed.
    WORKERS=()
    # Default: one per core up to 12 (the GPU machine has 16: room for ptxas and inductor's helpers).
    CORES=$(nproc 2>/dev/null || echo 8)
    [ "$CORES" -gt 12 ] && CORES=12
    if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then WORKERS=(-n "${TEST_WORKERS:-$CORES}"); fi
    # shellcheck disable=SC2086  # word splitting of the file lists is intended
    run_stage tests "${TESTS_TIMEOUT:-150}" "$TESTS_LOG" env LSR_TEST_GPU=1 LSR_TRITON_AUTOTUNE=0 \
        "$PYTHON" -m pytest -m gpu -v --tb=short -p no:cacheprovider -ra ${WORKERS[@]+"${WORKERS[@]}"} $FIRST $REST
fi

# ------------------------------------------------------------------------------ benchmarks
if [ "$DRY_RUN" = 1 ]; then
    # Same commands at tiny shapes on the CPU; the GPU-only providers are recorded as unavailable.
    DEVICE_ARGS=(--device cpu --tiny --threads 1 --min-time 0.05 --reps 2 --modes full)
    CORE_PROVIDERS=(--providers triton,cuda,inf_cl,reference)
    SMALL_PROVIDERS=(--providers chunked --ops clip)
    MAXN_ARGS=(--n-max 131072)
    PROFILE_ARGS=(--device cpu --tiny --providers chunked,triton,cuda)
else
    DEVICE_ARGS=()
    CORE_PROVIDERS=()
    # torch.compile recompiles for every N (30-60 s each): it is in the core set only.
    SMALL_PROVIDERS=(--providers triton,cuda,chunked,inf_cl,open_clip,reference)
    MAXN_ARGS=(--time-cap 15 --call-cap 4)
    PROFILE_ARGS=()
fi
finish_warmup
run_stage bench-core "${CORE_TIMEOUT:-120}" "$BENCH_LOG" \
    "$PYTHON" -m benchmarks gpu-core ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${CORE_PROVIDERS[@]+"${CORE_PROVIDERS[@]}"} --out "$RESULTS"
# The sweep (Inf-CL and the others at every N, which the Triton issue asks for) before the profile
# (a diagnostic for us): the stages' caps add up to more than the budget, so the last ones may get none.
run_stage bench-sweep "${SWEEP_TIMEOUT:-75}" "$BENCH_LOG" \
    "$PYTHON" -m benchmarks gpu-sweep --short ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${SMALL_PROVIDERS[@]+"${SMALL_PROVIDERS[@]}"} --out "$RESULTS"
run_stage profile "${PROFILE_TIMEOUT:-60}" "$PROFILE" \
    "$PYTHON" -m benchmarks profile ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"}
run_stage bench-maxn "${MAXN_TIMEOUT:-100}" "$BENCH_LOG" \
    "$PYTHON" -m benchmarks gpu-maxn ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} ${SMALL_PROVIDERS[@]+"${SMALL_PROVIDERS[@]}"} ${MAXN_ARGS[@]+"${MAXN_ARGS[@]}"} --out "$RESULTS"

# ---------------------------------------------------------------------------------- render
PLOTS_TMP=$(mktemp -d)
RENDER_LIMIT=$((DEADLINE + RENDER_RESERVE - $(date +%s)))
[ "$RENDER_LIMIT" -lt 15 ] && RENDER_LIMIT=15
if [ -s "$RESULTS" ]; then
    timeout "$RENDER_LIMIT" "$PYTHON" -m benchmarks render "$RESULTS" --plots-dir "$PLOTS_TMP/plots" \
        --table "$OUT/README_table.md" >>"$BENCH_LOG" 2>&1 && render_status=ok || { render_status=FAILED; FAILED=1; }
    [ -d "$PLOTS_TMP/plots" ] && tar -czf "$OUT/plots.tar.gz" -C "$PLOTS_TMP" plots
else
    render_status="no results"
    FAILED=1
fi
rm -rf "$PLOTS_TMP"
printf '%-12s %-9s\n' render "$render_status" | tee -a "$SUMMARY"

# --------------------------------------------------------------------------------- summary
{
    echo
    echo "total $(($(date +%s) - START)) s of a ${BUDGET} s budget$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
    if [ -s "$RESULTS" ]; then
        "$PYTHON" - "$RESULTS" <<'PY'
import collections, json, sys
recs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
count = collections.Counter(r["status"] for r in recs)
print(f"{len(recs)} records in gpu.jsonl:", ", ".join(f"{v} {k}" for k, v in sorted(count.items())))
for r in recs:
    if r["status"] in ("error", "timeout", "skipped"):
        print(f"  {r['status']}: {r['provider']} {r['op']} {r['mode']} N={r['N']}: {str(r['note'])[:200]}")
PY
    fi
    [ -s "$OUT/README_table.md" ] && { echo; cat "$OUT/README_table.md"; }
    if [ -s "$RESULTS" ]; then
        echo
        echo "what backend='auto' would pick from these timings (python -m benchmarks choose-auto):"
        "$PYTHON" -m benchmarks choose-auto "$RESULTS" --print-only
    fi
} >>"$SUMMARY" 2>&1
echo "================ summary ($SUMMARY)"
cat "$SUMMARY"
exit $FAILED
