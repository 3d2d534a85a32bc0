#!/usr/bin/env bash
# Prints the pip constraints an install into PYTHON's environment takes: its torch as installed,
# and the lock, constraints.txt (the versions CI last passed with). The lock's triton goes with a
# CPU build of torch only: a CUDA build names the triton it needs.
# Usage: package-check/constraints.sh PYTHON   (its environment must have torch already)
set -euo pipefail
lock="$(cd "$(dirname "$0")/.." && pwd)/constraints.txt"
read -r torch_pin build < <("$1" -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0], 'cuda' if torch.version.cuda else 'cpu')")
echo "$torch_pin"
if [ "$build" = cpu ]; then grep -v '^#' "$lock"; else grep -v -e '^#' -e '^triton==' "$lock"; fi
