#include "payload.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>
#include <unordered_set>

#include "crc32c.h"
#include "floatconv.h"
#include "quant_blocks.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FIBEC_HAVE_X86_F16C 1
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the payload format is little-endian; so is this code");

namespace fibec {

// ---------------------------------------------------------------- basic helpers

size_t dtype_size(uint8_t code) {
    switch (code) {
        case kF32: return 4;
        case kF16:
        case kBF16: return 2;
        case kInt8Block: return 1;
        default: return 0;
    }
}

namespace {

// memcpy, for ranges that may be empty: memcpy wants valid pointers even for 0 bytes, and an
// empty std::vector has none.
inline void copy_bytes(uint8_t* dst, const uint8_t* src, uint64_t n) {
    if (n) std::memcpy(dst, src, n);
}

template <class T>
void put(uint8_t*& p, T v) {
    std::memcpy(p, &v, sizeof(T));
    p += sizeof(T);
}

unsigned varint_size(uint64_t v) {
    unsigned n = 1;
    while (v >= 0x80) {
        v >>= 7;
        ++n;
    }
    return n;
}

void put_varint(uint8_t*& p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = static_cast<uint8_t>(v | 0x80);
        v >>= 7;
    }
    *p++ = static_cast<uint8_t>(v);
}

uint64_t bitmap_size(uint64_t universe) { return universe / 8 + (universe % 8 != 0); }

// Bytes of a value body holding n values; false on overflow.
bool value_body_size(uint8_t format, uint64_t n, uint64_t& out) {
    if (format == kInt8Block || format == kInt4Block) {
        uint64_t scales;
        if (__builtin_mul_overflow(quant_blocks(n), uint64_t{4}, &scales)) return false;
        return !__builtin_add_overflow(scales, format == kInt8Block ? int8_bytes(n) : int4_bytes(n), &out);
    }
    return !__builtin_mul_overflow(n, static_cast<uint64_t>(dtype_size(format)), &out);
}

uint64_t value_body_size(uint8_t format, uint64_t n) {
    uint64_t out = 0;
    value_body_size(format, n, out);
    return out;
}

// ------------------------------------------------------- float format conversions

template <int Code>
inline float load(const uint8_t* p, uint64_t i) {
    if constexpr (Code == kF32) {
        float f;
        std::memcpy(&f, p + 4 * i, 4);
        return f;
    } else {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        return Code == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
}

template <int Code>
inline void store(uint8_t* p, uint64_t i, float f) {
    if constexpr (Code == kF32) {
        std::memcpy(p + 4 * i, &f, 4);
    } else {
        const uint16_t h = Code == kF16 ? f32_to_f16(f) : f32_to_bf16(f);
        std::memcpy(p + 2 * i, &h, 2);
    }
}

using ConvFn = void (*)(const uint8_t*, uint8_t*, uint64_t);

template <int From, int To>
void convert(const uint8_t* src, uint8_t* dst, uint64_t n) {
    if constexpr (From == To) {
        copy_bytes(dst, src, n * dtype_size(From));
    } else {
        for (uint64_t i = 0; i < n; ++i) store<To>(dst, i, load<From>(src, i));
    }
}

#ifdef FIBEC_HAVE_X86_F16C
// The F16C instructions round to nearest even exactly like f32_to_f16 (NaN payloads aside).
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const uint8_t* src, uint8_t* dst, uint64_t n) {
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(reinterpret_cast<const float*>(src + 4 * i));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    convert<kF32, kF16>(src + 4 * i, dst + 2 * i, n - i);
}

// Widening to fp32 can write its output with streaming stores (see crc32c_copy); dst must
// then be 32-byte aligned.
template <bool kStream>
__attribute__((target("avx"))) inline void store_f32x8(uint8_t* dst, __m256 v) {
    if (kStream)
        _mm256_stream_ps(reinterpret_cast<float*>(dst), v);
    else
        _mm256_storeu_ps(reinterpret_cast<float*>(dst), v);
}

template <bool kStream>
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const uint8_t* src, uint8_t* dst, uint64_t n) {
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        store_f32x8<kStream>(dst + 4 * i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i))));
    if (kStream) _mm_sfence();
    convert<kF16, kF32>(src + 2 * i, dst + 4 * i, n - i);
}

template <bool kStream>
__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint8_t* src, uint8_t* dst, uint64_t n) {
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
        store_f32x8<kStream>(dst + 4 * i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    if (kStream) _mm_sfence();
    convert<kBF16, kF32>(src + 2 * i, dst + 4 * i, n - i);
}

// Rounds to nearest even as f32_to_bf16 does (NaN to 0x7FC0).
__attribute__((target("avx2"))) void f32_to_bf16_avx2(const uint8_t* src, uint8_t* dst, uint64_t n) {
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), infinity = _mm256_set1_epi32(0x7F800000);
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), nan = _mm256_set1_epi32(0x7FC0);
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * i));
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), odd), 16);
        const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, magnitude), infinity);
        const __m256i halves = _mm256_blendv_epi8(rounded, nan, is_nan);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm256_castsi256_si128(packed));
    }
    convert<kF32, kBF16>(src + 4 * i, dst + 2 * i, n - i);
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2");
    return has;
}

bool cpu_has_f16c() {
    static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    return has;
}
#endif

