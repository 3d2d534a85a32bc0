// Python bindings for the payload codec: tensors are read in place, payloads come in via
// the buffer protocol, encode() allocates its bytes once, decoded tensors leave as DLPack
// capsules over one output block; all coding runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <utility>

#include "crc32c.h"
#include "dlpack.h"
#include "output_block.h"
#include "payload.h"
#include "quant_blocks.h"

namespace py = pybind11;
using namespace fibec;

namespace {

// A C-contiguous buffer export (any number of dimensions), released on destruction.
class ByteView {
  public:
    ByteView(const py::handle& obj, const char* what, bool writable = false) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(what) + (writable ? " must be a writable C-contiguous buffer"
                                                               : " must be a C-contiguous buffer"));
        }
    }
    ~ByteView() { PyBuffer_Release(&view_); }
    ByteView(const ByteView&) = delete;
    ByteView& operator=(const ByteView&) = delete;
    const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
    uint8_t* mutable_data() const { return static_cast<uint8_t*>(view_.buf); }
    size_t size() const { return static_cast<size_t>(view_.len); }

  private:
    Py_buffer view_{};
};

py::bytes new_bytes(size_t n, uint8_t*& data) {
    PyObject* obj = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
    if (!obj) throw py::error_already_set();
    data = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(obj));
    return py::reinterpret_steal<py::bytes>(obj);
}

// A memory range handed over as (address, bytes) by fibec/codec.py, which keeps its tensor
// alive for the call; the size is checked against what the range must hold.
const uint8_t* tensor_memory(const py::handle& address, const py::handle& bytes, uint64_t expected, const std::string& what) {
    if (bytes.cast<uint64_t>() != expected) throw py::value_error(what + ": size disagrees with its shape");
    return reinterpret_cast<const uint8_t*>(address.cast<uintptr_t>());
}

// tensors: [(name: bytes, dtype: int, shape: tuple, data address: int, data bytes: int,
//            mask kind: int, mask address: int, mask bytes: int, scales address: int | None,
//            scales bytes: int, quantised address: int, quantised bytes: int,
//            what keeps that memory alive)]; scales address None: no int8/int4 body given; data
//            address 0 with a body: the values are not on the host.
py::bytes encode(const py::list& tensors, int values, bool shuffle, bool check_finite, bool framed) {
    if (values < kF32 || values > kInt4Block) throw py::value_error("unknown value format code");
    std::vector<TensorIn> inputs;
    inputs.reserve(tensors.size());
    for (const auto& item : tensors) {
        auto spec = item.cast<py::tuple>();
        TensorIn t;
        t.name = spec[0].cast<std::string>();
        t.dtype = spec[1].cast<uint8_t>();
        t.shape = spec[2].cast<std::vector<uint64_t>>();
        if (dtype_size(t.dtype) < 2 || t.dtype == kInt8Block) throw py::type_error("unsupported dtype code");
        uint64_t numel = 1;
        for (uint64_t d : t.shape) numel *= d;
        t.given_body = !spec[8].is_none();
        if (t.given_body) {
            t.scales = reinterpret_cast<const uint8_t*>(spec[8].cast<uintptr_t>());
            t.scales_bytes = spec[9].cast<uint64_t>();
            t.quantised = reinterpret_cast<const uint8_t*>(spec[10].cast<uintptr_t>());
            t.quantised_bytes = spec[11].cast<uint64_t>();
        }
        t.data = t.given_body && spec[3].cast<uintptr_t>() == 0
                     ? nullptr
                     : tensor_memory(spec[3], spec[4], numel * dtype_size(t.dtype), "tensor '" + t.name + "'");
        t.mask_kind = static_cast<MaskKind>(spec[5].cast<int>());
        if (t.mask_kind > MaskKind::kKeepAll) throw py::value_error("unknown mask kind");
        t.mask = nullptr;
        if (t.mask_kind != MaskKind::kAuto && t.mask_kind != MaskKind::kKeepAll) {
            const uint64_t units = t.mask_kind == MaskKind::kRows   ? t.shape.at(0)
                                   : t.mask_kind == MaskKind::kCols ? t.shape.at(1)
                                                                    : numel;
            t.mask = tensor_memory(spec[6], spec[7], units, "mask of '" + t.name + "'");
        }
        inputs.push_back(std::move(t));
    }
    const auto n_tensors = static_cast<uint32_t>(inputs.size());
    std::unique_ptr<Encoder> encoder;
    {
        py::gil_scoped_release release;
        encoder = std::make_unique<Encoder>(std::move(inputs), EncodeOptions{static_cast<uint8_t>(values), shuffle, check_finite});
    }
    const uint64_t section = encoder->section_size();
    uint8_t* out = nullptr;
    py::bytes result = new_bytes(framed ? kHeaderSize + section + kTrailerSize : section, out);
    {
        py::gil_scoped_release release;
        advise_huge_pages(out, section);
        if (framed) {
            write_header(out, n_tensors, 0, section, section);
            const uint32_t crc = encoder->write_section(out + kHeaderSize, crc32c(out, kHeaderSize));
            std::memcpy(out + kHeaderSize + section, &crc, 4);
        } else {
            encoder->write_section(out, 0);
        }
    }
    return result;
}

