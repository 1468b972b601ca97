#!/usr/bin/env bash
# The CUDA check, in one call on a machine with a GPU (under 8 minutes):
#   1. compile every bundled fixture and bench/make_llama.py's 30-layer model at -O3 --target cuda (onnxc's own
#      verification, on the CPU execution provider);
#   2. verify each compiled model on CUDAExecutionProvider against its input (bench/verify_provider.py);
#   3. bench the Llama fixture and the 30-layer model against their unoptimized float16 form (`onnxc bench`,
#      prefill:128 and decode:256 on cuda): the fp16 export fixture, and the 30-layer export through
#      convert-fp16 alone; the compiled models use --io-fp16, so all take the same float16 inputs;
#   4. write the results under $OUT: summary.txt, gpu_check.log, bench-*.json, bench-*.png, reports.tar.gz.
#
#   bench/gpu_check.sh             # needs onnxruntime-gpu with CUDAExecutionProvider
#   bench/gpu_check.sh --dry-run   # the same steps on the CPU provider with one tiny fixture, a few runs (CI)
#
# Needs python3 (or $PYTHON) with onnxc's dependencies; onnxc runs from this checkout, whatever is installed.
# torch and transformers are needed only to build the 30-layer model (bench/make_llama.py); without them, or with
# --dry-run, that step is skipped and the summary says so. Large files go to $WORK (default: a temporary folder,
# removed at the end), never to $OUT.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d -t onnxc-gpu-check-out.XXXXXX)}"
mkdir -p "$OUT"
OWN_WORK=0
if [ -z "${WORK:-}" ]; then WORK="$(mktemp -d -t onnxc-gpu-check.XXXXXX)"; OWN_WORK=1; fi
mkdir -p "$WORK/models" "$WORK/reports"
cleanup() { if [ "$OWN_WORK" = 1 ]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo "== $* ($((SECONDS - START)) s)" | tee -a "$LOG" >&2; }

