"""What FibecFed updates and sends: neuron importance and masks, global aggregation layers."""
from __future__ import annotations

import torch

# ---- Neuron importance and masks (sparse local update) -----------------------------------

# ---- Global aggregation layers (GAL) ranking ---------------------------------------------
