"""Every Triton kernel launch the ops make compiles for an H100 (sm_90) with Triton's CUDA backend
and ptxas, on this machine without a GPU, and fits the H100's shared memory (tests/compile_for_gpu.py).
The interpreter that runs the kernels elsewhere in the tests accepts code the compiler rejects."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (Linux only)")


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm90_within_its_shared_memory():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    result = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True,
                            timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    compiled = re.search(r"sm_90: (\d+) of \1 kernel variants compiled", result.stdout)
    assert compiled and int(compiled.group(1)) >= 100, output[-2000:]
