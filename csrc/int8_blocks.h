// The int8 blockwise value format (docs/PAYLOAD.md, "Values body"): blocks of kQuantBlock
// consecutive values, one fp32 scale per block, then one int8 per value; x ~= q * scale.
#pragma once
#include <cstdint>

namespace fibec {

constexpr uint64_t kQuantBlock = 64;

inline uint64_t quant_blocks(uint64_t n) { return n / kQuantBlock + (n % kQuantBlock != 0); }

// body receives quant_blocks(n) fp32 scales, then n int8 values: scale = max|x| / 127 and
// q = round_half_even(x * (127 / max|x|)) clamped to [-127, 127], in fp32 (a block whose
// max|x| is below 2^-100 is multiplied by 2^64 first, so the reciprocal is finite); a block
// of zeros has scale 0, a block holding inf or NaN gets a NaN scale and q = 0.
void quantise(const float* x, uint64_t n, uint8_t* body);

// out[i] = q[i] * scale[i / kQuantBlock], in fp32.
void dequantise(const uint8_t* body, uint64_t n, float* out);

}  // namespace fibec
