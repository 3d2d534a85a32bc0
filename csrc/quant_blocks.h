// The blockwise value formats (docs/PAYLOAD.md, "Values body"): blocks of kQuantBlock consecutive
// values, one fp32 scale per block, then the values: int8 (one byte each) or int4 (two a byte,
// the even value in the low nibble); x ~= q * scale.
#pragma once
#include <cstdint>

namespace fibec {

constexpr uint64_t kQuantBlock = 64;

inline uint64_t quant_blocks(uint64_t n) { return n / kQuantBlock + (n % kQuantBlock != 0); }

// Bytes of the values after the scales: n for int8, ceil(n / 2) for int4.
inline uint64_t int8_bytes(uint64_t n) { return n; }
inline uint64_t int4_bytes(uint64_t n) { return n / 2 + (n % 2); }

// body receives quant_blocks(n) fp32 scales, then n int8 values: scale = max|x| / 127 and
// q = round_half_even(x * (127 / max|x|)) clamped to [-127, 127], in fp32 (a block whose
// max|x| is below 2^-100 is multiplied by 2^64 first, so the reciprocal is finite); a block
// of zeros has scale 0, a block holding inf or NaN gets a NaN scale and q = 0.
void quantise(const float* x, uint64_t n, uint8_t* body);

// out[i] = q[i] * scale[i / kQuantBlock], in fp32.
void dequantise(const uint8_t* body, uint64_t n, float* out);

// The same with 7 levels each side: scale = max|x| / 7, q in [-7, 7] as 4-bit two's complement,
// value 2k in the low nibble of byte k, value 2k+1 in its high nibble; a last odd value leaves
// the high nibble 0.
void quantise_int4(const float* x, uint64_t n, uint8_t* body);

// out[i] = q[i] * scale[i / kQuantBlock] (a nibble 0x8 reads as -8, which no encoder writes).
void dequantise_int4(const uint8_t* body, uint64_t n, float* out);

// The int4 step of value i of packed values q (low nibble first, two's complement).
inline int int4_step(const uint8_t* q, uint64_t i) {
    const int nibble = (q[i / 2] >> (4 * (i % 2))) & 0xF;
    return nibble >= 8 ? nibble - 16 : nibble;
}

}  // namespace fibec
