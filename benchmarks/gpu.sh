#!/usr/bin/env bash
# The GPU suite and the tests on a GPU, in one run (CONTRIBUTING.md, "The GPU suite"). On a
# machine with a GPU, from the repository root, with the peers' wheels in `wheels/`:
#
#     bash benchmarks/gpu.sh
#
# It installs the wheels offline (no network needed) into a folder of its own,
# puts the working tree first on PYTHONPATH (jaxce is not installed there), runs
# `python -m benchmarks --suite gpu --out $OUT`, then the tests that need a GPU (`-m gpu` once
# pyproject.toml registers that marker; until then tests/test_*gpu*.py, which skip without one,
# and the Pallas and fused-loss tests), and prints
# the results table last. Everything ends within GPU_BUDGET_S seconds (default 570).
# Files in $OUT: env.txt, suite.log, tests.log, nvidia-h200/gpu_results.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUDGET=${GPU_BUDGET_S:-570}
SUITE_LIMIT=${GPU_SUITE_S:-480}
left() { echo $((BUDGET - SECONDS)); }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PY" -V
    "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|optax|torch|triton|numpy) '
} >"$OUT/env.txt" 2>&1

# The peers' wheels (jax-cce, tokamax, liger-kernel, cut-cross-entropy), offline.
site=$(mktemp -d)
if compgen -G "wheels/*.whl" >/dev/null; then
    # One at a time: a wheel that does not install here costs its own peer only.
    for wheel in wheels/*.whl; do
        "$PY" -m pip install -q --no-index --find-links wheels --no-deps --no-compile \
            --no-cache-dir --target "$site" "$wheel" >>"$OUT/env.txt" 2>&1 ||
            echo "could not install $wheel: its peer will be 'not available'" |
            tee -a "$OUT/env.txt"
    done
else
    echo "no wheels/ carried: jax-cce, tokamax, Liger and CCE will be 'not available'" |
        tee -a "$OUT/env.txt"
fi
# jaxce runs from the working tree; its __version__ reads the installed metadata: give it some.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
mkdir -p "$site/jaxce-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: jaxce\nVersion: %s\n' "$version" \
    >"$site/jaxce-$version.dist-info/METADATA"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
ls "$site" >>"$OUT/env.txt"

echo "== python -m benchmarks --suite gpu (at most ${SUITE_LIMIT} s)"
# GPU_SUITE_ARGS="--shapes tiny" (with PYTHON=.venv/bin/python) dry-runs this script on a CPU.
# shellcheck disable=SC2086
timeout -k 10 "$SUITE_LIMIT" "$PY" -m benchmarks --suite gpu --out "$OUT" ${GPU_SUITE_ARGS:-} 2>&1 |
    tee "$OUT/suite.log" | grep -vE '^\| |^$' | tail -n 60
echo "suite exit status: ${PIPESTATUS[0]} after ${SECONDS} s"

# The tests that need a GPU.
if grep -qE '^\s*"gpu[:"]' pyproject.toml; then
    selection=(-m gpu tests)
else
    # The files whose tests skip without a GPU, then the kernel's and the fused loss's.
    selection=()
    for f in tests/test_*gpu*.py tests/test_pallas.py tests/test_linear.py tests/test_linear_plan.py; do
        [ -f "$f" ] && selection+=("$f")
    done
fi
limit=$(($(left) - 15))
if [ "$limit" -gt 30 ] && [ "${#selection[@]}" -gt 0 ]; then
    echo "== pytest ${selection[*]} (at most ${limit} s)"
    # -v: one line per test, so a run cut short by the limit still says what passed.
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 "$limit" "$PY" -m pytest -v -rfE \
        -p no:cacheprovider --continue-on-collection-errors -n 4 "${selection[@]}" \
        >"$OUT/tests.log" 2>&1
    echo "pytest exit status: $? after ${SECONDS} s (124: cut at the limit)"
    echo "$(grep -c ' PASSED' "$OUT/tests.log") passed, $(grep -c ' FAILED' "$OUT/tests.log") failed"
    grep -E ' (FAILED|ERROR) ' "$OUT/tests.log" | head -n 20
    tail -n 3 "$OUT/tests.log"
    echo
else
    echo "no time left for the tests (${limit} s)" | tee "$OUT/tests.log"
fi

echo "== results"
for f in "$OUT"/*/gpu_results.md; do
    [ -f "$f" ] && cat "$f"
done
echo "done in ${SECONDS} s"
