#!/usr/bin/env bash
# Downloads the GPU suite's peers as wheels into wheels/ (ignored by git), for a GPU machine
# that may have no network (benchmarks/gpu.sh installs them offline): the versions the suite
# was written against, for Python 3.12. All four are pure Python (under 4 MB together); what
# they need (torch, triton, jax, jaxtyping) must be on the GPU machine. Run from anywhere; PIP
# defaults to .venv/bin/pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
"$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels \
    jax-cce==0.1.0 tokamax==0.0.17 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l wheels
