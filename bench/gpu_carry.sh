#!/usr/bin/env bash
# Builds .gpu-carry/, what bench/gpu.sh needs on the GPU machine and cannot fetch there (it reaches
# no package registry, and ../shared is not copied to it): name it in the device run's `carry`.
#   wheels/   the Fisher benchmark's peers (pure Python, any CPython 3): Opacus, BackPACK and
#             their dependencies that the GPU image lacks; zstandard (the codec's dependency) and
#             lz4 (a codec peer) built for the image's CPython 3.12; setuptools new enough to
#             build fibec's extension there
#   data/     one real data set of ../shared/data, laid out for FIBEC_DATA_ROOT
#   minilm/   MiniLM in fp16 (45 MB, loaded as fp32): the fp32 file is more than a run carries
# About 55 MB in all; a device run carries at most 64 MiB with the working tree.
# Usage: bash bench/gpu_carry.sh   (from anywhere; PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
PY=${PY:-.venv/bin/python}
DATA=${FIBEC_CARRY_DATA:-sms_spam}

mkdir -p .git/info "$CARRY/wheels" "$CARRY/data"
grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" \
    opacus==1.6.0 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops==0.8.2 opt_einsum==3.4.0
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" setuptools==84.2.1
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    zstandard==0.25.0 lz4==4.4.5

if [ -d "../shared/data/$DATA" ]; then
    rm -rf "${CARRY:?}/data/$DATA" && cp -r "../shared/data/$DATA" "$CARRY/data/" && chmod -R u+w "$CARRY/data"
else
    echo "no ../shared/data/$DATA: the rounds step will be skipped" >&2
fi

[ -f "$CARRY/minilm/model.safetensors" ] || "$PY" bench/bench_rounds.py --carry-model "$CARRY/minilm"
du -sh "$CARRY"
