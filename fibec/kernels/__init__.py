"""Triton kernels, installed as fibec.kernels. Imports nothing from fibec."""
