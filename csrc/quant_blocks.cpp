#include "quant_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FIBEC_HAVE_X86_AVX2 1
#endif

namespace fibec {
namespace {

// 127 / amax overflows for amax below ~3.7e-37, so tiny blocks are first multiplied by
// 2^64 (exactly: a power of two); every other block by 1.
inline float lift_for(float amax) { return amax < 0x1p-100f ? 0x1p64f : 1.0f; }

// max|x| of one block into amax; false when it holds inf or NaN (then it has no usable scale).
bool usable_block(const float* x, uint64_t count, float& amax) {
    amax = 0.0f;
    bool has_nan = false;
    for (uint64_t i = 0; i < count; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
        has_nan |= std::isnan(x[i]);
    }
    return !has_nan && std::isfinite(amax);
}

// One block at `levels` steps each side of zero: its scale into scale_out, and each value's
// rounded step q (in [-levels, levels]) to put(i, q).
template <class Put>
void quantise_block(const float* x, uint64_t count, float levels, uint8_t* scale_out, Put put) {
    float amax;
    const bool usable = usable_block(x, count, amax);
    const float scale = usable ? amax / levels : std::numeric_limits<float>::quiet_NaN();
    std::memcpy(scale_out, &scale, 4);
    if (!usable || amax == 0.0f) {
        for (uint64_t i = 0; i < count; ++i) put(i, 0);
        return;
    }
    const float lift = lift_for(amax);
    const float inv = levels / (amax * lift);
    // Adding and subtracting 1.5 * 2^23 rounds |r| <= 2^22 to nearest even.
    constexpr float kRound = 12582912.0f;
    for (uint64_t i = 0; i < count; ++i) {
        const float r = std::min(levels, std::max(-levels, x[i] * lift * inv));
        put(i, static_cast<int>((r + kRound) - kRound));
    }
}

void quantise_block(const float* x, uint64_t count, uint8_t* scale_out, uint8_t* q_out) {
    quantise_block(x, count, 127.0f, scale_out,
                   [q_out](uint64_t i, int q) { q_out[i] = static_cast<uint8_t>(static_cast<int8_t>(q)); });
}

// visit(block, first value, count) for each block of kQuantBlock values from first_block on (the
// last may be shorter): the one walk over a body's blocks, scalar and int4 alike.
template <class Visit>
void for_each_block(uint64_t n, uint64_t first_block, Visit visit) {
    for (uint64_t block = first_block, start = first_block * kQuantBlock; start < n; ++block, start += kQuantBlock)
        visit(block, start, std::min(kQuantBlock, n - start));
}

// out[i] = step(i) * its block's scale, for the values of the blocks from first_block on.
template <class Step>
void dequantise_blocks(const uint8_t* body, uint64_t n, uint64_t first_block, float* out, Step step) {
    for_each_block(n, first_block, [&](uint64_t block, uint64_t start, uint64_t count) {
        float scale;
        std::memcpy(&scale, body + 4 * block, 4);
        for (uint64_t i = start; i < start + count; ++i) out[i] = static_cast<float>(step(i)) * scale;
    });
}

// The int8 step of value i of a body's values q.
struct Int8Step {
    const uint8_t* q;
    int operator()(uint64_t i) const { return static_cast<int8_t>(q[i]); }
};

// The int4 step of value i of a body's packed values q.
struct Int4Step {
    const uint8_t* q;
    int operator()(uint64_t i) const { return int4_step(q, i); }
};

// The int8 blocks from first_block on.
void quantise_scalar(const float* x, uint64_t n, uint64_t first_block, uint8_t* body) {
    uint8_t* q = body + 4 * quant_blocks(n);
    for_each_block(n, first_block, [&](uint64_t block, uint64_t start, uint64_t count) {
        quantise_block(x + start, count, body + 4 * block, q + start);
    });
}

void dequantise_scalar(const uint8_t* body, uint64_t n, float* out) {
    dequantise_blocks(body, n, 0, out, Int8Step{body + 4 * quant_blocks(n)});
}

// One int4 block: quantise_block at 7 levels, two steps a byte (the even one in the low nibble).
void quantise_int4_block(const float* x, uint64_t count, uint8_t* scale_out, uint8_t* packed) {
    std::memset(packed, 0, int4_bytes(count));
    quantise_block(x, count, 7.0f, scale_out, [packed](uint64_t i, int v) {
        packed[i / 2] |= static_cast<uint8_t>((static_cast<unsigned>(v) & 0xFu) << (4 * (i % 2)));
    });
}

// The blocks from first_block on; blocks are 64 values, so each starts at a whole byte.
void quantise_int4_scalar(const float* x, uint64_t n, uint64_t first_block, uint8_t* body) {
    uint8_t* q = body + 4 * quant_blocks(n);
    for_each_block(n, first_block, [&](uint64_t block, uint64_t start, uint64_t count) {
        quantise_int4_block(x + start, count, body + 4 * block, q + start / 2);
    });
}

#ifdef FIBEC_HAVE_X86_AVX2
// The same arithmetic as quantise_block, eight lanes at a time, for the whole blocks of 64 (the
// caller does the shorter last one): int8 (127 levels, a byte a step) or int4 (7 levels, two
// steps a byte). _mm256_max_ps(v, c) returns c when v is NaN, as std::max(c, v) does.
template <bool kInt4>
__attribute__((target("avx2"))) void quantise_whole_blocks_avx2(const float* x, uint64_t n, uint8_t* body) {
    constexpr float kLevels = kInt4 ? 7.0f : 127.0f;
    constexpr uint64_t kBlockBytes = kInt4 ? kQuantBlock / 2 : kQuantBlock;
    uint8_t* q = body + 4 * quant_blocks(n);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lo = _mm256_set1_ps(-kLevels), hi = _mm256_set1_ps(kLevels);
    const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const uint64_t whole = n / kQuantBlock;
    for (uint64_t block = 0; block < whole; ++block) {
        const float* xb = x + block * kQuantBlock;
        __m256 v[8];
        __m256 vmax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        for (int k = 0; k < 8; ++k) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[k], abs_mask));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[k], v[k], _CMP_UNORD_Q));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const bool usable = !_mm256_movemask_ps(unordered) && std::isfinite(amax);
        const float scale = usable ? amax / kLevels : std::numeric_limits<float>::quiet_NaN();
        std::memcpy(body + 4 * block, &scale, 4);
        uint8_t* qb = q + block * kBlockBytes;
        if (!usable || amax == 0.0f) {
            std::memset(qb, 0, kBlockBytes);
            continue;
        }
        const float lift = lift_for(amax);
        const __m256 lifted = _mm256_set1_ps(lift), inv = _mm256_set1_ps(kLevels / (amax * lift));
        __m256i r[8];
        for (int k = 0; k < 8; ++k) {
            const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(v[k], lifted), inv);
            const __m256 clamped = _mm256_min_ps(_mm256_max_ps(scaled, lo), hi);
            r[k] = _mm256_cvtps_epi32(_mm256_round_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        __m256i steps[2];  // the block's 64 steps as int8, in order
        for (int half = 0; half < 2; ++half) {
            const __m256i* g = r + 4 * half;
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(g[0], g[1]), _mm256_packs_epi32(g[2], g[3]));
            steps[half] = _mm256_permutevar8x32_epi32(bytes, lane_order);
        }
        if constexpr (kInt4) {
            // Each 16-bit word holds an even step (low byte) and the next odd one (high byte):
            // keep the even one's nibble in bits 0-3 and move the odd one's to bits 4-7.
            const __m256i even_nibble = _mm256_set1_epi16(0x000F), odd_nibble = _mm256_set1_epi16(0x00F0);
            __m256i words[2];
            for (int half = 0; half < 2; ++half)
                words[half] = _mm256_or_si256(_mm256_and_si256(steps[half], even_nibble),
                                              _mm256_and_si256(_mm256_srli_epi16(steps[half], 4), odd_nibble));
            // packus works within 128-bit lanes: 64-bit chunks come out as 0, 2, 1, 3.
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(words[0], words[1]), 0xD8);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), packed);
        } else {
            for (int half = 0; half < 2; ++half)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 32 * half), steps[half]);
        }
    }
}

