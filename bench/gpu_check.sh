#!/usr/bin/env bash
# GPU check for dspark_kernels (docs/correctness.md, docs/performance.md): build with CUDA, run the CUDA tests,
# the NVRTC backend's checks, the benchmark suite, compute-sanitizer on a small subset; everything under 8 minutes.
#
#   OUT=/some/dir bash bench/gpu_check.sh        # from the repository root
#
# Writes to $OUT (at most 8 files): gpu_check.log (everything, with the build's tail),
# tests.log (CUDA tests, then the NVRTC stage, then the CPU suite), sanitizer.log, bench.log, bench.json (verify), bench_all.json (the other
# subcommands), bench.png, summary.txt (printed last).
# Exit code: nonzero if the build or the CUDA tests fail (or the benchmark finds a
# mismatch); the later stages run anyway where they make sense.
# Knobs: GPU_CHECK_BUDGET (seconds, default 470), PYTHON (default python3),
# GPU_CHECK_BENCH_ARGS (extra arguments for `dspark_kernels.bench all`, e.g. --quick).
set -uo pipefail

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
# stage_timeout CAP RESERVE: at most CAP seconds, leaving RESERVE seconds for the stages after it
stage_timeout() {
  local left=$(( BUDGET - $(elapsed) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 10 )) && left=10  # never 0: `timeout 0` would mean no limit
  echo $left
}
banner() { echo; echo "===== [$(elapsed)s] $* ====="; }

RC=0
BUILD="not run"; BACKENDS="?"; CUDA_TESTS="not run"; NVRTC="not run"; SANITIZER="not run"; BENCH="not run"; CPU_TESTS="not run"

# Counts from pytest's closing line, e.g. "3 failed, 40 passed, 2 skipped in 12.3s".
pytest_counts() { grep -Eo '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed|deselected)' "$1" | tr '\n' ' '; }

banner "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1 || echo "nvidia-smi failed"
command -v nvcc >/dev/null && nvcc --version | tail -2
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
$PY -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not importable"
git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20

# ---------------------------------------------------------------- build
banner "build (CUDA, in place)"
if NVCC=$(command -v nvcc); then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# a wrapper script (not a link) in /usr/local/bin would give /usr/local: fall back to the toolkit folder
if [ ! -f "${CUDA_HOME:-/nonexistent}/include/cuda_runtime.h" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "CUDA_HOME=${CUDA_HOME:-<none>}"
export TORCH_CUDA_ARCH_LIST=9.0a DSPARK_REQUIRE_CUDA_BUILD=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
T=$(stage_timeout 240 220)
timeout -k 10 "$T" $PY setup.py build_ext --inplace > /tmp/dspark_build.log 2>&1
BRC=$?
tail -60 /tmp/dspark_build.log
if (( BRC == 0 )); then BUILD="ok ($(elapsed)s)"; else BUILD="FAILED rc=$BRC (timeout ${T}s if 124)"; RC=1; fi
echo "build: $BUILD"

BACKENDS=$($PY -c 'import dspark_kernels as d; print(d.backends("verify_block"))' 2>&1 | tail -1)
echo "backends: $BACKENDS"

# ---------------------------------------------------------------- CUDA tests
banner "CUDA tests (pytest -m cuda)"
T=$(stage_timeout 150 190)
timeout -k 10 "$T" $PY -m pytest python_tests -m "cuda and not slow" -q -p no:cacheprovider \
  --ignore=python_tests/test_nvrtc.py > "$OUT/tests.log" 2>&1  # test_nvrtc.py: the NVRTC stage
TRC=$?
tail -30 "$OUT/tests.log"
case $TRC in
  0) CUDA_TESTS="ok: $(pytest_counts "$OUT/tests.log")" ;;
  5) CUDA_TESTS="none collected (no test marked cuda)" ;;
  124|137) CUDA_TESTS="TIMEOUT after ${T}s: $(pytest_counts "$OUT/tests.log")"; RC=1 ;;
  *) CUDA_TESTS="FAILED rc=$TRC: $(pytest_counts "$OUT/tests.log")"; RC=1 ;;
esac
echo "CUDA tests: $CUDA_TESTS"

