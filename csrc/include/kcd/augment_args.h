// The augmentation op's arguments as both bindings unpack them (host only): DLPack
// capsules checked for what memory safety relies on, and the geometry they describe.
// images [N, H, W, C] u8, indices [B] i64, params [B, 3] i32, scale / shift / fill [C] f32,
// out [B, C, oh, ow] (nhwc_out: [B, oh, ow, C]) f32 or bf16, contiguous in that order.
#pragma once
#include <stdexcept>

#include "kcd/augment.h"
#include "kcd/tensor.h"

namespace kcd {

struct AugmentArgs {
  Tensor images, indices, params, scale, shift, fill, out;
  AugmentGeometry geometry;
  int64_t batch;
  bool bf16;

  AugmentArgs(const py::capsule& im, const py::capsule& ix, const py::capsule& pa, const py::capsule& sc,
              const py::capsule& sh, const py::capsule& fi, const py::capsule& o, int64_t pad, bool nhwc_out)
      : images(unwrap(im, "images")),
        indices(unwrap(ix, "indices")),
        params(unwrap(pa, "params")),
        scale(unwrap(sc, "scale")),
        shift(unwrap(sh, "shift")),
        fill(unwrap(fi, "fill")),
        out(unwrap(o, "out")) {
    require(images, kDLUInt, 8, 4);
    require(indices, kDLInt, 64, 1);
    require(params, kDLInt, 32, 2);
    for (const Tensor* t : {&scale, &shift, &fill}) require(*t, kDLFloat, 32, 1);
    bf16 = out.t->dtype.code == kDLBfloat;
    require(out, bf16 ? kDLBfloat : kDLFloat, bf16 ? 16 : 32, 4);
    geometry = AugmentGeometry{images.size(1), images.size(2), images.size(3), nhwc_out ? out.size(1) : out.size(2),
                               nhwc_out ? out.size(2) : out.size(3), pad};
    batch = indices.size(0);
    const int64_t C = geometry.C;
    if (params.size(0) != batch || params.size(1) != 3 || out.size(0) != batch ||
        (nhwc_out ? out.size(3) : out.size(1)) != C || scale.size(0) != C || shift.size(0) != C ||
        fill.size(0) != C || pad < 0 || max_origin_y(geometry) < 0 || max_origin_x(geometry) < 0) {
      throw std::invalid_argument("augment: images, indices, params, scale, shift, fill and out differ in shape");
    }
  }
};

}  // namespace kcd
