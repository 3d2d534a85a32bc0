#!/usr/bin/env bash
# The package as a user gets it: the sdist, a wheel built from that sdist (not from the tree),
# that wheel installed into a fresh virtual environment, and a smoke test run from outside the
# repository; then, for each further Python version named, the sdist installed into a fresh virtual
# environment of that version (pip builds its wheel there) and the same smoke test. Versions come
# from the lock, constraints.txt, as in `make setup`.
# Usage: package-check/check.sh [python [VERSION...]]  (default: .venv/bin/python, which has `build`;
# a VERSION such as 3.12 is pyenv's, else pythonVERSION on PATH).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
shift || true
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

quietly() {  # run a step with its output in a log, shown only when it fails
    "$@" > "$work/step.log" 2>&1 || { tail -n 40 "$work/step.log"; echo "failed: $*"; exit 1; }
}

echo "== sdist, then a wheel from it"
# Without --sdist/--wheel, build makes the sdist and builds the wheel from the unpacked sdist.
quietly "$python" -m build --outdir "$work/dist" "$repo"
grep -q "Building wheel from sdist" "$work/step.log" || { echo "the wheel was not built from the sdist"; exit 1; }
tail -n 1 "$work/step.log"
sdist=("$work"/dist/fibec-*.tar.gz) wheel=("$work"/dist/fibec-*.whl)
tar tzf "${sdist[0]}" > "$work/sdist.txt"
for required in csrc/crc32c.h fibec/kernels/fisher.py LICENSE docs/PAYLOAD.md; do
    grep -qx "fibec-[^/]*/$required" "$work/sdist.txt" || { echo "the sdist lacks $required"; exit 1; }
done

smoke() {  # smoke VENV: the smoke test and the CLI of the fibec installed in VENV, from outside the repository
    (cd "$work" && "$1/bin/python" "$repo/package-check/smoke.py" && "$1/bin/fibec" --help > /dev/null \
        && "$1/bin/fibec" run --help | grep -q -- "--gal-size")
}

echo "== install the wheel into a fresh virtual environment"
quietly "$python" -m venv "$work/venv"
# The torch already in use (on this machine the CPU wheel on disk), so nothing pulls a CUDA build.
torch_pin="$("$python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")"
quietly "$work/venv/bin/pip" install "$torch_pin"
bash "$repo/package-check/constraints.sh" "$work/venv/bin/python" > "$work/constraints.txt"
quietly "$work/venv/bin/pip" install -c "$work/constraints.txt" "${wheel[0]}" "$torch_pin"

echo "== smoke test from outside the repository"
smoke "$work/venv"

echo "== the same without triton (as on platforms where it does not install)"
quietly "$work/venv/bin/pip" uninstall -y triton
smoke "$work/venv"

for version in "$@"; do
    interpreter="$(pyenv prefix "$version" 2>/dev/null)/bin/python"
    "$interpreter" --version > /dev/null 2>&1 || interpreter="python$version"
    "$interpreter" --version > /dev/null 2>&1 || { echo "no Python $version (python$version on PATH or pyenv install $version); SMOKE_PYTHONS= skips it"; exit 1; }
    echo "== Python $version ($("$interpreter" --version)): the sdist into a fresh virtual environment"
    quietly "$interpreter" -m venv "$work/venv$version"
    # No CPU wheel of torch for $version on this disk: PyPI's CUDA build of the same release (about 3 GB).
    quietly "$work/venv$version/bin/pip" install "$torch_pin"
    bash "$repo/package-check/constraints.sh" "$work/venv$version/bin/python" > "$work/constraints$version.txt"
    quietly "$work/venv$version/bin/pip" install -c "$work/constraints$version.txt" "${sdist[0]}"
    echo "== smoke test on Python $version"
    smoke "$work/venv$version"
done
echo "package check passed: $(basename "${wheel[0]}")${*:+, and the sdist on Python $*}"