__attribute__((target("avx2"))) void quantise_avx2(const float* x, uint64_t n, uint8_t* body) {
    quantise_whole_blocks_avx2<false>(x, n, body);
    quantise_scalar(x, n, n / kQuantBlock, body);
}

__attribute__((target("avx2"))) void quantise_int4_avx2(const float* x, uint64_t n, uint8_t* body) {
    quantise_whole_blocks_avx2<true>(x, n, body);
    quantise_int4_scalar(x, n, n / kQuantBlock, body);
}

__attribute__((target("avx2"))) void dequantise_avx2(const uint8_t* body, uint64_t n, float* out) {
    const uint8_t* q = body + 4 * quant_blocks(n);
    const uint64_t whole = n / kQuantBlock;
    for (uint64_t block = 0; block < whole; ++block) {
        float s;
        std::memcpy(&s, body + 4 * block, 4);
        const __m256 scale = _mm256_set1_ps(s);
        const uint8_t* qb = q + block * kQuantBlock;
        float* ob = out + block * kQuantBlock;
        for (int k = 0; k < 8; ++k) {
            const __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8 * k)));
            _mm256_storeu_ps(ob + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(wide), scale));
        }
    }
    dequantise_blocks(body, n, whole, out, Int8Step{q});
}

// Sixteen int4 steps at a time: the nibbles of 8 bytes, interleaved low then high, sign-extended.
__attribute__((target("avx2"))) void dequantise_int4_avx2(const uint8_t* body, uint64_t n, float* out) {
    const uint8_t* q = body + 4 * quant_blocks(n);
    const __m128i nibble = _mm_set1_epi8(0x0F), sign = _mm_set1_epi8(0x08);
    const uint64_t whole = n / kQuantBlock;
    for (uint64_t block = 0; block < whole; ++block) {
        float s;
        std::memcpy(&s, body + 4 * block, 4);
        const __m256 scale = _mm256_set1_ps(s);
        const uint8_t* qb = q + block * (kQuantBlock / 2);
        float* ob = out + block * kQuantBlock;
        for (int k = 0; k < 4; ++k) {
            const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8 * k));
            const __m128i low = _mm_and_si128(packed, nibble);
            const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
            // (v ^ 8) - 8 sign-extends a 4-bit two's complement value.
            const __m128i steps = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(low, high), sign), sign);
            for (int part = 0; part < 2; ++part) {
                const __m256i wide = _mm256_cvtepi8_epi32(part ? _mm_srli_si128(steps, 8) : steps);
                _mm256_storeu_ps(ob + 16 * k + 8 * part, _mm256_mul_ps(_mm256_cvtepi32_ps(wide), scale));
            }
        }
    }
    dequantise_blocks(body, n, whole, out, Int4Step{q});
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2");
    return has;
}
#endif

}  // namespace

void quantise_int4(const float* x, uint64_t n, uint8_t* body) {
#ifdef FIBEC_HAVE_X86_AVX2
    if (cpu_has_avx2()) return quantise_int4_avx2(x, n, body);
#endif
    quantise_int4_scalar(x, n, 0, body);
}

void dequantise_int4(const uint8_t* body, uint64_t n, float* out) {
#ifdef FIBEC_HAVE_X86_AVX2
    if (cpu_has_avx2()) return dequantise_int4_avx2(body, n, out);
#endif
    const uint8_t* q = body + 4 * quant_blocks(n);
    dequantise_blocks(body, n, 0, out, Int4Step{q});
}

void quantise(const float* x, uint64_t n, uint8_t* body) {
#ifdef FIBEC_HAVE_X86_AVX2
    if (cpu_has_avx2()) return quantise_avx2(x, n, body);
#endif
    quantise_scalar(x, n, 0, body);
}

void dequantise(const uint8_t* body, uint64_t n, float* out) {
#ifdef FIBEC_HAVE_X86_AVX2
    if (cpu_has_avx2()) return dequantise_avx2(body, n, out);
#endif
    dequantise_scalar(body, n, out);
}

}  // namespace fibec