// The conversion from one value format to another; `streaming_to` is the output address
// when a widening to fp32 may write it with streaming stores, else null.
ConvFn converter(uint8_t from, uint8_t to, const uint8_t* streaming_to = nullptr) {
#ifdef FIBEC_HAVE_X86_F16C
    const bool stream = streaming_to && reinterpret_cast<uintptr_t>(streaming_to) % 32 == 0;
    if (cpu_has_f16c() && from == kF32 && to == kF16) return f32_to_f16_f16c;
    if (cpu_has_f16c() && from == kF16 && to == kF32) return stream ? f16_to_f32_f16c<true> : f16_to_f32_f16c<false>;
    if (cpu_has_avx2() && from == kBF16 && to == kF32) return stream ? bf16_to_f32_avx2<true> : bf16_to_f32_avx2<false>;
    if (cpu_has_avx2() && from == kF32 && to == kBF16) return f32_to_bf16_avx2;
#else
    (void)streaming_to;
#endif
    static const ConvFn table[3][3] = {
        {convert<kF32, kF32>, convert<kF32, kF16>, convert<kF32, kBF16>},
        {convert<kF16, kF32>, convert<kF16, kF16>, convert<kF16, kBF16>},
        {convert<kBF16, kF32>, convert<kBF16, kF16>, convert<kBF16, kBF16>},
    };
    return table[from - 1][to - 1];
}

// Byte planes: plane b holds byte b of every w-byte value, so zstd sees exponents together.
void shuffle_bytes(const uint8_t* src, uint8_t* dst, uint64_t n, size_t w) {
    for (uint64_t i = 0; i < n; ++i)
        for (size_t b = 0; b < w; ++b) dst[b * n + i] = src[i * w + b];
}

void unshuffle_bytes(const uint8_t* src, uint8_t* dst, uint64_t n, size_t w) {
    for (size_t b = 0; b < w; ++b)
        for (uint64_t i = 0; i < n; ++i) dst[i * w + b] = src[b * n + i];
}

bool is_finite_bits(uint8_t dtype, const uint8_t* p, uint64_t i) {
    if (dtype == kF32) {
        uint32_t u;
        std::memcpy(&u, p + 4 * i, 4);
        return (u & 0x7F800000u) != 0x7F800000u;
    }
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    return dtype == kF16 ? (h & 0x7C00u) != 0x7C00u : (h & 0x7F80u) != 0x7F80u;
}

// Bit j set where p[j] != 0, for the 64 flags or values at p (SSE2 is part of x86-64).
template <class U>
inline uint64_t nonzero_bits64(const U* p) {
#if defined(__SSE2__)
    static_assert(sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4, "flags, half or single words");
    const __m128i zero = _mm_setzero_si128();
    const auto equal_zero = [&](int k) {  // the k-th 16 bytes, each lane compared with 0
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + k);
        return sizeof(U) == 1 ? _mm_cmpeq_epi8(v, zero) : sizeof(U) == 2 ? _mm_cmpeq_epi16(v, zero) : _mm_cmpeq_epi32(v, zero);
    };
    constexpr int kVectors = static_cast<int>(sizeof(U)) * 4;  // 16-byte vectors in 64 values
    uint64_t zeros = 0;
    for (int k = 0, bit = 0; k < kVectors; bit += 16) {  // 16 lanes' answers a movemask
        __m128i lanes;
        if constexpr (sizeof(U) == 1) {
            lanes = equal_zero(k++);
        } else if constexpr (sizeof(U) == 2) {
            lanes = _mm_packs_epi16(equal_zero(k), equal_zero(k + 1));
            k += 2;
        } else {
            lanes = _mm_packs_epi16(_mm_packs_epi32(equal_zero(k), equal_zero(k + 1)),
                                    _mm_packs_epi32(equal_zero(k + 2), equal_zero(k + 3)));
            k += 4;
        }
        zeros |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(lanes))) << bit;
    }
    return ~zeros;
#else
    uint64_t bits = 0;
    for (int j = 0; j < 64; ++j) bits |= static_cast<uint64_t>(p[j] != 0) << j;
    return bits;
#endif
}

// Calls f(i) for each i < n where x[i] != 0, in increasing order; values are read as unsigned
// words, so an element is "zero" only when all its bits are (-0.0 is kept: fp32 stays
// bit-exact). 64 at a time, then one call per set bit: a random mask costs a mispredicted
// branch per 64 entries, not per kept one.
template <class U, class F>
void for_each_nonzero(const U* x, uint64_t n, F&& f) {
    uint64_t base = 0;
    for (; base + 64 <= n; base += 64)
        for (uint64_t bits = nonzero_bits64(x + base); bits; bits &= bits - 1)
            f(base + static_cast<uint64_t>(__builtin_ctzll(bits)));
    for (uint64_t i = base; i < n; ++i)
        if (x[i] != 0) f(i);
}

// --------------------------------------------------------------- index readers

// Yields the kept indices of an index body in increasing order, checking every byte.
class IndexReader {
  public:
    IndexReader(IndexCode code, const uint8_t* data, uint64_t len, uint64_t universe)
        : code_(code), p_(data), len_(len), universe_(universe) {}

    // Next kept index; the caller asks exactly once per kept unit, then calls finish().
    uint64_t next() {
        return code_ == kVarint ? next_varint() : next_bit();
    }

