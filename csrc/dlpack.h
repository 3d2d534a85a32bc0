// The part of the DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html) that hands
// a CPU tensor to torch.from_dlpack through an unversioned "dltensor" capsule: the consumer
// renames the capsule "used_dltensor" and calls `deleter` when its tensor is freed.
#pragma once
#include <cstdint>

namespace fibec::dlpack {

enum DeviceType : int32_t { kCPU = 1 };
enum TypeCode : uint8_t { kFloat = 2, kBfloat = 4 };

struct Device {
    int32_t device_type;
    int32_t device_id;
};

struct DataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};

struct Tensor {
    void* data;
    Device device;
    int32_t ndim;
    DataType dtype;
    int64_t* shape;
    int64_t* strides;  // in elements
    uint64_t byte_offset;
};

struct ManagedTensor {
    Tensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(ManagedTensor* self);
};

constexpr const char* kCapsuleName = "dltensor";
constexpr const char* kUsedCapsuleName = "used_dltensor";

}  // namespace fibec::dlpack
