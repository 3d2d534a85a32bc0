// The fibec payload format (docs/PAYLOAD.md is the normative description):
// frame header, a section of tensor records, CRC32C. Pure C++, no Python: the
// bindings in bindings.cpp own the buffers and release the GIL around these calls.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fibec {

// decode() input that is not a valid payload; the message says why.
class PayloadError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// encode() input that cannot be encoded (non-finite values when asked to check, bad masks).
class EncodeError : public std::invalid_argument {
  public:
    using std::invalid_argument::invalid_argument;
};

// Codes shared by dtype and value format: the three float formats have equal codes.
enum Code : uint8_t { kF32 = 1, kF16 = 2, kBF16 = 3, kInt8Block = 4, kInt4Block = 5 };
enum Encoding : uint8_t { kDense = 0, kRows = 1, kCols = 2, kElements = 3 };
enum IndexCode : uint8_t { kNoIndex = 0, kVarint = 1, kBitmap = 2 };
// kKeepAll: the caller found no entry to drop (what kAuto finds by reading the data).
enum class MaskKind : uint8_t { kAuto = 0, kRows = 1, kCols = 2, kElements = 3, kKeepAll = 4 };

constexpr uint8_t kMagic[4] = {'F', 'B', 'E', 'C'};
constexpr uint16_t kVersion = 1;
constexpr uint16_t kFlagZstd = 1;  // section is zstd-compressed, value bodies byte-shuffled
constexpr size_t kHeaderSize = 28;
constexpr size_t kTrailerSize = 4;
constexpr unsigned kMaxDims = 8;

// One tensor to encode, read in place. `mask` is one byte per unit (nonzero = kept):
// rows for kRows, columns for kCols, elements for kElements; unused for kAuto and kKeepAll.
// With `given_body`, `scales`/`quantised` are the int8 or int4 values body (the requested format)
// already computed by the caller (on the GPU: fibec/kernels/quantize.py) over the stream the mask
// keeps: quant_blocks(n) fp32 scales and the n values (int8_bytes(n) or int4_bytes(n) bytes), with
// their byte counts; `data` is then unread and may be null.
struct TensorIn {
    std::string name;
    uint8_t dtype;
    std::vector<uint64_t> shape;
    const uint8_t* data;
    MaskKind mask_kind;
    const uint8_t* mask;
    bool given_body = false;
    const uint8_t* scales = nullptr;
    uint64_t scales_bytes = 0;
    const uint8_t* quantised = nullptr;
    uint64_t quantised_bytes = 0;
};

// values: kF32 requests lossless (each tensor in its own dtype), else the stored format.
struct EncodeOptions {
    uint8_t values;
    bool shuffle;
    bool check_finite;
};

struct TensorPlan;

class Encoder {
  public:
    Encoder(std::vector<TensorIn> tensors, EncodeOptions options);
    ~Encoder();
    Encoder(const Encoder&) = delete;
    Encoder& operator=(const Encoder&) = delete;
    uint64_t section_size() const { return section_size_; }
    // Writes the section and returns crc32c(section, crc): each record is summed right
    // after it is written, while it is still in cache.
    uint32_t write_section(uint8_t* out, uint32_t crc) const;

  private:
    std::vector<TensorIn> tensors_;
    std::vector<TensorPlan> plans_;
    EncodeOptions options_;
    uint64_t section_size_ = 0;
};

// Writes the header at out[0, kHeaderSize).
void write_header(uint8_t* out, uint32_t n_tensors, uint16_t flags, uint64_t section_len, uint64_t raw_len);

struct Frame {
    uint16_t flags;
    uint32_t n_tensors;
    uint64_t section_offset;
    uint64_t section_len;
    uint64_t raw_len;
};

// Checks magic, version, flags and lengths, and the checksum when verify_crc is set.
Frame read_frame(const uint8_t* data, size_t len, bool verify_crc);

uint32_t stored_crc(const uint8_t* data, const Frame& frame);

struct Record {
    std::string name;
    uint8_t dtype, values;
    Encoding encoding;
    IndexCode index_code;
    std::vector<uint64_t> shape;
    uint64_t numel, universe, n_kept, n_values;
    const uint8_t* index;
    uint64_t index_len;
    const uint8_t* value_body;
    uint64_t values_len;
    uint64_t out_bytes;  // numel * dtype size
    const uint8_t* begin;  // the record's first byte, for checksumming
};

// Parses and fully validates a raw (decompressed) section, including every index set and
// the uniqueness of names, before anything is allocated for the output; the declared
// outputs must fit max_output_bytes. (Names are checked as UTF-8 by the bindings.)
std::vector<Record> parse_section(const uint8_t* data, size_t len, uint32_t n_tensors, uint64_t max_output_bytes);

// Writes a validated record's dense tensor (out_bytes bytes, dtype layout) into out, with
// streaming stores where that helps if asked (for outputs not read back soon from cache).
void fill_record(const Record& record, uint8_t* out, bool shuffled, bool streaming);

// Returns crc32c(record bytes, crc) and, unless out is null, fills out as fill_record does for
// an unshuffled record, reading a value body that needs no conversion only once (copied
// with streaming stores if asked: see crc32c_copy).
uint32_t checksum_and_fill(const Record& record, uint8_t* out, uint32_t crc, bool streaming);

// Copies an int8 or int4 record's body apart for dequantising elsewhere (fibec/_payload_on_device.py):
// its quant_blocks(n_values) fp32 scales, unshuffled if `shuffled`, to scales; its n_values values,
// one int8 each (int4 widened), to q; and its kept entries as set bits [first_bit, first_bit + numel)
// of kept_bits (bit i in bit i % 8 of byte i / 8), which the caller zeroed.
void stage_quantised(const Record& record, bool shuffled, uint8_t* scales, int8_t* q, uint8_t* kept_bits,
                     uint64_t first_bit);

size_t dtype_size(uint8_t code);

}  // namespace fibec
