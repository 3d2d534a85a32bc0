// Scalar conversions between fp32, fp16 and bf16 with round-to-nearest-even,
// bit-identical to torch's Tensor.to() casts for every non-NaN input.
#pragma once
#include <cstdint>
#include <cstring>

namespace fibec {

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float f32_from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);
    if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds past the largest half
    if (ax < 0x38800000u) {                        // below 2^-14: fp16 subnormal or zero
        if (ax < 0x33000000u) return sign;         // below 2^-25: rounds to zero
        const uint32_t exponent = ax >> 23;        // 102..112
        const uint32_t mantissa = (ax & 0x7FFFFFu) | 0x800000u;
        const uint32_t shift = 126u - exponent;    // value / 2^-24 == mantissa >> shift
        uint32_t q = mantissa >> shift;
        const uint32_t rem = mantissa & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return static_cast<uint16_t>(sign | q);
    }
    const uint32_t rebased = ax - 0x38000000u;  // exponent bias 127 -> 15
    uint32_t q = rebased >> 13;
    const uint32_t rem = rebased & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // a carry bumps the exponent, as it should
    return static_cast<uint16_t>(sign | q);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1Fu;
    const uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return f32_from_bits(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0) return f32_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // * 2^-24, exact
    return sign ? -magnitude : magnitude;
}

inline uint16_t f32_to_bf16(float f) {
    const uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // torch's canonical bf16 NaN
    return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

}  // namespace fibec