# ---------------------------------------------------------------- NVRTC
banner "NVRTC: the same kernels compiled at run time (compile report, then the CUDA tests on backend=nvrtc)"
# 1. every program for this GPU's architecture, in parallel (warms the cache the tests use; registers / spills);
# 2. test_nvrtc.py's GPU tests (nvrtc == extension == reference, cold / warm compile times, CUDA graphs,
#    torch.compile) and the CUDA tests of verify_block / kv / schedule rerun with DSPARK_TEST_GPU_BACKEND=nvrtc.
ARCH=$($PY -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"sm_{M}{m}")' 2>/dev/null || echo sm_90)
T=$(stage_timeout 60 260)
{ echo; echo "===== NVRTC compile ($ARCH) ====="; } >> "$OUT/tests.log"
timeout -k 10 "$T" $PY -m dspark_kernels.nvrtc compile --arch "$ARCH" --jobs "$(nproc)" >> "$OUT/tests.log" 2>&1
NRC=$?
grep -E "programs|kernels in|OK:|FAILED|ERROR|SPILL" "$OUT/tests.log" | tail -8
T=$(stage_timeout 120 200)
{ echo; echo "===== NVRTC tests ====="; } >> "$OUT/tests.log"
NVRTC_LOG=$(mktemp /tmp/nvrtc_tests.XXXXXX)
DSPARK_TEST_GPU_BACKEND=nvrtc timeout -k 10 "$T" $PY -m pytest python_tests/test_nvrtc.py python_tests/test_verify_block_cuda.py \
  python_tests/test_kv.py python_tests/test_schedule_verify_lens.py -m "cuda and not slow" -q -s -p no:cacheprovider \
  > "$NVRTC_LOG" 2>&1
NTRC=$?
cat "$NVRTC_LOG" >> "$OUT/tests.log"
grep -E "^nvrtc " "$NVRTC_LOG"
tail -15 "$NVRTC_LOG"
case $NTRC in
  0) NVRTC="ok: $(pytest_counts "$NVRTC_LOG")" ;;
  124|137) NVRTC="TIMEOUT after ${T}s: $(pytest_counts "$NVRTC_LOG")"; RC=1 ;;
  *) NVRTC="FAILED rc=$NTRC: $(pytest_counts "$NVRTC_LOG")"; RC=1 ;;
esac
(( NRC != 0 )) && { NVRTC="compile report rc=$NRC (errors or spills, see tests.log); tests $NVRTC"; RC=1; }
NVRTC="$NVRTC; $(grep -E '^nvrtc ' "$NVRTC_LOG" | tr '\n' ' ')"
rm -f "$NVRTC_LOG"
echo "NVRTC: $NVRTC"

# ---------------------------------------------------------------- benchmark
banner "benchmark (dspark_kernels.bench all)"
# verify first (the foundation's numbers), then every other subcommand briefly.
T=$(stage_timeout 100 140)
timeout -k 10 "$T" $PY -m dspark_kernels.bench verify ${GPU_CHECK_BENCH_ARGS:-} --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  > "$OUT/bench.log" 2>&1
BRC2=$?
T=$(stage_timeout 120 70)
timeout -k 10 "$T" $PY -m dspark_kernels.bench all --max-time 0.05 ${GPU_CHECK_BENCH_ARGS:-} --json "$OUT/bench_all.json" \
  >> "$OUT/bench.log" 2>&1
BRC3=$?
(( BRC2 == 0 )) && BRC2=$BRC3
tail -60 "$OUT/bench.log"
case $BRC2 in
  0) BENCH="ok" ;;
  1) BENCH="ran, with mismatches or backend errors (see bench.log)"; RC=1 ;;
  124|137) BENCH="TIMEOUT after ${T}s" ;;
  *) BENCH="FAILED rc=$BRC2 (see bench.log)"; RC=1 ;;
esac
echo "bench: $BENCH"

# ---------------------------------------------------------------- compute-sanitizer
banner "compute-sanitizer memcheck (python_tests/sanitizer_verify.py)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer ${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$SAN" ]; then
  SANITIZER="skipped: compute-sanitizer not found"
  echo "$SANITIZER" | tee "$OUT/sanitizer.log"