    void finish() const {
        if (code_ == kVarint) {
            if (pos_ != len_) throw PayloadError("index body is longer than its count of indices");
            return;
        }
        // No set bit may follow the last kept index (count agreement, and nothing beyond the universe).
        for (uint64_t byte = bit_ / 8; byte < len_; ++byte) {
            uint8_t rest = p_[byte];
            if (byte == bit_ / 8) rest &= static_cast<uint8_t>(0xFFu << (bit_ % 8));
            if (rest) {
                const uint64_t where = byte * 8 + static_cast<uint64_t>(__builtin_ctz(rest));
                throw PayloadError(where >= universe_ ? "bitmap index out of range"
                                                      : "bitmap has more set bits than its count");
            }
        }
    }

  private:
    uint64_t next_varint() {
        uint64_t gap = 0;
        unsigned shift = 0;
        for (unsigned k = 0;; ++k) {
            if (pos_ >= len_) throw PayloadError("index body is truncated (fewer indices than its count)");
            const uint8_t b = p_[pos_++];
            if (k == 9 && b > 1) throw PayloadError("varint index overflows 64 bits");
            gap |= static_cast<uint64_t>(b & 0x7F) << shift;
            if (!(b & 0x80)) {
                if (k > 0 && b == 0) throw PayloadError("varint index is not minimally encoded");
                break;
            }
            shift += 7;
        }
        uint64_t index;
        if (__builtin_add_overflow(next_expected_, gap, &index) || index >= universe_)
            throw PayloadError("index out of range");
        next_expected_ = index + 1;
        return index;
    }

    uint64_t next_bit() {
        while (true) {
            const uint64_t byte = bit_ / 8;
            if (byte >= len_) throw PayloadError("bitmap has fewer set bits than its count");
            const uint8_t rest = p_[byte] & static_cast<uint8_t>(0xFFu << (bit_ % 8));
            if (rest) {
                const uint64_t index = byte * 8 + static_cast<uint64_t>(__builtin_ctz(rest));
                if (index >= universe_) throw PayloadError("bitmap index out of range");
                bit_ = index + 1;
                return index;
            }
            bit_ = (byte + 1) * 8;
        }
    }

    IndexCode code_;
    const uint8_t* p_;
    uint64_t len_, universe_;
    uint64_t pos_ = 0, next_expected_ = 0, bit_ = 0;
};

}  // namespace

// ---------------------------------------------------------------- encoder

struct TensorPlan {
    Encoding encoding = kDense;
    IndexCode index_code = kNoIndex;
    uint8_t values = kF32;
    uint64_t numel = 1, rows = 1, cols = 1, universe = 0, n_kept = 0, n_values = 0;
    uint64_t index_len = 0, values_len = 0;
    std::vector<uint8_t> own_flags;        // auto-detected kept rows or columns
    const uint8_t* flags = nullptr;        // kept flags over the universe; null: elements whose bits are nonzero
};

