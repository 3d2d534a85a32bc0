"""decode() survives hostile input: the hypothesis harness in tests/fuzz_codec.py runs in a
subprocess, so a crash fails the test through the exit status rather than killing pytest."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_codec.py")


def _run_harness(cases: int, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, FIBEC_FUZZ_CASES=str(cases), FIBEC_FUZZ_DERANDOMIZE="1", **env)
    environment.pop("FIBEC_FUZZ_SECONDS", None)
    return subprocess.run([sys.executable, str(HARNESS)], env=environment, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_decode_of_20000_mutated_and_random_payloads_raises_only_payload_error():
    result = _run_harness(20000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    found = re.search(r"fuzz: (\d+) cases, (\d+) accepted, only PayloadError", result.stdout)
    assert found, result.stdout[-2000:]
    cases, accepted = int(found.group(1)), int(found.group(2))
    assert cases >= 20000
    assert 0 < accepted < cases  # mutations reach both the happy path and the error paths


@pytest.mark.parametrize("inject, check", [("error", lambda rc: rc > 0), ("crash", lambda rc: rc != 0)])
def test_harness_fails_on_other_exceptions_and_crashes(inject, check):
    result = _run_harness(200, FIBEC_FUZZ_INJECT=inject)
    assert check(result.returncode), (result.returncode, result.stdout[-1000:])
