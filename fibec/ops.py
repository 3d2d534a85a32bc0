"""The public fused ops: validate arguments, then dispatch to Triton or the torch path.

Every op checks shapes, dtypes and devices before any kernel launch and raises
ValueError/TypeError naming the offending argument. CUDA tensors run the Triton
kernels in fibec.kernels; CPU tensors run fibec.reference (see fibec._backend).
"""
from __future__ import annotations

import torch

from fibec import reference
from fibec._backend import use_triton
from fibec._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_shape, check_tensor

# ---- Fisher information (kernels/fisher.py) ---------------------------------------------

# ---- Masked optimizer steps (kernels/masked_update.py) ----------------------------------