namespace {

struct IndexStats {
    uint64_t kept = 0, varint_len = 0;
};

IndexStats flag_stats(const uint8_t* flags, uint64_t n) {
    IndexStats s;
    uint64_t next_expected = 0;
    for_each_nonzero(flags, n, [&](uint64_t i) {
        ++s.kept;
        s.varint_len += varint_size(i - next_expected);
        next_expected = i + 1;
    });
    return s;
}

// One pass over the values: kept (nonzero) rows, columns and elements, with the
// exact delta-varint size of the element index set.
template <class U>
void scan_nonzero(const U* x, uint64_t rows, uint64_t cols, bool lines, std::vector<uint8_t>& row_any,
                  std::vector<uint8_t>& col_any, IndexStats& elements) {
    uint64_t next_expected = 0;
    for (uint64_t r = 0; r < rows; ++r) {
        const U* row = x + r * cols;
        uint64_t count = 0;
        if (lines) {
            uint8_t* col = col_any.data();
            for (uint64_t c = 0; c < cols; ++c) {
                const uint8_t nz = row[c] != 0;
                count += nz;
                col[c] |= nz;
            }
            row_any[r] = count != 0;
        } else {
            for (uint64_t c = 0; c < cols; ++c) count += row[c] != 0;
        }
        elements.kept += count;
        if (count == cols && cols > 0) {
            elements.varint_len += varint_size(r * cols - next_expected) + (cols - 1);
            next_expected = r * cols + cols;
        } else if (count > 0) {
            for_each_nonzero(row, cols, [&](uint64_t c) {
                elements.varint_len += varint_size(r * cols + c - next_expected);
                next_expected = r * cols + c + 1;
            });
        }
    }
}

void choose_index_code(TensorPlan& plan, uint64_t varint_len) {
    const uint64_t bitmap_len = bitmap_size(plan.universe);
    if (varint_len <= bitmap_len) {
        plan.index_code = kVarint;
        plan.index_len = varint_len;
    } else {
        plan.index_code = kBitmap;
        plan.index_len = bitmap_len;
    }
}

uint64_t sparse_cost(uint8_t values, uint64_t universe, const IndexStats& s, uint64_t unit) {
    return std::min(s.varint_len, bitmap_size(universe)) + value_body_size(values, s.kept * unit);
}

void set_dense(TensorPlan& plan) {
    plan.encoding = kDense;
    plan.index_code = kNoIndex;
    plan.universe = plan.numel;
    plan.n_kept = plan.numel;
    plan.n_values = plan.numel;
    plan.index_len = 0;
}

void set_sparse(TensorPlan& plan, Encoding encoding, uint64_t universe, const IndexStats& s) {
    plan.encoding = encoding;
    plan.universe = universe;
    plan.n_kept = s.kept;
    plan.n_values = encoding == kRows ? s.kept * plan.cols : encoding == kCols ? s.kept * plan.rows : s.kept;
    choose_index_code(plan, s.varint_len);
}

// Whether any element's bits are all 0; a branch-free inner loop the compiler vectorises,
// so the common dense case costs one streaming read.
template <class U>
bool has_zero(const U* x, uint64_t n) {
    constexpr uint64_t kChunk = 4096;
    for (uint64_t start = 0; start < n; start += kChunk) {
        const uint64_t end = std::min(n, start + kChunk);
        uint32_t zeros = 0;
        for (uint64_t i = start; i < end; ++i) zeros += x[i] == 0;
        if (zeros) return true;
    }
    return false;
}

void plan_auto(const TensorIn& t, TensorPlan& plan) {
    const bool matrix = t.shape.size() == 2;
    const size_t width = dtype_size(t.dtype);
    const bool any_zero = width == 4 ? has_zero(reinterpret_cast<const uint32_t*>(t.data), plan.numel)
                                     : has_zero(reinterpret_cast<const uint16_t*>(t.data), plan.numel);
    if (!any_zero) {  // nothing to drop: dense is the smallest
        set_dense(plan);
        return;
    }
    std::vector<uint8_t> row_any(matrix ? plan.rows : 0), col_any(matrix ? plan.cols : 0);
    IndexStats elements;
    const uint64_t rows = matrix ? plan.rows : 1, cols = matrix ? plan.cols : plan.numel;
    if (width == 4)
        scan_nonzero(reinterpret_cast<const uint32_t*>(t.data), rows, cols, matrix, row_any, col_any, elements);
    else
        scan_nonzero(reinterpret_cast<const uint16_t*>(t.data), rows, cols, matrix, row_any, col_any, elements);

    // Smallest of dense, rows, columns, elements; ties go to the earlier (simpler) one.
    const uint64_t dense_cost = value_body_size(plan.values, plan.numel);
    uint64_t best = dense_cost;
    set_dense(plan);
    if (matrix) {
        const IndexStats rs = flag_stats(row_any.data(), plan.rows);
        const IndexStats cs = flag_stats(col_any.data(), plan.cols);
        const uint64_t row_cost = sparse_cost(plan.values, plan.rows, rs, plan.cols);
        const uint64_t col_cost = sparse_cost(plan.values, plan.cols, cs, plan.rows);
        if (row_cost < best) {
            best = row_cost;
            set_sparse(plan, kRows, plan.rows, rs);
            plan.own_flags = std::move(row_any);
        }
        if (col_cost < best) {
            best = col_cost;
            set_sparse(plan, kCols, plan.cols, cs);
            plan.own_flags = std::move(col_any);
        }
    }
    if (sparse_cost(plan.values, plan.numel, elements, 1) < best) {
        set_sparse(plan, kElements, plan.numel, elements);
        plan.own_flags.clear();
    }
    plan.flags = plan.own_flags.empty() ? nullptr : plan.own_flags.data();
}

void plan_masked(const TensorIn& t, TensorPlan& plan) {
    if (t.mask_kind == MaskKind::kKeepAll) {
        set_dense(plan);
        return;
    }
    Encoding encoding = kElements;
    uint64_t universe = plan.numel;
    if (t.mask_kind == MaskKind::kRows) {
        encoding = kRows;
        universe = plan.rows;
    } else if (t.mask_kind == MaskKind::kCols) {
        encoding = kCols;
        universe = plan.cols;
    }
    const IndexStats s = flag_stats(t.mask, universe);
    if (s.kept == universe && universe > 0) {
        set_dense(plan);  // keeps everything: the same tensor, without an index
        return;
    }
    set_sparse(plan, encoding, universe, s);
    plan.flags = t.mask;
}

// Calls f(i) for each kept unit index, in increasing order.
template <class F>
void for_each_kept(const TensorIn& t, const TensorPlan& plan, F&& f) {
    if (plan.flags)
        for_each_nonzero(plan.flags, plan.universe, f);
    else if (dtype_size(t.dtype) == 4)
        for_each_nonzero(reinterpret_cast<const uint32_t*>(t.data), plan.universe, f);
    else
        for_each_nonzero(reinterpret_cast<const uint16_t*>(t.data), plan.universe, f);
}

// The layout rule of every sparse encoding, shared by the encoder and the decoders: calls
// f(offset, count) for each run of kept elements in stream order, where each_kept(g) calls g(i)
// for each kept unit (row, column or element) in increasing order. Adjacent columns make one run
// (found once, used on every row); each kept element is its own run, since merging neighbours
// in a random mask costs a mispredicted branch per element (measured on top-25% uploads: encode
// 4-8% slower, decode 30% slower).
template <class EachKept, class F>
void for_each_run(Encoding encoding, uint64_t rows, uint64_t cols, uint64_t numel, EachKept&& each_kept, F&& f) {
    switch (encoding) {
        case kDense:
            if (numel) f(uint64_t{0}, numel);
            return;
        case kRows:
            each_kept([&](uint64_t r) { f(r * cols, cols); });
            return;
        case kCols: {
            std::vector<std::pair<uint64_t, uint64_t>> runs;
            each_kept([&](uint64_t c) {
                if (!runs.empty() && runs.back().first + runs.back().second == c)
                    ++runs.back().second;
                else
                    runs.emplace_back(c, 1);
            });
            for (uint64_t r = 0; r < rows; ++r)
                for (const auto& [c, n] : runs) f(r * cols + c, n);
            return;
        }
        case kElements:
            each_kept([&](uint64_t e) { f(e, uint64_t{1}); });
            return;
    }
}

// Calls f(offset, count) for each run of source elements to store, in stream order.
template <class F>
void for_each_source_run(const TensorIn& t, const TensorPlan& plan, F&& f) {
    for_each_run(plan.encoding, plan.rows, plan.cols, plan.numel,
                 [&](auto&& g) { for_each_kept(t, plan, g); }, f);
}

void write_index(const TensorIn& t, const TensorPlan& plan, uint8_t* out) {
    if (plan.index_code == kVarint) {
        uint64_t next_expected = 0;
        for_each_kept(t, plan, [&](uint64_t i) {
            put_varint(out, i - next_expected);
            next_expected = i + 1;
        });
    } else if (plan.index_code == kBitmap) {
        std::memset(out, 0, plan.index_len);
        for_each_kept(t, plan, [&](uint64_t i) { out[i / 8] |= static_cast<uint8_t>(1u << (i % 8)); });
    }
}

// Copies n values of `width` bytes: runs in sparse tensors are mostly a single value.
inline void copy_values(const uint8_t* src, uint8_t* dst, uint64_t n, size_t width) {
    if (n == 1 && width == 4)
        std::memcpy(dst, src, 4);
    else if (n == 1)
        std::memcpy(dst, src, 2);
    else
        copy_bytes(dst, src, n * width);
}

// Writes the kept values, in stream order and in the tensor's own dtype, to dst.
void gather_values(const TensorIn& t, const TensorPlan& plan, uint8_t* dst) {
    const size_t width = dtype_size(t.dtype);
    for_each_source_run(t, plan, [&](uint64_t offset, uint64_t n) {
        copy_values(t.data + offset * width, dst, n, width);
        dst += n * width;
    });
}

// The scales of a blockwise body (at out[0, 4 * blocks)), byte-shuffled in place.
void shuffle_scales(uint8_t* out, uint64_t n_values) {
    const uint64_t blocks = quant_blocks(n_values);
    std::vector<uint8_t> scales(out, out + 4 * blocks);
    shuffle_bytes(scales.data(), out, blocks, 4);
}

void write_values(const TensorIn& t, const TensorPlan& plan, bool shuffle, uint8_t* out) {
    if (t.given_body) {
        if (t.quantised_bytes) {  // an empty range may have a null address
            copy_bytes(out, t.scales, t.scales_bytes);
            copy_bytes(out + t.scales_bytes, t.quantised, t.quantised_bytes);
        }
        if (shuffle) shuffle_scales(out, plan.n_values);
        return;
    }
    const bool convert = plan.values != t.dtype;
    if (plan.encoding != kDense && !convert && !shuffle) {
        gather_values(t, plan, out);
        return;
    }
    // The value stream in the tensor's dtype (the tensor itself when dense), converted in one call.
    const uint8_t* source = t.data;
    std::vector<uint8_t> gathered;
    if (plan.encoding != kDense) {
        gathered.resize(plan.n_values * dtype_size(t.dtype));
        gather_values(t, plan, gathered.data());
        source = gathered.data();
    }
    if (plan.values == kInt8Block || plan.values == kInt4Block) {
        std::vector<float> widened(t.dtype == kF32 ? 0 : plan.n_values);
        if (t.dtype != kF32) converter(t.dtype, kF32)(source, reinterpret_cast<uint8_t*>(widened.data()), plan.n_values);
        const float* x = t.dtype == kF32 ? reinterpret_cast<const float*>(source) : widened.data();
        if (plan.values == kInt8Block)
            quantise(x, plan.n_values, out);
        else
            quantise_int4(x, plan.n_values, out);
        if (shuffle) shuffle_scales(out, plan.n_values);
        return;
    }
    std::vector<uint8_t> staging(shuffle ? plan.values_len : 0);
    converter(t.dtype, plan.values)(source, shuffle ? staging.data() : out, plan.n_values);
    if (shuffle) shuffle_bytes(staging.data(), out, plan.n_values, dtype_size(plan.values));
}

}  // namespace

