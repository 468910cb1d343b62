// Shared definitions for the CPU and CUDA sides of kcd_fast: the host/device
// qualifier and bit-exact half/bfloat16 -> float conversions. Also compiled by NVRTC (the
// run-time fallback, kcd_fast/_rtc.py), which has no standard headers: there the fixed-width
// integers, INFINITY and NAN come from the CUDA builtins instead.
#pragma once
#if defined(__CUDACC_RTC__)
using int8_t = signed char;
using uint8_t = unsigned char;
using int16_t = short;
using uint16_t = unsigned short;
using int32_t = int;
using uint32_t = unsigned int;
using int64_t = long long;
using uint64_t = unsigned long long;
using uintptr_t = unsigned long long;
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define KCD_HD __host__ __device__ __forceinline__
#else
#define KCD_HD inline
#endif

namespace kcd {

// Element types of a logits tensor (DLPack float codes, resolved at the boundary).
enum class FloatKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

KCD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, nan).
KCD_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (expo == 0) {
    // zero or subnormal: mant * 2^-24, exact in float
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (expo == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((expo + 112u) << 23) | (mant << 13));
}

// bfloat16 is the top half of a binary32.
KCD_HD float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

template <FloatKind K>
KCD_HD float load_logit(const void* base, int64_t i) {
  if constexpr (K == FloatKind::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (K == FloatKind::kF16) {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

}  // namespace kcd