py::bytes frame(const py::object& section, uint64_t raw_len, uint32_t n_tensors, uint16_t flags) {
    ByteView view(section, "section");
    uint8_t* out = nullptr;
    py::bytes result = new_bytes(kHeaderSize + view.size() + kTrailerSize, out);
    py::gil_scoped_release release;
    write_header(out, n_tensors, flags, view.size(), raw_len);
    const uint32_t crc = crc32c_copy(view.data(), out + kHeaderSize, view.size(), crc32c(out, kHeaderSize),
                                     view.size() >= kStreamingOutputBytes);
    std::memcpy(out + kHeaderSize + view.size(), &crc, 4);
    return result;
}

py::tuple read_frame_py(const py::object& payload, bool verify_crc) {
    ByteView view(payload, "payload");
    Frame f;
    {
        py::gil_scoped_release release;
        f = read_frame(view.data(), view.size(), verify_crc);
    }
    return py::make_tuple(f.flags, f.n_tensors, f.section_offset, f.section_len, f.raw_len);
}

// DLPack export of decoded tensors: each capsule's tensor keeps the shared output block alive.
struct ExportedTensor {
    dlpack::ManagedTensor managed{};
    std::shared_ptr<OutputBlock> block;
    std::vector<int64_t> shape, strides;
};

void delete_exported(dlpack::ManagedTensor* self) { delete static_cast<ExportedTensor*>(self->manager_ctx); }

void destroy_capsule(PyObject* capsule) {
    if (!PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) return;  // consumed: the tensor owns it now
    auto* managed = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
    managed->deleter(managed);
}

py::object export_tensor(const Record& r, const std::shared_ptr<OutputBlock>& block, uint8_t* data) {
    auto exported = std::make_unique<ExportedTensor>();
    exported->block = block;
    exported->shape.assign(r.shape.begin(), r.shape.end());  // each < 2^63 (parse_section)
    exported->strides.resize(r.shape.size());
    int64_t stride = 1;
    for (size_t d = r.shape.size(); d-- > 0;) {
        exported->strides[d] = stride;
        stride *= exported->shape[d] ? exported->shape[d] : 1;  // numel bounded by the output budget
    }
    dlpack::Tensor& t = exported->managed.dl_tensor;
    t.data = data;
    t.device = {dlpack::kCPU, 0};
    t.ndim = static_cast<int32_t>(r.shape.size());
    t.dtype = {r.dtype == kBF16 ? dlpack::kBfloat : dlpack::kFloat, static_cast<uint8_t>(8 * dtype_size(r.dtype)), 1};
    t.shape = exported->shape.data();
    t.strides = exported->strides.data();
    exported->managed.manager_ctx = exported.get();
    exported->managed.deleter = delete_exported;
    PyObject* capsule = PyCapsule_New(&exported->managed, dlpack::kCapsuleName, destroy_capsule);
    if (!capsule) throw py::error_already_set();
    exported.release();
    return py::reinterpret_steal<py::object>(capsule);
}