Encoder::Encoder(std::vector<TensorIn> tensors, EncodeOptions options)
    : tensors_(std::move(tensors)), plans_(tensors_.size()), options_(options) {
    for (size_t k = 0; k < tensors_.size(); ++k) {
        const TensorIn& t = tensors_[k];
        TensorPlan& plan = plans_[k];
        if (t.shape.size() > kMaxDims)
            throw EncodeError("tensor '" + t.name + "' has more than 8 dimensions");
        for (uint64_t d : t.shape) plan.numel *= d;  // the caller's tensor exists: no overflow
        if (t.shape.size() == 2) {
            plan.rows = t.shape[0];
            plan.cols = t.shape[1];
        }
        plan.values = options.values == kF32 ? t.dtype : options.values;
        if (t.given_body && !t.data && (options.check_finite || t.mask_kind == MaskKind::kAuto))
            throw EncodeError("tensor '" + t.name + "': its values are needed on the host");
        if (t.given_body && plan.values != kInt8Block && plan.values != kInt4Block)
            throw EncodeError("tensor '" + t.name + "': a quantised body is int8 or int4, not the requested values");
        if (options.check_finite)
            for (uint64_t i = 0; i < plan.numel; ++i)
                if (!is_finite_bits(t.dtype, t.data, i))
                    throw EncodeError("tensor '" + t.name + "' has a non-finite value at flat index " +
                                      std::to_string(i));
        if (t.mask_kind == MaskKind::kAuto)
            plan_auto(t, plan);
        else
            plan_masked(t, plan);
        plan.values_len = value_body_size(plan.values, plan.n_values);
        if (t.given_body && (t.scales_bytes != 4 * quant_blocks(plan.n_values) ||
                             t.scales_bytes + t.quantised_bytes != plan.values_len))
            throw EncodeError("tensor '" + t.name + "': its quantised body does not hold the " +
                              std::to_string(plan.n_values) + " values its mask keeps");
        section_size_ += 2 + t.name.size() + 5 + 8 * t.shape.size() + 24 + plan.index_len + plan.values_len;
    }
}

