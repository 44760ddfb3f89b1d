#!/usr/bin/env bash
# The Triton kernels under the newest Triton release (what a fresh `pip install` with a
# CPU build of torch resolves; the main environment's torch pins an older one):
#   1. the interpreter tests of every Triton op (TRITON_INTERPRET=1), slow ones skipped;
#   2. the sm_90 ahead-of-time compiles (python_tests/aot_compile_{drafting,moe,verify_tree,
#      verify_block_method}.py and
#      test_draft_block_attention.py's).
# Runs in its own virtual environment (torch CPU + the newest triton + the test deps),
# built once and reused while it has the wanted triton (idempotent; rebuilt otherwise).
# The package is used from this checkout (PYTHONPATH), not installed.
#
#   bash .ci/triton_newest.sh              # build or reuse the venv, run the checks
#   bash .ci/triton_newest.sh --venv-only  # only build the venv (.ci/run starts this early, in the
#                                          # background, so the pip installs overlap the main build)
#
# Environment: DSPARK_TRITON_NEWEST_VENV (where the venv lives, default below),
# DSPARK_TRITON_VERSION (a fixed version instead of the newest on the index),
# DSPARK_TRITON_TORCH (the torch requirement, default torch==2.13.0: the CPU wheel on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv="${DSPARK_TRITON_NEWEST_VENV:-/tmp/dspark-venv-triton-newest}"
torch_req="${DSPARK_TRITON_TORCH:-torch==2.13.0}"
py="${PYTHON:-python}"

# ---- which triton: the newest on the index unless fixed
version="${DSPARK_TRITON_VERSION:-}"
if [ -z "$version" ]; then
  version=$("$py" -m pip index versions triton 2>/dev/null | sed -n 's/^triton (\([^)]*\)).*/\1/p' | head -1) || true
fi
if [ -z "$version" ] && [ -x "$venv/bin/python" ]; then  # index unreachable: keep what is there
  version=$("$venv/bin/python" -c "import triton; print(triton.__version__)" 2>/dev/null) || true
fi
version="${version:-3.9.0}"
echo "triton_newest: triton $version, venv $venv"

# ---- the venv (reused when it already has this triton and the test deps)
have() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$version" <<'PY' 2>/dev/null
import sys
import hypothesis, numpy, pytest, scipy, torch, triton  # noqa: F401
sys.exit(0 if triton.__version__ == sys.argv[1] else 1)
PY
}
if ! have; then
  echo "triton_newest: building the venv"
  tmp="$venv.tmp.$$"
  rm -rf "$tmp"
  "$py" -m venv "$tmp"
  nice "$tmp/bin/python" -m pip install "$torch_req" "triton==$version" pytest hypothesis scipy numpy \
    > "$tmp.log" 2>&1 || { tail -30 "$tmp.log"; echo "triton_newest: pip install failed"; exit 1; }
  rm -f "$tmp.log"
  rm -rf "$venv"
  mv "$tmp" "$venv"  # its bin/ scripts keep the temporary path: only `python -m` is used
  have || { echo "triton_newest: the venv at $venv does not import its packages"; exit 1; }
fi
"$venv/bin/python" -c "import torch, triton, numpy; print('triton_newest: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
[ "${1:-}" = "--venv-only" ] && { echo "triton_newest: venv ready in $(( $(date +%s) - start )) s"; exit 0; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DSPARK_NO_EXTENSION=1

# ---- 1. interpreter tests of the Triton kernels
files="python_tests/test_triton_masks.py python_tests/test_triton_verify_block.py
  python_tests/test_draft_sample_block.py python_tests/test_schedule_verify_lens.py
  python_tests/test_moe.py python_tests/test_moe_fp8.py python_tests/test_moe_masked.py
  python_tests/test_draft_block_attention.py python_tests/test_philox.py
  python_tests/test_verify_tree.py python_tests/test_verify_block_method.py python_tests/test_nonfinite.py
  python_tests/test_verify_extras.py"
named="test_public_api_and_empty_batch test_persistent_schedule_any_number_of_programs
  test_tuner_writes_the_file_the_heuristic_reads"
select="triton or $(echo $named | sed 's/ / or /g')"
# shellcheck disable=SC2086
crc=0
collected=$(TRITON_INTERPRET=1 "$venv/bin/python" -m pytest $files -q -p no:cacheprovider --collect-only \
  -k "$select" -m "not slow") || crc=$?
if [ "$crc" -ne 0 ]; then
  echo "$collected" | tail -20
  [ "$crc" -eq 5 ] && echo "triton_newest: no test selected" || echo "triton_newest: collection failed"
  exit 1
fi
for t in $named; do
  grep -q "::$t" <<<"$collected" || { echo "triton_newest: $t is not in the selection"; exit 1; }
done
rc=0
# shellcheck disable=SC2086
TRITON_INTERPRET=1 nice "$venv/bin/python" -m pytest $files -q -p no:cacheprovider -k "$select" -m "not slow" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "triton_newest: pytest ran no test"
  exit 1
elif [ "$rc" -ne 0 ]; then
  echo "triton_newest: interpreter tests failed under triton $version (pytest exit $rc)"
  exit 1
fi

# ---- 2. sm_90 ahead-of-time compiles (the scripts unset TRITON_INTERPRET themselves)
for script in python_tests/aot_compile_drafting.py python_tests/aot_compile_moe.py \
              python_tests/aot_compile_verify_tree.py python_tests/aot_compile_verify_block_method.py; do
  echo "triton_newest: $script"
  env -u TRITON_INTERPRET nice "$venv/bin/python" "$script" || {
    echo "triton_newest: $script failed under triton $version"; exit 1; }
done

echo "triton_newest: draft_block_attention sm_90 compile (test_draft_block_attention.py, slow)"
rc=0
env -u TRITON_INTERPRET nice "$venv/bin/python" -m pytest python_tests/test_draft_block_attention.py -q \
  -p no:cacheprovider -m slow -k test_triton_kernel_compiles_for_sm90 || rc=$?
[ "$rc" -eq 0 ] || { echo "triton_newest: the draft_block_attention compile failed (pytest exit $rc)"; exit 1; }

echo "triton_newest: passed with triton $version in $(( $(date +%s) - start )) s"
