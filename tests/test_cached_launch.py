"""The cached launch path (fibec/kernels/_cache.py) on Triton's real CUDA launch path, with a stand-in
driver and a recording launcher instead of a GPU (tests/launch_on_fake_gpu.py): the second launch of
a signature skips Triton and passes the launcher what Triton passed; a misaligned input is a new
signature with its own compiled kernel; the tuning cache round-trips through its file."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (Linux only)")


@pytest.mark.slow
def test_cached_launches_pass_what_triton_passes_and_only_for_the_same_signature():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("launch_on_fake_gpu.py")
    result = subprocess.run([sys.executable, str(script), "--tuning-cache"], env=env, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"^0 failed$", result.stdout, re.M), output[-2000:]
    checks = re.findall(r"^ok ", result.stdout, re.M)
    assert len(checks) >= 50, output[-2000:]  # 9 ops x 2 dtypes x 3 checks, the alignment and the cache


def test_a_launcher_in_the_interpreter_takes_tritons_path_every_time(monkeypatch):
    """Under TRITON_INTERPRET=1 no compiled kernel exists: nothing is cached, every launch runs."""
    from fibec.kernels import fisher

    if not fisher._dense_outer._interpreted:
        pytest.skip("the kernels were compiled (TRITON_INTERPRET unset): the stand-in GPU test covers them")
    import torch

    X, G = torch.randn(2, 5, 7), torch.randn(2, 5, 3)
    before = (fisher._dense_outer.launches, fisher._dense_outer.cached)
    first, second = fisher.fisher_diag(X, G), fisher.fisher_diag(X, G)
    assert torch.equal(first, second)
    assert (fisher._dense_outer.launches - before[0], fisher._dense_outer.cached - before[1]) == (2, 0)
