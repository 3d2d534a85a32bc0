// Python bindings for the payload codec: buffers in via the buffer protocol (read in
// place), bytes/bytearray out (allocated once, filled with the GIL released).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "crc32c.h"
#include "payload.h"

namespace py = pybind11;
using namespace fibec;

namespace {

// A C-contiguous buffer export (any number of dimensions), released on destruction.
class ByteView {
  public:
    ByteView(const py::handle& obj, const char* what) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(what) + " must be a C-contiguous buffer");
        }
    }
    ~ByteView() { PyBuffer_Release(&view_); }
    ByteView(const ByteView&) = delete;
    ByteView& operator=(const ByteView&) = delete;
    const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
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

// tensors: [(name: bytes, dtype: int, shape: tuple, data: buffer, mask_kind: int, mask: buffer | None)]
py::bytes encode(const py::list& tensors, int values, bool shuffle, bool check_finite, bool framed) {
    std::vector<TensorIn> inputs;
    std::vector<std::unique_ptr<ByteView>> views;  // keep the buffers exported while encoding
    for (const auto& item : tensors) {
        auto spec = item.cast<py::tuple>();
        TensorIn t;
        t.name = spec[0].cast<std::string>();
        t.dtype = spec[1].cast<uint8_t>();
        t.shape = spec[2].cast<std::vector<uint64_t>>();
        if (dtype_size(t.dtype) < 2 || t.dtype == kInt8Block) throw py::type_error("unsupported dtype code");
        uint64_t numel = 1;
        for (uint64_t d : t.shape) numel *= d;
        views.push_back(std::make_unique<ByteView>(spec[3], "tensor data"));
        if (views.back()->size() != numel * dtype_size(t.dtype))
            throw py::value_error("tensor '" + t.name + "': data size disagrees with shape");
        t.data = views.back()->data();
        t.mask_kind = static_cast<MaskKind>(spec[4].cast<int>());
        t.mask = nullptr;
        if (t.mask_kind != MaskKind::kAuto) {
            views.push_back(std::make_unique<ByteView>(spec[5], "mask"));
            const uint64_t units = t.mask_kind == MaskKind::kRows   ? t.shape.at(0)
                                   : t.mask_kind == MaskKind::kCols ? t.shape.at(1)
                                                                    : numel;
            if (views.back()->size() != units)
                throw py::value_error("tensor '" + t.name + "': mask size disagrees with shape");
            t.mask = views.back()->data();
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
    std::memcpy(out + kHeaderSize, view.data(), view.size());
    const uint32_t crc = crc32c(out, kHeaderSize + view.size());
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

// Returns [(name: bytes, dtype: int, shape: tuple, data: bytearray | None, layout: tuple)]; data is
// None for empty tensors and when fill is false (inspection); layout is
// (value format, encoding, index code, kept count, index bytes, values bytes).
// With verify_crc, buffer is a whole uncompressed payload (section at offset, CRC after it)
// whose checksum is verified record by record while filling, so each record is read from
// memory once; any parse error is reported as a checksum mismatch when the checksum is bad.
py::list decode_section(const py::object& buffer, uint64_t offset, uint64_t length, uint32_t n_tensors,
                        bool shuffled, uint64_t max_output_bytes, bool fill, bool verify_crc) {
    ByteView view(buffer, "payload");
    if (offset > view.size() || length > view.size() - offset) throw py::value_error("section outside the buffer");
    if (verify_crc && view.size() - offset - length != kTrailerSize) throw py::value_error("no checksum after the section");
    const uint8_t* data = view.data();
    uint32_t expected_crc = 0;
    if (verify_crc) std::memcpy(&expected_crc, data + offset + length, 4);
    std::vector<Record> records;
    {
        py::gil_scoped_release release;
        try {
            records = parse_section(data + offset, length, n_tensors, max_output_bytes);
        } catch (const PayloadError&) {
            if (verify_crc && crc32c(data, offset + length) != expected_crc) throw PayloadError("checksum mismatch");
            throw;
        }
    }
    std::vector<py::object> outputs;
    std::vector<uint8_t*> targets;
    for (const Record& r : records) {
        if (r.out_bytes == 0 || !fill) {
            outputs.push_back(py::none());
            targets.push_back(nullptr);
            continue;
        }
        PyObject* obj = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(r.out_bytes));
        if (!obj) throw py::error_already_set();
        outputs.push_back(py::reinterpret_steal<py::object>(obj));
        targets.push_back(reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(obj)));
    }
    {
        py::gil_scoped_release release;
        uint32_t crc = verify_crc ? crc32c(data, offset) : 0;
        for (size_t k = 0; k < records.size(); ++k) {
            if (verify_crc) crc = crc32c(records[k].begin, records[k].size, crc);
            if (targets[k]) fill_record(records[k], targets[k], shuffled);
        }
        if (verify_crc && crc != expected_crc) throw PayloadError("checksum mismatch");
    }
    py::list result;
    for (size_t k = 0; k < records.size(); ++k) {
        const Record& r = records[k];
        py::tuple shape(r.shape.size());
        for (size_t d = 0; d < r.shape.size(); ++d) shape[d] = py::int_(r.shape[d]);
        result.append(py::make_tuple(py::bytes(r.name), r.dtype, shape, outputs[k],
                                     py::make_tuple(r.values, static_cast<int>(r.encoding),
                                                    static_cast<int>(r.index_code), r.n_kept, r.index_len,
                                                    r.values_len)));
    }
    return result;
}

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
    m.def("decode_section", &decode_section, py::arg("buffer"), py::arg("offset"), py::arg("length"),
          py::arg("n_tensors"), py::arg("shuffled"), py::arg("max_output_bytes"), py::arg("fill"),
          py::arg("verify_crc"));
    m.def("crc32c", &crc32c_py, py::arg("data"), py::arg("crc") = 0);
    m.attr("FORMAT_VERSION") = kVersion;
    m.attr("HEADER_SIZE") = kHeaderSize;
}