// A validated section. The buffer stays exported (and so alive and unchanged) as long as
// this object exists.
class Section {
  public:
    // With verify_crc, buffer is a whole uncompressed payload (section at offset, CRC after
    // it) whose checksum is verified record by record while decoding, so that each record is
    // read from memory once; a parse error on a payload whose checksum is bad is reported as
    // a checksum mismatch.
    Section(const py::object& buffer, uint64_t offset, uint64_t length, uint32_t n_tensors, bool shuffled,
            uint64_t max_output_bytes, bool verify_crc)
        : view_(buffer, "payload"), offset_(offset), shuffled_(shuffled), verify_crc_(verify_crc) {
        if (offset > view_.size() || length > view_.size() - offset) throw py::value_error("section outside the buffer");
        if (verify_crc && view_.size() - offset - length != kTrailerSize)
            throw py::value_error("no checksum after the section");
        const uint8_t* data = view_.data();
        if (verify_crc) std::memcpy(&expected_crc_, data + offset + length, 4);
        const auto checksum_fails = [&] { return verify_crc && crc32c(data, offset + length) != expected_crc_; };
        {
            py::gil_scoped_release release;
            try {
                records_ = parse_section(data + offset, length, n_tensors, max_output_bytes);
            } catch (const PayloadError&) {
                if (checksum_fails()) throw PayloadError("checksum mismatch");
                throw;
            }
        }
        names_.reserve(records_.size());
        for (const Record& r : records_) {
            PyObject* name = PyUnicode_DecodeUTF8(r.name.data(), static_cast<Py_ssize_t>(r.name.size()), "strict");
            if (!name) {
                PyErr_Clear();
                if (checksum_fails()) throw PayloadError("checksum mismatch");
                throw PayloadError("tensor name " + py::repr(py::bytes(r.name.substr(0, 40))).cast<std::string>() +
                                   " is not valid UTF-8");
            }
            names_.push_back(py::reinterpret_steal<py::str>(name));
        }
    }

    // [(name: str, dtype: int, shape: tuple, layout)], layout being
    // (value format, encoding, index code, kept count, index bytes, values bytes).
    py::list tensors() const {
        py::list result;
        for (size_t k = 0; k < records_.size(); ++k) {
            const Record& r = records_[k];
            py::tuple shape(r.shape.size());
            for (size_t d = 0; d < r.shape.size(); ++d) shape[d] = py::int_(r.shape[d]);
            result.append(py::make_tuple(names_[k], r.dtype, shape,
                                         py::make_tuple(r.values, static_cast<int>(r.encoding),
                                                        static_cast<int>(r.index_code), r.n_kept, r.index_len,
                                                        r.values_len)));
        }
        return result;
    }

    // Verifies the checksum (when asked at construction) without decoding.
    void verify() const { run(nullptr, {}, false); }

    // ([name: str], [DLPack capsule]): the decoded tensors, in one shared output block.
    py::tuple decode() const {
        py::list names;
        for (const py::str& name : names_) names.append(name);
        std::vector<uint64_t> offsets(records_.size());
        uint64_t total = 0;
        for (size_t k = 0; k < records_.size(); ++k) {
            offsets[k] = total;
            total += (records_[k].out_bytes + kOutputAlignment - 1) / kOutputAlignment * kOutputAlignment;
        }
        const std::shared_ptr<OutputBlock> block = OutputBlock::acquire(total);
        run(block->data(), offsets, total >= kStreamingOutputBytes);
        py::list capsules;
        for (size_t k = 0; k < records_.size(); ++k)
            capsules.append(export_tensor(records_[k], block, block->data() + offsets[k]));
        return py::make_tuple(names, capsules);
    }

    // For decoding on a device (fibec/_payload_on_device.py): None unless every record holds int8
    // or int4 values; else (blocks, elements, [(first block, values, elements) per record]) of the
    // staging layout that stage_quantised writes: blocks * 4 bytes of fp32 scales, blocks * 64
    // int8 values (each record's from a whole block on, zeros between), then one bit per element
    // of every record in turn, set where the record holds a value.
    py::object quantised_layout() const {
        const std::optional<QuantisedLayout> layout = quantised_layout_of();
        if (!layout) return py::none();
        py::list records;
        for (size_t k = 0; k < records_.size(); ++k)
            records.append(py::make_tuple(layout->first_block[k], records_[k].n_values, records_[k].numel));
        return py::make_tuple(layout->blocks, layout->elements, records);
    }

