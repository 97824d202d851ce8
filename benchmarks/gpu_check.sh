#!/usr/bin/env bash
# fastpeft's GPU check: one run on a machine with one NVIDIA GPU, in under 8 minutes, from a
# plain copy of the repository (no pip install, no network): the environment, an import of
# fastpeft, the tests that run the Triton kernels on CUDA, and the bf16 benchmark sweep
# (then fp32 --quick while time is left). Everything goes into one folder, as it happens:
#
#   env.txt          GPU, driver, python / torch / triton / numpy / transformers / peft
#   <step>.log       each step's output (stdout and stderr), written while it runs
#   tests-*.xml      pytest's JUnit report of each test group (when the group finished)
#   bench-*/         fastpeft-bench results (<timestamp>.json, results.csv) per sweep
#   steps.tsv        step, status, seconds, log: one line per finished step
#   summary.md       device, versions, date, the steps, test counts and benchmark tables;
#                    rewritten after every step, so a run that is killed leaves one too
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--build-cpu] [OUTDIR]
#   OUTDIR      default: $OUT when set, else benchmarks/results/<gpu>-<UTC date>/
#               (dry run: ${TMPDIR:-/tmp}/fastpeft-gpu-check-dryrun-<UTC date>/)
#   --budget    seconds for the whole run (default 450); each step gets what is left,
#               up to its own cap, and a step with under 20 s left is skipped
#   --build-cpu also build the C++ CPU kernels (needs a compiler and ninja; off by default:
#               this check is about the GPU, and CPU tensors then use the reference)
#   --dry-run   on a machine without a GPU: the same steps with the Triton interpreter on a
#               few tests and the smallest benchmark shapes, to check this script end to end
#               (CI runs it)
# Environment: PYTHON (default python3); GPU_CHECK_PYTHONPATH, folders put after the
# repository on PYTHONPATH (e.g. pytest from `pip install --target DIR pytest`, when the GPU
# machine has none).
# Exit status: 0 when every step passed, 1 when any failed, timed out or was skipped for
# lack of time, 2 for a usage error. A failing step does not stop the later ones.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
BUILD_CPU=0
BUDGET=450
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --build-cpu) BUILD_CPU=1 ;;
        --budget) shift; BUDGET="${1:-}" ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUTDIR="$1" ;;
    esac
    shift
done
case "$BUDGET" in
    ''|*[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

START=$(date +%s)
DEADLINE=$((START + BUDGET))
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
if [ "$DRY_RUN" = 0 ] && [ -z "$GPU_NAME" ]; then
    echo "gpu_check.sh: nvidia-smi finds no GPU here; use --dry-run on a machine without one" >&2
    exit 2
fi
if [ -z "$OUTDIR" ]; then
    if [ -n "${OUT:-}" ]; then
        OUTDIR="$OUT"
    elif [ "$DRY_RUN" = 1 ]; then
        OUTDIR="${TMPDIR:-/tmp}/fastpeft-gpu-check-dryrun-$STAMP"
    else
        slug="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed 's/^nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')"
        OUTDIR="$ROOT/benchmarks/results/$slug-$STAMP"
    fi
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
: > "$OUTDIR/steps.tsv"

# fastpeft from this checkout, not an installed copy; the C++ CPU kernels only when asked.
export PYTHONPATH="$ROOT${GPU_CHECK_PYTHONPATH:+:$GPU_CHECK_PYTHONPATH}${PYTHONPATH:+:$PYTHONPATH}"
export FASTPEFT_CACHE_DIR="$OUTDIR/.cpu-kernels"
[ "$BUILD_CPU" = 1 ] || export FASTPEFT_NO_JIT=1
export PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1  # the Triton kernels on CPU tensors
    DEVICE=cpu
else
    unset TRITON_INTERPRET
    DEVICE=cuda
fi
export ROOT PYTHON GPU_NAME BUILD_CPU
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # parallel compiles of the C++ kernels (--build-cpu)
cd "$ROOT" || exit 2

# run_step NAME CAP CMD...: run CMD with at most CAP seconds (less when the budget is short),
# its output in NAME.log; appends "NAME status seconds log" to steps.tsv.
run_step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    local log="$OUTDIR/$name.log"
    if [ "$limit" -lt 20 ]; then
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$OUTDIR/steps.tsv"
        echo "== $name: skipped, ${left}s of the budget left"
        return 1
    fi
    echo "== $name (at most ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    if declare -F "$1" > /dev/null; then  # a function of this script, in a child bash
        timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" > "$log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    fi
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$name.log" \
        >> "$OUTDIR/steps.tsv"
    echo "   $name: $status, $(($(date +%s) - t0))s"
    [ $rc = 0 ]
}