Encoder::~Encoder() = default;

uint32_t Encoder::write_section(uint8_t* out, uint32_t crc) const {
    for (size_t k = 0; k < tensors_.size(); ++k) {
        const TensorIn& t = tensors_[k];
        const TensorPlan& plan = plans_[k];
        uint8_t* const record = out;
        put<uint16_t>(out, static_cast<uint16_t>(t.name.size()));
        std::memcpy(out, t.name.data(), t.name.size());
        out += t.name.size();
        put<uint8_t>(out, t.dtype);
        put<uint8_t>(out, plan.values);
        put<uint8_t>(out, plan.encoding);
        put<uint8_t>(out, plan.index_code);
        put<uint8_t>(out, static_cast<uint8_t>(t.shape.size()));
        for (uint64_t d : t.shape) put<uint64_t>(out, d);
        put<uint64_t>(out, plan.n_kept);
        put<uint64_t>(out, plan.index_len);
        put<uint64_t>(out, plan.values_len);
        write_index(t, plan, out);
        out += plan.index_len;
        crc = crc32c(record, static_cast<size_t>(out - record), crc);
        if (plan.encoding == kDense && plan.values == t.dtype && !options_.shuffle) {
            // One pass over the tensor.
            crc = crc32c_copy(t.data, out, plan.values_len, crc, section_size_ >= kStreamingOutputBytes);
        } else {
            write_values(t, plan, options_.shuffle, out);
            crc = crc32c(out, plan.values_len, crc);  // still in cache
        }
        out += plan.values_len;
    }
    return crc;
}

void write_header(uint8_t* out, uint32_t n_tensors, uint16_t flags, uint64_t section_len, uint64_t raw_len) {
    uint8_t* p = out;
    std::memcpy(p, kMagic, 4);
    p += 4;
    put<uint16_t>(p, kVersion);
    put<uint16_t>(p, flags);
    put<uint32_t>(p, n_tensors);
    put<uint64_t>(p, section_len);
    put<uint64_t>(p, raw_len);
}

// ---------------------------------------------------------------- decoder

namespace {

class Cursor {
  public:
    Cursor(const uint8_t* data, size_t len) : p_(data), len_(len) {}

    const uint8_t* take(uint64_t n, const char* what) {
        if (n > len_ - pos_) throw PayloadError(std::string("truncated: ") + what + " runs past the end");
        const uint8_t* at = p_ + pos_;
        pos_ += n;
        return at;
    }

    template <class T>
    T get(const char* what) {
        T v;
        std::memcpy(&v, take(sizeof(T), what), sizeof(T));
        return v;
    }

    size_t remaining() const { return len_ - pos_; }

  private:
    const uint8_t* p_;
    size_t len_;
    size_t pos_ = 0;
};

std::string describe(const char* field, uint64_t value) { return std::string(field) + " " + std::to_string(value); }

}  // namespace

uint32_t stored_crc(const uint8_t* data, const Frame& frame) {
    uint32_t stored;
    std::memcpy(&stored, data + frame.section_offset + frame.section_len, 4);
    return stored;
}

Frame read_frame(const uint8_t* data, size_t len, bool verify_crc) {
    if (len < 4) throw PayloadError("truncated: shorter than the magic");
    if (std::memcmp(data, kMagic, 4) != 0) throw PayloadError("bad magic: not a fibec payload");
    if (len < kHeaderSize + kTrailerSize) throw PayloadError("truncated: shorter than header and checksum");
    Cursor c(data + 4, len - 4);
    Frame f{};
    const uint16_t version = c.get<uint16_t>("version");
    if (version != kVersion) throw PayloadError(describe("unsupported format version", version));
    f.flags = c.get<uint16_t>("flags");
    if (f.flags & ~kFlagZstd) throw PayloadError(describe("unknown flag bits", f.flags));
    f.n_tensors = c.get<uint32_t>("tensor count");
    f.section_len = c.get<uint64_t>("section length");
    f.raw_len = c.get<uint64_t>("raw section length");
    f.section_offset = kHeaderSize;
    const uint64_t available = len - kHeaderSize - kTrailerSize;
    if (f.section_len > available) throw PayloadError("truncated: section length exceeds the payload");
    if (f.section_len < available) throw PayloadError("trailing garbage after the checksum");
    if (!(f.flags & kFlagZstd) && f.raw_len != f.section_len)
        throw PayloadError("raw section length disagrees with an uncompressed section");
    if (verify_crc && crc32c(data, kHeaderSize + f.section_len) != stored_crc(data, f))
        throw PayloadError("checksum mismatch");
    return f;
}

