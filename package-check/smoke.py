"""Smoke test of an installed fibec, run from outside the repository by package-check/check.sh.

Checks that the import resolves to the installed package (not a checkout), then a codec round
trip with a corrupted copy, fisher_diag and masked_adamw_ on the CPU against plain PyTorch.
"""
import sys
import sysconfig
from pathlib import Path

import torch

import fibec
from fibec import _backend, codec, ops

installed = Path(fibec.__file__).resolve()
assert installed.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), f"fibec from {installed}"

tensors = {"lora_A": torch.randn(8, 33), "lora_B": torch.randn(65, 8)}
payload = codec.encode(tensors, masks={"lora_B": (torch.arange(65) % 3 == 0, 0)})
decoded = codec.decode(payload)
torch.testing.assert_close(decoded["lora_A"], tensors["lora_A"], rtol=0, atol=0)
torch.testing.assert_close(decoded["lora_B"][::3], tensors["lora_B"][::3], rtol=0, atol=0)
assert not decoded["lora_B"][1::3].any()
corrupted = bytearray(payload)
corrupted[len(corrupted) // 2] ^= 0xFF
try:
    codec.decode(bytes(corrupted))
except codec.PayloadError:
    pass
else:
    raise AssertionError("a corrupted payload decoded without PayloadError")

X, G = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 11, dtype=torch.float64)
expected = torch.einsum("nto,nti->noi", G, X).square().sum(0)
torch.testing.assert_close(ops.fisher_diag(X.float(), G.float()).double(), expected, rtol=1e-5, atol=1e-6)

p, grad = torch.randn(13, 9), torch.randn(13, 9)
rows = torch.arange(13) % 2 == 0
reference = p.clone().requires_grad_()
adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.01)
reference.grad = grad.clone()
adamw.step()
updated, exp_avg, exp_avg_sq = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
ops.masked_adamw_(updated, grad, exp_avg, exp_avg_sq, rows, step=1, lr=1e-2, weight_decay=0.01)
torch.testing.assert_close(updated[rows], reference.detach()[rows], rtol=1e-6, atol=1e-7)
assert torch.equal(updated[~rows], p[~rows])

print(f"fibec {fibec.__version__} from {installed.parent} (triton {'not ' * (not _backend.triton_installed())}"
      "installed): codec, fisher_diag and masked_adamw_ pass", file=sys.stderr)