# The closing line of a pytest log ("12 passed, 1 failed in 30.1s"), or why there is none.
pytest_counts() {
    local line
    line="$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran)( |,).* in [0-9.]+s' \
        "$1" 2>/dev/null | tail -n 1 | sed 's/^=* //; s/ =*$//')"
    echo "${line:-no closing line (killed or crashed; see the log)}"
}

write_summary() {
    local s="$OUTDIR/summary.md" log step
    {
        if [ "$DRY_RUN" = 1 ]; then
            echo "# fastpeft GPU check: DRY RUN on a CPU (plumbing only; no figure here means anything)"
        else
            echo "# fastpeft GPU check: $GPU_NAME"
        fi
        echo
        echo "| | |"
        echo "| --- | --- |"
        grep -E '^(date|gpu|driver|python|torch|triton|numpy|transformers|peft|fastpeft commit):' \
            "$OUTDIR/env.txt" 2>/dev/null | sed 's/^\([^:]*\): *\(.*\)$/| \1 | \2 |/'
        grep -E '^C\+\+ CPU kernels:' "$OUTDIR/import.log" 2>/dev/null \
            | sed 's/^\([^:]*\): *\(.*\)$/| \1 | \2 |/'
        echo "| command | \`benchmarks/gpu_check.sh $ARGS_TEXT\` |"
        echo
        echo "## Steps"
        echo
        echo "| step | result | seconds | log |"
        echo "| --- | --- | --- | --- |"
        awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$OUTDIR/steps.tsv"
        if ls "$OUTDIR"/tests-*.log > /dev/null 2>&1; then
            echo
            echo "## Tests"
            echo
            echo "| group | pytest |"
            echo "| --- | --- |"
            for log in "$OUTDIR"/tests-*.log; do
                echo "| $(basename "$log" .log) | $(pytest_counts "$log") |"
            done
            local failed
            failed="$(grep -hE '^(FAILED|ERROR) ' "$OUTDIR"/tests-*.log 2>/dev/null | head -n 40)"
            if [ -n "$failed" ]; then
                echo
                echo '```'
                echo "$failed"
                echo '```'
            fi
        fi
        for step in $(cut -f1 "$OUTDIR/steps.tsv" | grep '^bench-'); do
            log="$OUTDIR/$step.log"
            [ -e "$log" ] || continue
            echo
            echo "## $step"
            echo
            echo '```'
            tail -n 150 "$log"
            echo '```'
        done
    } > "$s.tmp" && mv "$s.tmp" "$s"
}

ARGS_TEXT="$([ "$DRY_RUN" = 1 ] && echo "--dry-run ")--budget $BUDGET$([ "$BUILD_CPU" = 1 ] && echo " --build-cpu")"
echo "fastpeft GPU check$([ "$DRY_RUN" = 1 ] && echo " (dry run)"): results in $OUTDIR, budget ${BUDGET}s"
FAILED=0

# 1. The environment.
env_report() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "gpu: ${GPU_NAME:-none}"
    local driver
    driver="$(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "driver: ${driver:-none}"
    echo "fastpeft commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
    echo "cpu kernels build: $([ "$BUILD_CPU" = 1 ] && echo "on first import (--build-cpu)" || echo "off (FASTPEFT_NO_JIT=1; a prebuilt fastpeft._C still loads)")"
    echo "host: $(uname -srm), $(nproc) cores"
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import platform

