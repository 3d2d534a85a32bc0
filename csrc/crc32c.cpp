#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#include <wmmintrin.h>
#define FIBEC_HAVE_X86_CRC 1
#endif

namespace fibec {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;

// Slice-by-8 tables: tables[k][b] is the CRC of byte b followed by k zero bytes.
struct Tables {
    std::array<std::array<uint32_t, 256>, 8> t{};
    Tables() {
        for (uint32_t b = 0; b < 256; ++b) {
            uint32_t c = b;
            for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
            t[0][b] = c;
        }
        for (uint32_t b = 0; b < 256; ++b)
            for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
    }
};

const Tables& tables() {
    static const Tables instance;
    return instance;
}

uint32_t crc_portable(const uint8_t* p, size_t n, uint32_t c) {
    const auto& t = tables().t;
    while (n >= 8) {
        uint32_t lo, hi;
        std::memcpy(&lo, p, 4);
        std::memcpy(&hi, p + 4, 4);
        lo ^= c;  // little-endian hosts only (asserted in payload.cpp)
        c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
            t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
    return c;
}

#ifdef FIBEC_HAVE_X86_CRC
// Carry-less multiplication folding (the method of Intel's "Fast CRC Computation for
// Generic Polynomials Using PCLMULQDQ"): on Zen and Skylake-class cores the crc32
// instruction retires at most one 8-byte step per 2-3 cycles, PCLMULQDQ folds 64 bytes in
// about as many cycles as that does 24.
//
// In the reflected domain the crc32 instruction uses, bit i of a 128-bit lane that starts
// `offset` bits into the message stands for x^(L - 1 - offset - i). Moving the lane D bits
// later multiplies it by x^D mod P; with the constant stored as reflect32(x^e mod P) << 1
// the 127-bit carry-less product lands exactly on the lane D bits later when e = D + 32
// for the low 64 bits and e = D - 32 for the high 64 bits.
constexpr uint64_t fold_constant(unsigned exponent) {
    uint32_t r = 0x80000000u;  // x^0, reflected
    for (unsigned i = 0; i < exponent; ++i) r = (r >> 1) ^ (kPoly & (0u - (r & 1u)));
    return static_cast<uint64_t>(r) << 1;
}

constexpr unsigned kLanes = 4;
constexpr size_t kBlock = 16 * kLanes;

__attribute__((target("sse4.2"))) uint32_t crc_sse42(const uint8_t* p, size_t n, uint32_t c) {
    uint64_t c64 = c;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c64 = _mm_crc32_u64(c64, v);
    }
    uint32_t c32 = static_cast<uint32_t>(c64);
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

template <bool kCopy, bool kStream>
__attribute__((target("sse4.2"))) inline void store(uint8_t* dst, __m128i v) {
    if (kStream)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst), v);
    else if (kCopy)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
}

__attribute__((target("sse4.2,pclmul"))) inline __m128i fold(__m128i lane, __m128i constants, __m128i next) {
    const __m128i low = _mm_clmulepi64_si128(lane, constants, 0x00);
    const __m128i high = _mm_clmulepi64_si128(lane, constants, 0x11);
    return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

// CRC state (not inverted) after p[0, n); with kCopy, also copies those bytes to dst,
// with streaming stores when kStream.
template <bool kCopy, bool kStream>
__attribute__((target("sse4.2,pclmul"))) uint32_t crc_pclmul(const uint8_t* p, uint8_t* dst, size_t n, uint32_t c) {
    if (kStream) {  // streaming stores need an aligned dst: bring it to a cache line boundary
        if (n < 2 * kBlock + 64) return crc_pclmul<kCopy, false>(p, dst, n, c);
        const size_t head = (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
        std::memcpy(dst, p, head);
        c = crc_sse42(p, head, c);
        p += head;
        dst += head;
        n -= head;
    }
    if (n >= 2 * kBlock) {
        static constexpr uint64_t kFarHigh = fold_constant(128 * kLanes - 32), kFarLow = fold_constant(128 * kLanes + 32);
        static constexpr uint64_t kNearHigh = fold_constant(128 - 32), kNearLow = fold_constant(128 + 32);
        const __m128i far = _mm_set_epi64x(static_cast<long long>(kFarHigh), static_cast<long long>(kFarLow));
        const __m128i near = _mm_set_epi64x(static_cast<long long>(kNearHigh), static_cast<long long>(kNearLow));
        __m128i lane[kLanes];
        for (unsigned l = 0; l < kLanes; ++l) {
            lane[l] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * l));
            store<kCopy, kStream>(dst + 16 * l, lane[l]);
        }
        lane[0] = _mm_xor_si128(lane[0], _mm_cvtsi32_si128(static_cast<int>(c)));  // the state enters as the first 4 bytes
        p += kBlock;
        dst += kCopy ? kBlock : 0;
        n -= kBlock;
        for (; n >= kBlock; p += kBlock, n -= kBlock) {
            __m128i next[kLanes];
            for (unsigned l = 0; l < kLanes; ++l) next[l] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * l));
            // One whole cache line back to back, so that a write-combining buffer flushes it whole.
            for (unsigned l = 0; l < kLanes; ++l) store<kCopy, kStream>(dst + 16 * l, next[l]);
            for (unsigned l = 0; l < kLanes; ++l) lane[l] = fold(lane[l], far, next[l]);
            dst += kCopy ? kBlock : 0;
        }
        if (kStream) _mm_sfence();
        __m128i last = lane[0];
        for (unsigned l = 1; l < kLanes; ++l) last = fold(last, near, lane[l]);
        // What is left is the CRC of these 16 bytes from a zero state.
        const uint64_t c64 = _mm_crc32_u64(_mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(last))),
                                           static_cast<uint64_t>(_mm_extract_epi64(last, 1)));
        c = static_cast<uint32_t>(c64);
    }
    if (kCopy && n) std::memcpy(dst, p, n);  // an empty tensor may have no memory at all
    return crc_sse42(p, n, c);
}

bool cpu_has_crc_instructions() {
    static const bool has = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul");
    return has;
}
#endif

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc) {
#ifdef FIBEC_HAVE_X86_CRC
    if (cpu_has_crc_instructions()) return ~crc_pclmul<false, false>(data, nullptr, len, ~crc);
#endif
    return ~crc_portable(data, len, ~crc);
}

uint32_t crc32c_copy(const uint8_t* src, uint8_t* dst, size_t len, uint32_t crc, bool streaming) {
#ifdef FIBEC_HAVE_X86_CRC
    if (cpu_has_crc_instructions())
        return streaming ? ~crc_pclmul<true, true>(src, dst, len, ~crc) : ~crc_pclmul<true, false>(src, dst, len, ~crc);
#endif
    (void)streaming;
    if (len) std::memcpy(dst, src, len);
    return ~crc_portable(src, len, ~crc);
}

}  // namespace fibec
