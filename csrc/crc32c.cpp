#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
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
// Three streams of kStride bytes run in parallel to hide the crc32 instruction's
// 3-cycle latency, then merge: crc(s, A B) = shift_|B|(crc(s, A)) ^ crc(0, B), where
// shift_n (feeding n zero bytes) is linear in the 32-bit state, so four 256-entry
// tables built from its images of the 32 basis states apply it.
constexpr size_t kStride = 4096;

__attribute__((target("sse4.2"))) uint32_t crc_zeros_sse42(uint32_t state, size_t n) {
    uint64_t c = state;
    for (size_t i = 0; i < n / 8; ++i) c = _mm_crc32_u64(c, 0);
    return static_cast<uint32_t>(c);
}

struct ShiftTables {
    std::array<std::array<uint32_t, 256>, 4> t{};
    ShiftTables() {
        uint32_t basis[32];
        for (int bit = 0; bit < 32; ++bit) basis[bit] = crc_zeros_sse42(1u << bit, kStride);
        for (int part = 0; part < 4; ++part)
            for (uint32_t b = 0; b < 256; ++b) {
                uint32_t image = 0;
                for (int bit = 0; bit < 8; ++bit)
                    if (b & (1u << bit)) image ^= basis[8 * part + bit];
                t[part][b] = image;
            }
    }
    uint32_t shift(uint32_t s) const {
        return t[0][s & 0xFF] ^ t[1][(s >> 8) & 0xFF] ^ t[2][(s >> 16) & 0xFF] ^ t[3][s >> 24];
    }
};

const ShiftTables& shift_tables() {
    static const ShiftTables instance;
    return instance;
}

__attribute__((target("sse4.2"))) uint32_t crc_sse42(const uint8_t* p, size_t n, uint32_t c) {
    if (n >= 3 * kStride) {
        const ShiftTables& tables = shift_tables();
        while (n >= 3 * kStride) {
            uint64_t c0 = c, c1 = 0, c2 = 0;
            for (size_t i = 0; i < kStride; i += 8) {
                uint64_t v0, v1, v2;
                std::memcpy(&v0, p + i, 8);
                std::memcpy(&v1, p + kStride + i, 8);
                std::memcpy(&v2, p + 2 * kStride + i, 8);
                c0 = _mm_crc32_u64(c0, v0);
                c1 = _mm_crc32_u64(c1, v1);
                c2 = _mm_crc32_u64(c2, v2);
            }
            c = tables.shift(tables.shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^
                static_cast<uint32_t>(c2);
            p += 3 * kStride;
            n -= 3 * kStride;
        }
    }
    uint64_t c0 = c;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c0 = _mm_crc32_u64(c0, v);
    }
    uint32_t c32 = static_cast<uint32_t>(c0);
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

bool cpu_has_sse42() {
    static const bool has = __builtin_cpu_supports("sse4.2");
    return has;
}
#endif

}  // namespace

uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc) {
    uint32_t c = ~crc;
#ifdef FIBEC_HAVE_X86_CRC
    if (cpu_has_sse42()) return ~crc_sse42(data, len, c);
#endif
    return ~crc_portable(data, len, c);
}

}  // namespace fibec