std::vector<Record> parse_section(const uint8_t* data, size_t len, uint32_t n_tensors, uint64_t max_output_bytes) {
    constexpr size_t kMinRecord = 2 + 5 + 24;
    if (n_tensors > len / kMinRecord) throw PayloadError("tensor count exceeds what the section can hold");
    std::vector<Record> records(n_tensors);
    Cursor c(data, len);
    uint64_t total_out = 0;
    for (Record& r : records) {
        r.begin = data + (len - c.remaining());
        const uint16_t name_len = c.get<uint16_t>("name length");
        const uint8_t* name = c.take(name_len, "name");
        r.name.assign(reinterpret_cast<const char*>(name), name_len);
        r.dtype = c.get<uint8_t>("dtype");
        r.values = c.get<uint8_t>("value format");
        const uint8_t encoding = c.get<uint8_t>("encoding");
        const uint8_t index_code = c.get<uint8_t>("index code");
        const uint8_t ndim = c.get<uint8_t>("ndim");
        if (r.dtype < kF32 || r.dtype > kBF16) throw PayloadError(describe("unknown dtype code", r.dtype));
        if (r.values < kF32 || r.values > kInt4Block) throw PayloadError(describe("unknown value format", r.values));
        if (encoding > kElements) throw PayloadError(describe("unknown encoding", encoding));
        if (index_code > kBitmap) throw PayloadError(describe("unknown index code", index_code));
        if (ndim > kMaxDims) throw PayloadError(describe("too many dimensions:", ndim));
        r.encoding = static_cast<Encoding>(encoding);
        r.index_code = static_cast<IndexCode>(index_code);
        r.shape.resize(ndim);
        r.numel = 1;
        for (auto& d : r.shape) {
            d = c.get<uint64_t>("shape");
            if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                throw PayloadError("shape dimension exceeds 2^63 - 1");
            if (__builtin_mul_overflow(r.numel, d, &r.numel)) throw PayloadError("shape element count overflows");
        }
        if (__builtin_mul_overflow(r.numel, static_cast<uint64_t>(dtype_size(r.dtype)), &r.out_bytes) ||
            __builtin_add_overflow(total_out, r.out_bytes, &total_out) || total_out > max_output_bytes)
            throw PayloadError("declared shapes need more than " + std::to_string(max_output_bytes) +
                               " output bytes (max_output_bytes)");
        r.n_kept = c.get<uint64_t>("kept count");
        r.index_len = c.get<uint64_t>("index length");
        r.values_len = c.get<uint64_t>("values length");

        if ((r.encoding == kRows || r.encoding == kCols) && ndim != 2)
            throw PayloadError("row/column encoding needs a 2-D shape");
        const uint64_t rows = ndim == 2 ? r.shape[0] : 1, cols = ndim == 2 ? r.shape[1] : r.numel;
        r.universe = r.encoding == kRows ? rows : r.encoding == kCols ? cols : r.numel;
        if (r.encoding == kDense) {
            if (r.index_code != kNoIndex) throw PayloadError("dense tensor with an index code");
            if (r.n_kept != r.numel) throw PayloadError("dense tensor's count disagrees with its shape");
        } else {
            if (r.index_code == kNoIndex) throw PayloadError("sparse tensor without an index code");
            if (r.n_kept > r.universe) throw PayloadError("kept count exceeds the shape");
        }
        r.n_values = r.encoding == kRows ? r.n_kept * cols : r.encoding == kCols ? r.n_kept * rows : r.n_kept;

        uint64_t expected_values;
        if (!value_body_size(r.values, r.n_values, expected_values) || expected_values != r.values_len)
            throw PayloadError("values length disagrees with the count of values");
        if (r.index_code == kBitmap && r.index_len != bitmap_size(r.universe))
            throw PayloadError("bitmap length disagrees with the shape");
        if (r.index_code == kVarint && (r.index_len < r.n_kept || (r.index_len + 9) / 10 > r.n_kept))
            throw PayloadError("varint index length disagrees with the kept count");
        if (r.index_code == kNoIndex && r.index_len != 0) throw PayloadError("index bytes on a dense tensor");
        r.index = c.take(r.index_len, "index body");
        r.value_body = c.take(r.values_len, "values body");
        if (r.values == kInt4Block && r.n_values % 2 && (r.value_body[r.values_len - 1] & 0xF0))
            throw PayloadError("int4 values: the unused high nibble of the last byte is not 0");
        if (r.index_code != kNoIndex) {
            IndexReader reader(r.index_code, r.index, r.index_len, r.universe);
            for (uint64_t k = 0; k < r.n_kept; ++k) reader.next();
            reader.finish();
        }
    }
    if (c.remaining() != 0) throw PayloadError("trailing bytes after the last tensor record");
    std::unordered_set<std::string_view> names;
    for (const Record& r : records)
        if (!names.insert(r.name).second) throw PayloadError("duplicate tensor name '" + r.name + "'");
    return records;
}

