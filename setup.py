"""The C++ payload codec, fibec._codec (csrc/, see docs/PAYLOAD.md); metadata is in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

codec_extension = Pybind11Extension(
    "fibec._codec",
    sorted(["csrc/bindings.cpp", "csrc/crc32c.cpp", "csrc/quant_blocks.cpp", "csrc/output_block.cpp", "csrc/payload.cpp"]),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[codec_extension], cmdclass={"build_ext": build_ext})
