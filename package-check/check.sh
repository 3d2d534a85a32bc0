#!/usr/bin/env bash
# The package as a user gets it: the sdist, a wheel built from that sdist (not from the tree),
# that wheel installed into a fresh virtual environment, and a smoke test run from outside the
# repository. Usage: package-check/check.sh [python]  (default: .venv/bin/python, which has `build`).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
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

echo "== install the wheel into a fresh virtual environment"
quietly "$python" -m venv "$work/venv"
# The torch already in use (on this machine the CPU wheel on disk), so nothing pulls a CUDA build.
torch_pin="$("$python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")"
quietly "$work/venv/bin/pip" install "$torch_pin"
quietly "$work/venv/bin/pip" install "${wheel[0]}" "$torch_pin"

echo "== smoke test from outside the repository"
cd "$work"
"$work/venv/bin/python" "$repo/package-check/smoke.py"
"$work/venv/bin/fibec" --help > /dev/null
"$work/venv/bin/fibec" run --help | grep -q -- "--gal-size"

echo "== the same without triton (as on platforms where it does not install)"
quietly "$work/venv/bin/pip" uninstall -y triton
"$work/venv/bin/python" "$repo/package-check/smoke.py"
"$work/venv/bin/fibec" --help > /dev/null
echo "package check passed: $(basename "${wheel[0]}")"