namespace {

// Calls f(offset, count) for each run of a decoded record's kept elements, in stream order
// (its index body was checked when the payload was parsed).
template <class F>
void for_each_record_run(const Record& r, F&& f) {
    const uint64_t rows = r.shape.size() == 2 ? r.shape[0] : 1;
    const uint64_t cols = r.shape.size() == 2 ? r.shape[1] : r.numel;
    for_each_run(r.encoding, rows, cols, r.numel, [&](auto&& g) {
        IndexReader reader(r.index_code, r.index, r.index_len, r.universe);
        for (uint64_t k = 0; k < r.n_kept; ++k) g(reader.next());
    }, f);
}

// Writes a sparse record's dense tensor from its value stream, already in the tensor's dtype
// (W bytes per value).
template <size_t W>
void scatter(const Record& r, const uint8_t* stream, uint8_t* out) {
    std::memset(out, 0, r.out_bytes);
    for_each_record_run(r, [&](uint64_t offset, uint64_t n) {
        copy_values(stream, out + offset * W, n, W);
        stream += n * W;
    });
}

}  // namespace

void fill_record(const Record& r, uint8_t* out, bool shuffled, bool streaming) {
    // The value stream in plain layout...
    const uint8_t* stream = r.value_body;
    std::vector<uint8_t> plain;
    if (shuffled) {
        plain.resize(r.values_len);
        if (r.values == kInt8Block || r.values == kInt4Block) {  // only the scales are shuffled
            const uint64_t blocks = quant_blocks(r.n_values);
            unshuffle_bytes(r.value_body, plain.data(), blocks, 4);
            copy_bytes(plain.data() + 4 * blocks, r.value_body + 4 * blocks, r.values_len - 4 * blocks);
        } else {
            unshuffle_bytes(r.value_body, plain.data(), r.n_values, dtype_size(r.values));
        }
        stream = plain.data();
    }
    // ...then in the tensor's dtype, converted in one call (into out when dense)...
    const bool dense = r.encoding == kDense;
    std::vector<uint8_t> converted;
    if (r.values != r.dtype) {
        uint8_t* target = out;
        if (!dense) {
            converted.resize(r.n_values * dtype_size(r.dtype));
            target = converted.data();
        }
        const auto dequantised = r.values == kInt8Block ? dequantise : dequantise_int4;
        if (r.values != kInt8Block && r.values != kInt4Block) {
            converter(r.values, r.dtype, dense && streaming ? out : nullptr)(stream, target, r.n_values);
        } else if (r.dtype == kF32) {
            dequantised(stream, r.n_values, reinterpret_cast<float*>(target));
        } else {
            std::vector<float> widened(r.n_values);
            dequantised(stream, r.n_values, widened.data());
            converter(kF32, r.dtype)(reinterpret_cast<const uint8_t*>(widened.data()), target, r.n_values);
        }
        stream = target;
    }
    // ...and placed.
    if (dense) {
        if (stream != out) copy_bytes(out, stream, r.out_bytes);
    } else if (dtype_size(r.dtype) == 4) {
        scatter<4>(r, stream, out);
    } else {
        scatter<2>(r, stream, out);
    }
}

namespace {

// Sets bits [from, from + count) of a zeroed bit array (bit i in bit i % 8 of byte i / 8).
void set_bits(uint8_t* bits, uint64_t from, uint64_t count) {
    while (count && from % 8) {
        bits[from / 8] |= static_cast<uint8_t>(1u << (from % 8));
        ++from, --count;
    }
    std::memset(bits + from / 8, 0xFF, count / 8);
    from += count / 8 * 8;
    for (uint64_t end = from + count % 8; from < end; ++from) bits[from / 8] |= static_cast<uint8_t>(1u << (from % 8));
}

}  // namespace

void stage_quantised(const Record& r, bool shuffled, uint8_t* scales, int8_t* q, uint8_t* kept_bits, uint64_t first_bit) {
    const uint64_t blocks = quant_blocks(r.n_values);
    if (shuffled)
        unshuffle_bytes(r.value_body, scales, blocks, 4);
    else
        copy_bytes(scales, r.value_body, 4 * blocks);
    const uint8_t* values = r.value_body + 4 * blocks;
    if (r.values == kInt8Block) {
        copy_bytes(reinterpret_cast<uint8_t*>(q), values, r.n_values);
    } else {
        for (uint64_t i = 0; i < r.n_values; ++i) q[i] = static_cast<int8_t>(int4_step(values, i));
    }
    for_each_record_run(r, [&](uint64_t offset, uint64_t n) { set_bits(kept_bits, first_bit + offset, n); });
}

uint32_t checksum_and_fill(const Record& r, uint8_t* out, uint32_t crc, bool streaming) {
    crc = crc32c(r.begin, static_cast<size_t>(r.value_body - r.begin), crc);  // fields and index body
    if (out && r.encoding == kDense && r.values == r.dtype)
        return crc32c_copy(r.value_body, out, r.values_len, crc, streaming);
    crc = crc32c(r.value_body, r.values_len, crc);
    if (out) fill_record(r, out, false, streaming);  // the body is still in cache
    return crc;
}

}  // namespace fibec
