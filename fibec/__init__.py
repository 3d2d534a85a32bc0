"""fibec: FibecFed, accelerated.

Fused Triton ops for per-sample Fisher information and sparse masked LoRA
updates, a compact payload codec, and a federated FibecFed driver.
"""
__version__ = "0.1.0"
