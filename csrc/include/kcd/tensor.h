// Unpacking DLPack capsules in the bindings: the C++ side re-checks what memory safety
// relies on (dtype, rank, contiguity, device); friendly messages are the Python layer's.
// And packing: a DLPack tensor made on the C++ side into a capsule.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kcd/common.h"
#include "kcd/dlpack.h"

namespace kcd {
namespace py = pybind11;

struct Tensor {
  const DLTensor* t;
  std::string name;

  int64_t size(int d) const { return t->shape[d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; ++d) n *= t->shape[d];
    return n;
  }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(t->data) + t->byte_offset);
  }
  int device_type() const { return t->device.device_type; }
  int device_id() const { return t->device.device_id; }
  // Row stride (elements) of a 2-D tensor whose rows are contiguous.
  int64_t row_stride() const { return t->strides ? t->strides[0] : t->shape[1]; }
};

inline Tensor unwrap(const py::capsule& cap, const char* name) {
  const char* cname = cap.name();
  if (cname == nullptr || std::string(cname) != "dltensor") {
    throw py::type_error(std::string(name) + " must be an unused DLPack capsule named 'dltensor', got '" +
                         (cname ? cname : "null") + "'");
  }
  auto* m = static_cast<DLManagedTensor*>(cap.get_pointer());
  return Tensor{&m->dl_tensor, name};
}

// A "dltensor" capsule that owns m: a consumer (torch.from_dlpack) renames it and takes
// over m's deleter; a capsule nobody consumed calls the deleter when it is freed.
inline py::capsule capsule_of(DLManagedTensor* m) {
  return py::capsule(m, "dltensor", [](PyObject* cap) {
    // Still named "dltensor": nobody consumed it, so it is ours to free.
    if (PyCapsule_IsValid(cap, "dltensor")) {
      auto* owned = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
      owned->deleter(owned);
    }
  });
}

inline std::string dtype_str(const DLDataType& d) {
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const char* c = d.code < 7 ? codes[d.code] : "?";
  return std::string(c) + std::to_string(d.bits);
}

// Checks dtype, rank and C-contiguity (rows may be strided when allow_row_stride).
inline void require(const Tensor& x, uint8_t code, uint8_t bits, int ndim, bool allow_row_stride = false) {
  const DLTensor* t = x.t;
  if (t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1) {
    throw py::type_error(x.name + " must be " + dtype_str(DLDataType{code, bits, 1}) + ", got " + dtype_str(t->dtype));
  }
  if (ndim >= 0 && t->ndim != ndim) {
    throw std::invalid_argument(x.name + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(t->ndim) + "-D");
  }
  if (t->strides == nullptr) return;
  for (int d = 0; d < t->ndim; ++d) {
    if (t->shape[d] == 0) return;  // empty: no element to address
  }
  int64_t expect = 1;
  for (int d = t->ndim - 1; d >= 0; --d) {
    const bool skip = t->shape[d] == 1 || (allow_row_stride && d == 0 && t->ndim == 2 && t->strides[0] >= t->shape[1]);
    if (!skip && t->strides[d] != expect) throw std::invalid_argument(x.name + " must be contiguous");
    expect *= t->shape[d];
  }
}

inline FloatKind float_kind(const Tensor& x) {
  const DLDataType d = x.t->dtype;
  if (d.code == kDLFloat && d.bits == 32) return FloatKind::kF32;
  if (d.code == kDLFloat && d.bits == 16) return FloatKind::kF16;
  if (d.code == kDLBfloat && d.bits == 16) return FloatKind::kBF16;
  throw py::type_error(x.name + " must be float32, float16 or bfloat16, got " + dtype_str(d));
}

inline void require_device(const Tensor& x, int device_type, int device_id) {
  if (x.device_type() != device_type || x.device_id() != device_id) {
    throw std::invalid_argument(x.name + " is on device (" + std::to_string(x.device_type()) + ", " +
                                std::to_string(x.device_id()) + "), expected (" + std::to_string(device_type) +
                                ", " + std::to_string(device_id) + ")");
  }
}

}  // namespace kcd