# onnxc from this checkout, whatever is installed: a package folder of links (compiler/ is onnxc, passes/ and
# kernels/ its subpackages, as pyproject.toml maps them) first on the path.
mkdir -p "$WORK/shim/onnxc"
for f in "$ROOT"/compiler/*.py; do ln -s "$f" "$WORK/shim/onnxc/"; done
ln -s "$ROOT/passes" "$WORK/shim/onnxc/passes"
ln -s "$ROOT/kernels" "$WORK/shim/onnxc/kernels"
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
onnxc() { "$PY" -c 'import sys; sys.argv[0] = "onnxc"; from onnxc._entry import main; main()' "$@"; }

if [ "$DRY" = 1 ]; then
    PROVIDER=cpu
    FIXTURES=(llama_dynamo_past)
    BENCH_ARGS=(--scenario prefill:8 --scenario decode:16 --runs 3 --warmup 1)
else
    PROVIDER=cuda
    if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        echo "gpu_check: onnxruntime has no CUDAExecutionProvider here (pip install -e '.[cuda]'); --dry-run runs on cpu" >&2
        exit 2
    fi
    mapfile -t FIXTURES < <("$PY" -c "
import json, sys
for e in json.load(open(sys.argv[1]))['models']:
    if not e.get('skipped'):
        print(e['file'].rsplit('/', 1)[-1][:-5])" "$ROOT/fixtures/manifest.json")
    BENCH_ARGS=(--scenario prefill:128 --scenario decode:256 --runs 50 --warmup 5)
fi
HAVE_PLOT=0
if "$PY" -c "import matplotlib" 2>/dev/null; then HAVE_PLOT=1; fi
# bench NAME MODEL...: onnxc bench on the provider, the table to the summary, JSON (and a plot) to $OUT.
bench_to() {
    local name="$1"; shift
    local args=("$@" --provider "$PROVIDER" "${BENCH_ARGS[@]}" --json "$OUT/bench-$name.json")
    if [ "$HAVE_PLOT" = 1 ]; then args+=(--plot "$OUT/bench-$name.png"); fi
    local rc=0
    onnxc bench "${args[@]}" >"$WORK/reports/bench-$name.txt" 2>>"$LOG" || rc=$?
    tee -a "$SUMMARY" <"$WORK/reports/bench-$name.txt"
    return "$rc"
}

say "onnxc from $("$PY" -c 'import onnxc, pathlib; print(pathlib.Path(onnxc.__file__).resolve().parent.parent)')"
say "onnxc gpu_check on $PROVIDER$([ "$DRY" = 1 ] && echo ' (dry run)'): $("$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$SUMMARY" || true

# 1: compile each fixture at -O3 --target cuda; 2: verify them all on the provider (one process).
pairs=(); failed=()
for name in "${FIXTURES[@]}"; do
    step "compile $name"
    if onnxc compile "$ROOT/fixtures/models/$name.onnx" -O3 --target cuda -o "$WORK/models/$name.O3.onnx" \
        --report "$WORK/reports/$name.O3.json" -q >>"$LOG" 2>&1; then
        pairs+=("$ROOT/fixtures/models/$name.onnx" "$WORK/models/$name.O3.onnx")
    else
        failed+=("$name: compile -O3 --target cuda ($(tail -1 "$LOG"))")
    fi
done
step "verify ${#FIXTURES[@]} fixtures on $PROVIDER"
"$PY" "$ROOT/bench/verify_provider.py" --provider "$PROVIDER" "${pairs[@]}" >"$WORK/reports/verify-fixtures.txt" 2>&1 || true
verified=$(grep -c ": passed (" "$WORK/reports/verify-fixtures.txt" || true)
while read -r line; do failed+=("verify: $line"); done < <(grep -E ": failed" "$WORK/reports/verify-fixtures.txt" || true)
say "fixtures: ${#FIXTURES[@]}, compiled at -O3 --target cuda: $((${#pairs[@]} / 2)), verified on $PROVIDER: $verified"

# run WHAT COMMAND...: run it with its output in the log; a failure is noted in the summary, the check goes on.
run() {
    local what="$1"; shift
    step "$what"
    if ! "$@" >>"$LOG" 2>&1; then failed+=("$what (see gpu_check.log)"); return 1; fi
}

# 3: bench the Llama fixture: its unoptimized float16 export against onnxc -O3 --target cuda --io-fp16.
if run "compile llama_dynamo_past -O3 --target cuda --io-fp16" onnxc compile \
    "$ROOT/fixtures/models/llama_dynamo_past.onnx" -O3 --target cuda --io-fp16 \
    -o "$WORK/models/llama_fixture.O3.fp16io.onnx" --report "$WORK/reports/llama_fixture.O3.fp16io.json" -q; then
    step "bench the Llama fixture on $PROVIDER"
    bench_to fixture "$ROOT/fixtures/models/llama_dynamo_past_fp16.onnx" \
        "$WORK/models/llama_fixture.O3.fp16io.onnx" || failed+=("bench the Llama fixture (see gpu_check.log)")
fi

# The 30-layer model: built with torch (bench/make_llama.py), compiled, verified and benched the same way.
L="$WORK/llama30"
if [ "$DRY" = 1 ]; then
    say "30-layer model: skipped in --dry-run (building it needs torch)"
elif ! "$PY" -c "import torch, transformers" 2>/dev/null; then
    say "30-layer model: skipped: torch and transformers are not importable (pip install -e '.[fixtures]')"
elif [ $((SECONDS - START)) -gt 240 ]; then
    say "30-layer model: skipped: $((SECONDS - START)) s already spent, and it takes about 4 minutes more"
elif run "build the 30-layer model" "$PY" "$ROOT/bench/make_llama.py" --out "$L/model.onnx" --no-verify \
    && run "compile the 30-layer model at -O3 --target cuda" onnxc compile "$L/model.onnx" -O3 --target cuda \
        -o "$L/model.O3.onnx" --report "$WORK/reports/llama30.O3.json" -q \
    && run "compile it with --io-fp16" onnxc compile "$L/model.onnx" -O3 --target cuda --io-fp16 \
        -o "$L/model.O3.fp16io.onnx" --report "$WORK/reports/llama30.O3.fp16io.json" -q \
    && run "convert it to float16 alone (the unoptimized fp16 model)" onnxc compile "$L/model.onnx" --target cuda \
        --passes convert-fp16 --io-fp16 -o "$L/model.fp16.onnx" --report "$WORK/reports/llama30.fp16.json" -q; then
    step "verify the 30-layer model on $PROVIDER"
    if "$PY" "$ROOT/bench/verify_provider.py" --provider "$PROVIDER" "$L/model.onnx" "$L/model.O3.onnx" \
        >"$WORK/reports/llama30.verify.txt" 2>&1; then
        say "30-layer model: -O3 --target cuda verified on $PROVIDER"
    else
        failed+=("llama30: verify on $PROVIDER ($(tail -1 "$WORK/reports/llama30.verify.txt"))")
    fi
    step "bench the 30-layer model on $PROVIDER"
    bench_to llama30 "$L/model.fp16.onnx" "$L/model.O3.fp16io.onnx" || failed+=("bench the 30-layer model")
fi

tar -czf "$OUT/reports.tar.gz" -C "$WORK" reports
for f in "${failed[@]+"${failed[@]}"}"; do say "FAILED: $f"; done
say "done in $((SECONDS - START)) s; results in $OUT"
[ "${#failed[@]}" = 0 ]