print(f"python: {platform.python_version()}")
for name in ("torch", "triton", "numpy", "transformers", "peft", "pytest", "pytest-xdist",
             "bitsandbytes", "ninja"):
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        version = "not installed"
    print(f"{name}: {version}")
import torch

print(f"torch cuda: {torch.version.cuda}; available: {torch.cuda.is_available()}"
      + (f"; {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
         if torch.cuda.is_available() else ""))
EOF
    echo
    nvidia-smi 2> /dev/null || echo "(no nvidia-smi)"
}
run_step env 60 env_report || FAILED=1
cp "$OUTDIR/env.log" "$OUTDIR/env.txt"
sed -n '1,/^$/p' "$OUTDIR/env.txt"
write_summary

# 2. Import fastpeft from the checkout: which backend each op gets (and, with --build-cpu,
#    the C++ CPU kernels built on first use, MAX_JOBS compiles at a time, into OUTDIR).
run_step import 240 "$PYTHON" -m fastpeft.info || FAILED=1
write_summary

# 3. The tests that run the Triton kernels (ids "triton-cuda"; the interpreter's
#    "triton-cpu" in the dry run), one pytest process per group at once: Triton compiles
#    each kernel on first launch, one at a time per process, so the groups share the cores.
#    A group's log grows as its tests pass; its JUnit XML is written when it finishes.
if [ "$DRY_RUN" = 1 ]; then
    TEST_GROUPS=("lora_linear:tests/test_lora_linear.py:triton and (empty_batch or dropout_mask)"
                 "other_ops:tests/test_int8_lora_linear.py tests/test_nf4_lora_linear.py tests/test_bottleneck_adapter.py tests/test_gated_prefix_attention.py:triton and (empty_batch or log_sum_exps)")
    TEST_CAP=180
else
    TEST_GROUPS=()
    for f in lora_linear int8_lora_linear nf4_lora_linear multi_lora_linear bottleneck_adapter \
             gated_prefix_attention properties autograd op_layer triton_compat; do
        TEST_GROUPS+=("$f:tests/test_$f.py:triton or mixed_devices")
    done
    TEST_CAP=210
fi
pids=()
for group in "${TEST_GROUPS[@]}"; do
    IFS=: read -r name files expr <<< "$group"
    # shellcheck disable=SC2086  # $files is a list of paths
    run_step "tests-$name" "$TEST_CAP" "$PYTHON" -m pytest -q -p no:cacheprovider -rfE \
        --junitxml="$OUTDIR/tests-$name.xml" -k "$expr" $files &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || FAILED=1
done
write_summary

# 4. Benchmarks: the bf16 sweep one op at a time (a sweep that runs out of time loses one
#    op's records, not all), then fp32 --quick with what is left.
if [ "$DRY_RUN" = 1 ]; then
    BENCH_SHAPES=(--shapes tiny --runs 2)
    FP32_SHAPES=(--shapes tiny --runs 2)
else
    BENCH_SHAPES=(--shapes full)
    FP32_SHAPES=(--quick)
fi
for op in lora_linear int8_lora_linear nf4_lora_linear multi_lora_linear gated_prefix_attention \
          bottleneck_adapter; do
    run_step "bench-bf16-$op" 120 "$PYTHON" -m fastpeft.bench --device "$DEVICE" --dtype bf16 \
        --ops "$op" "${BENCH_SHAPES[@]}" --no-progress --out "$OUTDIR/bench-bf16" || FAILED=1
    write_summary
done
run_step bench-fp32-quick 150 "$PYTHON" -m fastpeft.bench --device "$DEVICE" --dtype fp32 \
    "${FP32_SHAPES[@]}" --no-progress --out "$OUTDIR/bench-fp32" || FAILED=1
write_summary

rm -rf "$OUTDIR/.cpu-kernels"
echo
echo "steps:"
column -t -s $'\t' "$OUTDIR/steps.tsv" 2>/dev/null || cat "$OUTDIR/steps.tsv"
echo "total $(($(date +%s) - START))s; summary: $OUTDIR/summary.md"
exit $FAILED
