// Launch constants shared by the CUDA kernels, their nvcc launchers and the NVRTC fallback
// (kcd_fast/_rtc.py reads kThreads and kWarp from here).
#pragma once

namespace kcd {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarp = 32;

}  // namespace cuda
}  // namespace kcd
