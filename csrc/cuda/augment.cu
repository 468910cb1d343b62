// CUDA kernel of the tensor back end's fused augmentation (math in kcd/augment.h): one
// thread per output pixel, all its channels. Params are not validated on the device: the
// Python layer draws them in range (and checks them with check=True).
#include <cuda_runtime.h>

#include "check.cuh"
#include "kcd/augment.h"
#include "kcd/ops.h"

namespace kcd {
namespace cuda {
namespace {

template <bool kBF16, bool kNHWC>
__global__ void augment_kernel(const uint8_t* __restrict__ images, AugmentGeometry g,
                               const int64_t* __restrict__ indices, const int32_t* __restrict__ params, int64_t B,
                               const float* __restrict__ scale, const float* __restrict__ shift,
                               const float* __restrict__ fill, void* __restrict__ out) {
  const int64_t oh = g.out_h, ow = g.out_w, C = g.C, per = oh * ow * C;
  const int64_t total = B * oh * ow;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / (oh * ow), yx = t % (oh * ow), y = yx / ow, x = yx % ow;
    const int32_t* p = params + 3 * b;
    const int64_t sy = p[0] + y - g.pad, sx = source_col(x, p[1], p[2] != 0, g);
    const bool in = sy >= 0 && sy < g.H && sx >= 0 && sx < g.W;
    const uint8_t* px = in ? images + ((indices[b] * g.H + sy) * g.W + sx) * C : images;
    for (int64_t c = 0; c < C; ++c) {
      const float f = in ? normalize_px(px[c], scale[c], shift[c]) : fill[c];
      const int64_t o = kNHWC ? b * per + yx * C + c : b * per + c * oh * ow + yx;
      if constexpr (kBF16) {
        static_cast<uint16_t*>(out)[o] = float_to_bf16(f);
      } else {
        static_cast<float*>(out)[o] = f;
      }
    }
  }
}

}  // namespace

void augment(const uint8_t* images, const AugmentGeometry& g, const int64_t* indices, const int32_t* params,
             int64_t B, const float* scale, const float* shift, const float* fill, void* out, bool out_bf16,
             bool nhwc_out, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned int grid = grid_for(B * g.out_h * g.out_w);
  if (out_bf16) {
    if (nhwc_out) augment_kernel<true, true><<<grid, kThreads, 0, s>>>(images, g, indices, params, B, scale, shift, fill, out);
    else augment_kernel<true, false><<<grid, kThreads, 0, s>>>(images, g, indices, params, B, scale, shift, fill, out);
  } else {
    if (nhwc_out) augment_kernel<false, true><<<grid, kThreads, 0, s>>>(images, g, indices, params, B, scale, shift, fill, out);
    else augment_kernel<false, false><<<grid, kThreads, 0, s>>>(images, g, indices, params, B, scale, shift, fill, out);
  }
  KCD_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace kcd