    // Writes that layout to out (its size exactly), verifying the checksum first when asked at
    // construction; the layout must have been one (not None).
    void stage_quantised(const py::object& out) const {
        ByteView target(out, "out", true);
        const std::optional<QuantisedLayout> layout = quantised_layout_of();
        if (!layout) throw py::value_error("stage_quantised: a record does not hold int8 or int4 values");
        const uint64_t blocks = layout->blocks, bits_at = blocks * (4 + kQuantBlock);
        if (target.size() != bits_at + (layout->elements + 7) / 8)
            throw py::value_error("stage_quantised: out has the wrong size");
        run(nullptr, {}, false);
        py::gil_scoped_release release;
        uint8_t* base = target.mutable_data();
        std::memset(base + 4 * blocks, 0, target.size() - 4 * blocks);
        for (size_t k = 0; k < records_.size(); ++k) {
            const uint64_t block = layout->first_block[k];
            fibec::stage_quantised(records_[k], shuffled_, base + 4 * block,
                                   reinterpret_cast<int8_t*>(base + 4 * blocks + kQuantBlock * block), base + bits_at,
                                   layout->first_element[k]);
        }
    }

  private:
    // The staging layout's totals and where each record starts in it.
    struct QuantisedLayout {
        uint64_t blocks = 0, elements = 0;
        std::vector<uint64_t> first_block, first_element;
    };

    // The staging layout; none if a record holds values other than int8 or int4.
    std::optional<QuantisedLayout> quantised_layout_of() const {
        QuantisedLayout layout;
        for (const Record& r : records_) {
            if (r.values != kInt8Block && r.values != kInt4Block) return std::nullopt;
            layout.first_block.push_back(layout.blocks);
            layout.first_element.push_back(layout.elements);
            layout.blocks += quant_blocks(r.n_values);
            layout.elements += r.numel;
        }
        return layout;
    }

    void run(uint8_t* base, const std::vector<uint64_t>& offsets, bool streaming) const {
        py::gil_scoped_release release;
        uint32_t crc = verify_crc_ ? crc32c(view_.data(), offset_) : 0;
        for (size_t k = 0; k < records_.size(); ++k) {
            uint8_t* out = base && records_[k].out_bytes ? base + offsets[k] : nullptr;
            if (verify_crc_)
                crc = checksum_and_fill(records_[k], out, crc, streaming);
            else if (out)
                fill_record(records_[k], out, shuffled_, streaming);
        }
        if (verify_crc_ && crc != expected_crc_) throw PayloadError("checksum mismatch");
    }

    ByteView view_;
    uint64_t offset_;
    bool shuffled_, verify_crc_;
    uint32_t expected_crc_ = 0;
    std::vector<Record> records_;
    std::vector<py::str> names_;  // the records' names, checked as UTF-8
};

uint32_t crc32c_py(const py::object& data, uint32_t crc) {
    ByteView view(data, "data");
    py::gil_scoped_release release;
    return crc32c(view.data(), view.size(), crc);
}

}  // namespace

PYBIND11_MODULE(_codec, m) {
    m.doc() = "fibec payload codec core (see docs/PAYLOAD.md); use fibec.codec instead.";
    static_assert(sizeof(void*) == 8, "64-bit hosts only");
    py::register_exception<PayloadError>(m, "CorruptPayload", PyExc_ValueError);
    m.def("encode", &encode, py::arg("tensors"), py::arg("values"), py::arg("shuffle"), py::arg("check_finite"),
          py::arg("framed"));
    m.def("frame", &frame, py::arg("section"), py::arg("raw_len"), py::arg("n_tensors"), py::arg("flags"));
    m.def("read_frame", &read_frame_py, py::arg("payload"), py::arg("verify_crc"));
    py::class_<Section>(m, "Section")
        .def(py::init<const py::object&, uint64_t, uint64_t, uint32_t, bool, uint64_t, bool>(), py::arg("buffer"),
             py::arg("offset"), py::arg("length"), py::arg("n_tensors"), py::arg("shuffled"),
             py::arg("max_output_bytes"), py::arg("verify_crc"))
        .def("tensors", &Section::tensors)
        .def("verify", &Section::verify)
        .def("decode", &Section::decode)
        .def("quantised_layout", &Section::quantised_layout)
        .def("stage_quantised", &Section::stage_quantised, py::arg("out"));
    m.def("crc32c", &crc32c_py, py::arg("data"), py::arg("crc") = 0);
    m.def("release_cached_blocks", &OutputBlock::release_cached);
    m.def("cached_block_bytes", &OutputBlock::cached_bytes);
    m.attr("FORMAT_VERSION") = kVersion;
    m.attr("HEADER_SIZE") = kHeaderSize;
    m.attr("QUANT_BLOCK") = kQuantBlock;
}
