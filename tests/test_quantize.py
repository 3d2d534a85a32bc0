"""The int8 and int4 blockwise values kernels (fibec/kernels/quantize.py) against the C++ encoder, byte for byte.

The GPU encoder quantises on the device and copies only the body, so its bytes must be the ones
the C++ encoder writes for the same values: every block size remainder, zeros, ties, tiny and
subnormal blocks, inf and NaN, every input dtype, an odd count of int4 values, and a poisoned
output buffer."""
import struct

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

from fibec import codec  # noqa: E402
from fibec.kernels import quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_runs_here")


@pytest.fixture
def triton_runs_here():
    if not torch.cuda.is_available() and not quantize._LAUNCHERS["int8"]._interpreted:
        pytest.skip("no GPU and TRITON_INTERPRET unset: the kernel cannot run here")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


VALUE_CODES = {"int8": 4, "int4": 5}


def encoder_body(x: torch.Tensor, values: str) -> tuple[bytes, bytes]:
    """(scales bytes, q bytes) of the C++ encoder's values body for the 1-D tensor x, stored dense."""
    payload = codec.encode({"x": x.cpu()}, masks={"x": torch.ones(x.numel(), dtype=torch.bool)}, values=values)
    offset = 28
    (name_len,) = struct.unpack_from("<H", payload, offset)
    offset += 2 + name_len
    _, code, encoding, _, ndim = struct.unpack_from("<5B", payload, offset)
    assert (code, encoding, ndim) == (VALUE_CODES[values], 0, 1)  # blockwise, dense, 1-D
    offset += 5 + 8 * ndim
    _, index_len, values_len = struct.unpack_from("<3Q", payload, offset)
    body = payload[offset + 24 + index_len: offset + 24 + index_len + values_len]
    blocks = -(-x.numel() // 64)
    return body[: 4 * blocks], body[4 * blocks:]


def kernel_body(x: torch.Tensor, values: str, poisoned: bool = False) -> tuple[bytes, bytes]:
    out = None
    if poisoned:
        blocks = -(-x.numel() // 64)
        out = (torch.full((blocks,), float("nan"), device=x.device),
               torch.full((quantize.value_bytes(values, x.numel()),), 99,
                          dtype=torch.int8 if values == "int8" else torch.uint8, device=x.device))
    scales, q = quantize.quantise_blocks(x.contiguous(), values, out)
    return scales.cpu().numpy().tobytes(), q.cpu().numpy().tobytes()


def values(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if kind == "ties":  # x * 127 / amax lands on .5 for many entries
        x = (torch.randint(-254, 255, (n,), generator=gen).float() / 2) / 127 * 3.0
        x[::64] = 3.0
    elif kind == "int4_ties":  # x * 7 / amax lands on .5 for many entries
        x = (torch.randint(-14, 15, (n,), generator=gen).float() / 2) / 7 * 3.0
        x[::64] = 3.0
    elif kind == "zeros":
        x[: min(n, 130)] = 0.0
    elif kind == "tiny":
        x = x * 1e-35  # max|x| below 2^-100 in most blocks: lifted by 2^64
        x[65:90] = torch.randn(x[65:90].numel(), generator=gen) * 1e-42  # subnormal
    elif kind == "special":
        x[min(n - 1, 3)] = float("inf")
        x[min(n - 1, 70)] = float("nan")
        x[min(n - 1, 150)] = float("-inf")
    elif kind == "wide":
        x = x * torch.logspace(-30, 30, n)
    return x


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 1031], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["normal", "ties", "int4_ties", "zeros", "tiny", "special", "wide"])
@pytest.mark.parametrize("formats", codec.INTEGER_LEVELS)
def test_blocks_match_the_cpp_encoder_byte_for_byte(n, kind, formats):
    x = values(kind, n, seed=n)
    want = encoder_body(x, formats)
    got = kernel_body(x.to(device()), formats, poisoned=True)
    assert got[0] == want[0], "scales differ"
    assert got[1] == want[1], "q differs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("formats", codec.INTEGER_LEVELS)
def test_half_precision_inputs_are_quantised_as_their_fp32_values(dtype, formats):
    x = values("normal", 777, seed=3).to(dtype)
    assert kernel_body(x.to(device()), formats) == encoder_body(x.float(), formats)


def test_the_kernels_quantise_every_integer_format_of_the_codec():
    assert quantize.FORMATS == tuple(codec.INTEGER_LEVELS)


def test_an_unknown_format_is_refused_naming_it():
    with pytest.raises(ValueError, match="values must be one of .*'int2'"):
        quantize.quantise_blocks(torch.zeros(3), "int2")
