"""Plain-PyTorch implementations of every fused op: the CPU path and the test oracle.

Imports nothing but torch.
"""
from __future__ import annotations

import torch

# ---- Fisher information -----------------------------------------------------------------

# ---- Masked optimizer steps -------------------------------------------------------------
