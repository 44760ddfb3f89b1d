#!/usr/bin/env bash
# CI: the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds dspark_kernels._C once more, CPU only, with -fsanitize=address,undefined
# -fno-wrapv -fno-omit-frame-pointer -fno-sanitize-recover=undefined at -O1
# (setup.py, DSPARK_SANITIZE=1; -fno-wrapv undoes CPython's -fwrapv, which would
# hide signed overflow from UBSan), into build/asan, then runs the CPU tests
# and the fuzz suite (test_fuzz.py, DSPARK_FUZZ_BACKENDS=cpu: the C++ CPU kernels against
# the reference) against it (DSPARK_KERNELS_LIBRARY) with libasan / libubsan preloaded (python
# and torch are not instrumented). Any sanitizer report fails: UBSan and ASan
# abort the process, and the log is searched for reports as well. pytest's exit
# status is kept as is, so 5 (no test collected) fails too. --capture=sys: a report
# written to fd 2 by an aborting process reaches the log (fd capture would lose it).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=build/asan
mkdir -p "$out"

env -u DSPARK_REQUIRE_CUDA_BUILD DSPARK_SANITIZE=1 DSPARK_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" \
  python setup.py build_ext --build-temp "$out/tmp" --build-lib "$out/lib" > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; echo "sanitizers: the ASan/UBSan build failed"; exit 1; }
lib="$PWD/$out/lib/dspark_kernels/_C.abi3.so"
[ -f "$lib" ] || { echo "sanitizers: $lib was not built"; exit 1; }
# (nm's output to a file first: `nm | grep -q` fails under pipefail when grep exits early)
nm -D "$lib" > "$out/symbols.txt"
grep -q __asan_report "$out/symbols.txt" || { echo "sanitizers: $lib is not instrumented"; exit 1; }
echo "sanitizers: built $lib in $(( $(date +%s) - start )) s"

asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
for f in "$asan" "$ubsan"; do [ -f "$f" ] || { echo "sanitizers: $f not found"; exit 1; }; done

tests=(python_tests/test_verify_block.py python_tests/test_kv.py python_tests/test_schedule_verify_lens.py
       python_tests/test_draft_sample_block.py python_tests/test_philox.py
       python_tests/test_cpp_hardening.py python_tests/test_fuzz_cpp_limits.py
       python_tests/test_verify_tree.py python_tests/test_verify_block_method.py python_tests/test_nonfinite.py
       python_tests/test_hardening.py)
log="$out/pytest.log"
rc=0
DSPARK_KERNELS_LIBRARY="$lib" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  LD_PRELOAD="$asan $ubsan" \
  ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:abort_on_error=1" \
  python -m pytest "${tests[@]}" -q -p no:cacheprovider --capture=sys -k "cpu and not triton" > "$log" 2>&1 || rc=$?
# The fuzz suite (every op, the reference as oracle) against the instrumented CPU kernels only.
if [ "$rc" -eq 0 ]; then
  DSPARK_KERNELS_LIBRARY="$lib" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DSPARK_FUZZ_BACKENDS=cpu \
    LD_PRELOAD="$asan $ubsan" \
    ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:abort_on_error=1" \
    python -m pytest python_tests/test_fuzz.py -q -p no:cacheprovider --capture=sys >> "$log" 2>&1 || rc=$?
fi
tail -5 "$log"
if grep -Eq "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
  grep -E -A30 "ERROR: AddressSanitizer|runtime error:" "$log" | head -80
  echo "sanitizers: a sanitizer reported an error"
  exit 1
fi
[ "$rc" -eq 0 ] || { echo "sanitizers: pytest exited with $rc"; exit 1; }
echo "sanitizers: passed in $(( $(date +%s) - start )) s"