else
  T=$(stage_timeout 90 10)
  # No caching allocator: an out-of-bounds access inside a cached block would go unseen.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T" "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 \
    $PY python_tests/sanitizer_verify.py > "$OUT/sanitizer.log" 2>&1
  SRC=$?
  tail -30 "$OUT/sanitizer.log"
  if grep -qiE "device not supported|unable to find injection|not supported on this platform" "$OUT/sanitizer.log"; then
    SANITIZER="unsupported here (see sanitizer.log)"
  else
    case $SRC in
      0) SANITIZER="clean: $(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' "$OUT/sanitizer.log" | tail -1); $(grep -E '^sanitizer_verify:' "$OUT/sanitizer.log" | tail -1)" ;;
      99) SANITIZER="MEMCHECK ERRORS: $(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' "$OUT/sanitizer.log" | tail -1)"; RC=1 ;;
      124|137) SANITIZER="timeout after ${T}s (incomplete, not a failure)" ;;
      *) SANITIZER="FAILED rc=$SRC: $(grep -E '^sanitizer_verify:' "$OUT/sanitizer.log" | tail -1)"; RC=1 ;;
    esac
  fi
fi
echo "sanitizer: $SANITIZER"

# ---------------------------------------------------------------- CPU suite, if time is left
banner "CPU test suite (not cuda, not slow), if time permits"
T=$(stage_timeout 240 15)
if (( T >= 30 )); then
  CPU_LOG=$(mktemp /tmp/cpu_tests.XXXXXX)
  timeout -k 5 "$T" $PY -m pytest python_tests -m "not cuda and not slow" -q -x -p no:cacheprovider \
    > "$CPU_LOG" 2>&1
  CRC=$?
  tail -15 "$CPU_LOG"
  case $CRC in
    0) CPU_TESTS="ok: $(pytest_counts "$CPU_LOG")" ;;
    124|137) CPU_TESTS="stopped at the time budget (${T}s): $(pytest_counts "$CPU_LOG")" ;;
    *) CPU_TESTS="FAILED rc=$CRC: $(pytest_counts "$CPU_LOG")" ;;
  esac
  { echo; echo "===== CPU suite ====="; cat "$CPU_LOG"; } >> "$OUT/tests.log"
  rm -f "$CPU_LOG"
else
  CPU_TESTS="skipped: ${T}s left of the budget"
fi
echo "CPU tests: $CPU_TESTS"

# ---------------------------------------------------------------- summary
{
  echo "dspark_kernels GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed)s of ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "gpu:        $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "build:      $BUILD"
  echo "backends:   $BACKENDS"
  echo "CUDA tests: $CUDA_TESTS"
  echo "NVRTC:      $NVRTC"
  echo "sanitizer:  $SANITIZER"
  echo "bench:      $BENCH"
  echo "CPU tests:  $CPU_TESTS"
  echo "exit code:  $RC"
  if [ -s "$OUT/bench.json" ]; then
    echo
    $PY - "$OUT/bench.json" <<'PYEOF'
import json, sys
doc = json.load(open(sys.argv[1]))
ceil = (doc.get("ceilings") or {}).get("gpu" if doc.get("device") == "cuda" else "cpu") or {}
hw = doc.get("gpu_name") if doc.get("device") == "cuda" else doc.get("cpu_name")
print(f"bench on {doc.get('device')}: {hw}, measured copy ceiling {ceil.get('GBps', float('nan')):.0f} GB/s")
def t(s):
    return "-" if s is None else (f"{s*1e6:.1f}us" if s < 1e-3 else f"{s*1e3:.2f}ms")
rows = [("op", "preset", "B", "dtype", "mode", "backend", "median", "%ceil", "x eager", "check/status")]
for c in doc.get("cases", []):
    if c.get("backend") == "reference" and c.get("status") != "ok":
        continue
    ok = c.get("status") == "ok"
    chk = {True: "ok", False: "MISMATCH", None: "-"}[c.get("correct")] if ok else f"{c.get('status')}: {(c.get('note') or '')[:40]}"
    rows.append((c.get("op"), c.get("preset"), str(c.get("batch")), c.get("dtype"), c.get("mode"), c.get("backend"),
                 t(c.get("median_s")) if ok else "-", f"{c['pct_ceiling']:.1f}" if ok and c.get("pct_ceiling") else "-",
                 f"{c['speedup_vs_eager']:.2f}" if ok and c.get("speedup_vs_eager") else "-", chk))
w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(str(x).ljust(n) for x, n in zip(r, w)))
PYEOF
  fi
} > "$OUT/summary.txt" 2>&1

banner "summary"
cat "$OUT/summary.txt"
exit $RC
