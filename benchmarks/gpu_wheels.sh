#!/usr/bin/env bash
# Downloads the GPU suite's peers as wheels into wheels/ (ignored by git), for the device
# machine, which has no network: the versions of ../shared/ANCHORS.md, for its Python 3.12.
# All four are pure Python (about 3.6 MB); what they need is already on the H200's image
# (torch, triton, jax, jaxtyping). Run from anywhere; PIP defaults to .venv/bin/pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
"$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels \
    jax-cce==0.1.0 tokamax==0.0.17 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l wheels
