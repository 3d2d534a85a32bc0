// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), as used by iSCSI/ext4:
// init 0xFFFFFFFF, final xor 0xFFFFFFFF; crc32c("123456789") == 0xE3069283.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fibec {

// Continues a CRC: crc32c(b, crc32c(a)) == crc32c(a + b); start with crc = 0.
uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc = 0);

// crc32c(src, len, crc), copying src[0, len) to dst in the same pass (the ranges must not overlap).
uint32_t crc32c_copy(const uint8_t* src, uint8_t* dst, size_t len, uint32_t crc);

}  // namespace fibec
