// Python bindings of the CPU kernels: unpack DLPack capsules, call kcd::cpu.
// Shapes: logits [B, C], indices [B], sums [N] f64, counts [N] i32, images [N, ...] u8.
#include <pybind11/pybind11.h>

#include "kcd/augment_args.h"
#include "kcd/condense_layout.h"
#include "kcd/ops.h"
#include "kcd/pages.h"
#include "kcd/tensor.h"

namespace py = pybind11;
using kcd::Tensor;
using kcd::require;
using kcd::unwrap;

namespace {

void check_bank(const Tensor& ix, const Tensor& sums, const Tensor& counts) {
  require(ix, kDLInt, 64, 1);
  require(sums, kDLFloat, 64, 1);
  require(counts, kDLInt, 32, 1);
  if (counts.size(0) != sums.size(0)) throw std::invalid_argument("sums and counts differ in length");
}

void observe_entropy(py::capsule logits, py::capsule indices, py::capsule sums, py::capsule counts) {
  Tensor lg = unwrap(logits, "logits"), ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"),
         c = unwrap(counts, "counts");
  const kcd::FloatKind kind = kcd::float_kind(lg);
  require(lg, lg.t->dtype.code, 16 * (kind == kcd::FloatKind::kF32 ? 2 : 1), 2, true);
  check_bank(ix, s, c);
  if (ix.size(0) != lg.size(0)) throw std::invalid_argument("indices and logits differ in rows");
  py::gil_scoped_release nogil;
  kcd::cpu::observe_entropy(lg.data<void>(), kind, lg.size(0), lg.size(1), lg.row_stride(), ix.data<int64_t>(),
                            s.size(0), s.data<double>(), c.data<int32_t>());
}

void observe_kl(py::capsule student, py::capsule teacher, py::capsule indices, py::capsule sums,
                py::capsule counts, float temperature) {
  Tensor st = unwrap(student, "student_logits"), te = unwrap(teacher, "teacher_logits"),
         ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"), c = unwrap(counts, "counts");
  const kcd::FloatKind kind = kcd::float_kind(st);
  if (kcd::float_kind(te) != kind) throw py::type_error("student_logits and teacher_logits differ in dtype");
  const uint8_t bits = kind == kcd::FloatKind::kF32 ? 32 : 16;
  require(st, st.t->dtype.code, bits, 2, true);
  require(te, te.t->dtype.code, bits, 2, true);
  check_bank(ix, s, c);
  if (ix.size(0) != st.size(0) || te.size(0) != st.size(0) || te.size(1) != st.size(1)) {
    throw std::invalid_argument("student_logits, teacher_logits and indices differ in shape");
  }
  py::gil_scoped_release nogil;
  kcd::cpu::observe_kl(st.data<void>(), te.data<void>(), kind, st.size(0), st.size(1), st.row_stride(),
                       te.row_stride(), ix.data<int64_t>(), s.size(0), s.data<double>(), c.data<int32_t>(),
                       temperature);
}

// logits [B, L, V] (token rows contiguous, the [B, L] dims collapsible), mask [B, L] u8.
void observe_entropy_seq(py::capsule logits, py::capsule mask, py::capsule indices, py::capsule sums,
                         py::capsule counts) {
  Tensor lg = unwrap(logits, "logits"), mk = unwrap(mask, "mask"), ix = unwrap(indices, "indices"),
         s = unwrap(sums, "sums"), c = unwrap(counts, "counts");
  const kcd::FloatKind kind = kcd::float_kind(lg);
  require(lg, lg.t->dtype.code, kind == kcd::FloatKind::kF32 ? 32 : 16, 3);
  require(mk, kDLUInt, 8, 2);
  check_bank(ix, s, c);
  const int64_t B = lg.size(0), L = lg.size(1), V = lg.size(2);
  if (ix.size(0) != B || mk.size(0) != B || mk.size(1) != L) {
    throw std::invalid_argument("logits [B, L, V], mask [B, L] and indices [B] differ in shape");
  }
  py::gil_scoped_release nogil;
  kcd::cpu::observe_entropy_seq(lg.data<void>(), kind, B, L, V, V, mk.data<uint8_t>(), ix.data<int64_t>(), s.size(0),
                                s.data<double>(), c.data<int32_t>());
}

void observe_scores(py::capsule scores, py::capsule indices, py::capsule sums, py::capsule counts) {
  Tensor sc = unwrap(scores, "scores"), ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"),
         c = unwrap(counts, "counts");
  require(sc, kDLFloat, 64, 1);
  check_bank(ix, s, c);
  if (ix.size(0) != sc.size(0)) throw std::invalid_argument("indices and scores differ in length");
  py::gil_scoped_release nogil;
  kcd::cpu::observe_scores(sc.data<double>(), ix.data<int64_t>(), sc.size(0), s.size(0), s.data<double>(),
                           c.data<int32_t>());
}

// The arguments: kcd/augment_args.h.
void augment(py::capsule images, py::capsule indices, py::capsule params, py::capsule scale, py::capsule shift,
             py::capsule fill, py::capsule out, int64_t pad, bool nhwc_out) {
  const kcd::AugmentArgs a(images, indices, params, scale, shift, fill, out, pad, nhwc_out);
  py::gil_scoped_release nogil;
  kcd::cpu::augment(a.images.data<uint8_t>(), a.images.size(0), a.geometry, a.indices.data<int64_t>(),
                    a.params.data<int32_t>(), a.batch, a.scale.data<float>(), a.shift.data<float>(),
                    a.fill.data<float>(), a.out.data<void>(), a.bf16, nhwc_out);
}

void values(py::capsule sums, py::capsule counts, py::capsule out, double period, double alpha) {
  Tensor s = unwrap(sums, "sums"), c = unwrap(counts, "counts"), o = unwrap(out, "out");
  require(s, kDLFloat, 64, 1);
  require(c, kDLInt, 32, 1);
  require(o, kDLFloat, 64, 1);
  if (c.size(0) != s.size(0) || o.size(0) != s.size(0)) throw std::invalid_argument("sums, counts, out differ in length");
  py::gil_scoped_release nogil;
  kcd::cpu::values(s.data<double>(), c.data<int32_t>(), s.size(0), period, alpha, o.data<double>());
}

void blend(py::capsule images, py::capsule dst, py::capsule src, py::capsule eps) {
  Tensor im = unwrap(images, "images"), d = unwrap(dst, "dst"), s = unwrap(src, "src"), e = unwrap(eps, "eps");
  require(im, kDLUInt, 8, -1);
  require(d, kDLInt, 64, 1);
  require(s, kDLInt, 64, 1);
  require(e, kDLFloat, 64, 1);
  if (im.t->ndim < 1) throw std::invalid_argument("images must have a leading point dimension");
  if (s.size(0) != d.size(0) || e.size(0) != d.size(0)) throw std::invalid_argument("dst, src, eps differ in length");
  const int64_t N = im.size(0);
  const int64_t D = N == 0 ? 0 : im.numel() / N;
  py::gil_scoped_release nogil;
  kcd::cpu::blend(im.data<uint8_t>(), N, D, d.data<int64_t>(), s.data<int64_t>(), e.data<double>(), d.size(0));
}

// dst [...] u8 <- blend(dst, src [...] u8, eps), both contiguous with the same element count.
void blend_image(py::capsule dst, py::capsule src, double eps) {
  Tensor d = unwrap(dst, "dst"), s = unwrap(src, "src");
  require(d, kDLUInt, 8, -1);
  require(s, kDLUInt, 8, -1);
  if (d.numel() != s.numel()) throw std::invalid_argument("dst and src differ in size");
  py::gil_scoped_release nogil;
  kcd::cpu::blend_image(d.data<uint8_t>(), s.data<uint8_t>(), d.numel(), eps);
}

// image [H, W, C] u8 contiguous -> out [OH, OW, C] u8 contiguous (Pillow's bilinear filter).
void resize_bilinear(py::capsule image, py::capsule out) {
  Tensor im = unwrap(image, "image"), o = unwrap(out, "out");
  require(im, kDLUInt, 8, 3);
  require(o, kDLUInt, 8, 3);
  if (o.size(2) != im.size(2)) throw std::invalid_argument("image and out differ in channels");
  py::gil_scoped_release nogil;
  kcd::cpu::resize_bilinear(im.data<uint8_t>(), im.size(0), im.size(1), im.size(2), o.data<uint8_t>(), o.size(0),
                            o.size(1));
}

void condense(py::capsule values, int64_t n_keep, int64_t n_prev, int mode, double eps_m, py::capsule random_pos,
              py::capsule keep, py::capsule dropped, py::capsule dst, py::capsule src, py::capsule eps) {
  Tensor v = unwrap(values, "values"), rp = unwrap(random_pos, "random_pos"), k = unwrap(keep, "keep"),
         dr = unwrap(dropped, "dropped"), d = unwrap(dst, "dst"), s = unwrap(src, "src"), e = unwrap(eps, "eps");
  require(v, kDLFloat, 64, 1);
  for (const Tensor* t : {&rp, &k, &dr, &d, &s}) require(*t, kDLInt, 64, 1);
  require(e, kDLFloat, 64, 1);
  const auto m = static_cast<kcd::VaksMode>(mode);
  const int64_t P = kcd::vaks_pairs(n_keep, n_prev, m);
  if (k.size(0) != n_keep || dr.size(0) != n_prev - n_keep || d.size(0) != P || s.size(0) != P || e.size(0) != P ||
      (m == kcd::VaksMode::kRandom && rp.size(0) != P)) {
    throw std::invalid_argument("condense outputs have the wrong lengths");
  }
  py::gil_scoped_release nogil;
  kcd::cpu::condense(v.data<double>(), v.size(0), n_keep, n_prev, m, eps_m, rp.data<int64_t>(), k.data<int64_t>(),
                     dr.data<int64_t>(), d.data<int64_t>(), s.data<int64_t>(), e.data<double>());
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "kcd_fast CPU kernels (DLPack in, results written in place)";
  m.def("observe_entropy", &observe_entropy, "logits [B, C], indices [B] i64, sums [N] f64, counts [N] i32");
  m.def("observe_kl", &observe_kl, "student, teacher [B, C], indices [B], sums [N], counts [N], temperature");
  m.def("observe_entropy_seq", &observe_entropy_seq,
        "logits [B, L, V] contiguous, mask [B, L] u8 in {0, 1}, indices [B] i64, sums [N] f64, counts [N] i32");
  m.def("observe_scores", &observe_scores, "scores [B] f64, indices [B] i64, sums [N] f64, counts [N] i32");
  m.def("values", &values, "sums [N] f64, counts [N] i32, out [N] f64, period, alpha");
  m.def("augment", &augment, "images [N, H, W, C] u8, indices [B] i64, params [B, 3] i32 (y0, x0, flip), "
        "scale [C] f32, shift [C] f32, fill [C] f32 (padding, output values), out [B, C, oh, ow] (nhwc_out: [B, oh, ow, C]) f32/bf16, pad, nhwc_out");
  m.def("blend", &blend, "images [N, ...] u8, dst [L] i64, src [L] i64, eps [L] f64");
  m.def("blend_image", &blend_image, "dst [...] u8 (in place), src [...] u8, eps f64");
  m.def("resize_bilinear", &resize_bilinear, "image [H, W, C] u8 -> out [OH, OW, C] u8 (Pillow's bilinear)");
  m.def("condense", &condense, "values [N] f64, n_keep, n_prev, mode, eps_m, random_pos [P], keep [n_keep], "
                               "dropped [L], dst [P], src [P], eps [P]");
  m.def(
      "empty_bytes", [](int64_t nbytes) { return kcd::capsule_of(kcd::cpu::empty_bytes(nbytes)); },
      py::arg("nbytes"),
      "uninitialised uint8 [nbytes] CPU memory on huge pages where available (reused from the pages cache "
      "when a released buffer fits), as a DLPack capsule");
  m.def("cached_pages_bytes", &kcd::cpu::cached_pages_bytes, "bytes of released buffers the pages cache holds");
  m.def("pages_cache_limit", &kcd::cpu::pages_cache_limit, "the pages cache's byte limit");
  m.def(
      "set_pages_cache_limit",
      [](int64_t limit) {
        if (limit < 0) throw std::invalid_argument("limit must be >= 0, got " + std::to_string(limit));
        return kcd::cpu::set_pages_cache_limit(static_cast<size_t>(limit));
      },
      py::arg("limit"), "cap the pages cache at `limit` bytes (evicting down to it); returns the previous cap");
  m.def("empty_pages_cache", &kcd::cpu::empty_pages_cache, "unmap every cached buffer; returns the bytes released");
  m.def("cuda_condense_workspace_bytes",
        [](int64_t n, size_t cub_temp_bytes) { return kcd::condense_layout(n, cub_temp_bytes).total; },
        py::arg("n"), py::arg("cub_temp_bytes"),
        "the CUDA condensation's workspace for n points given CUB's temp bytes (kcd/condense_layout.h)");
  m.def("condense_isa", &kcd::cpu::condense_isa, "the compaction kernels condense uses: 'avx512', 'avx2' or 'generic'");
  m.def("set_condense_isa", &kcd::cpu::set_condense_isa, py::arg("name"),
        "force condense's compaction kernels: 'auto', 'generic', 'avx2' or 'avx512' (tests, benchmarks)");
  m.def(
      "last_condense_stats",
      [] {
        const kcd::cpu::CondenseStats s = kcd::cpu::last_condense_stats();
        py::dict d;
        d["members"] = s.members;
        d["passes"] = s.passes;
        d["recopied"] = s.recopied;
        return d;
      },
      "what this thread's last CPU condense did: members sorted, passes over the values, recopied");
  m.def("free_cores_team", &kcd::cpu::free_cores_team, py::arg("want"),
        "a team of at most `want` threads sized by the cores free now (what each CPU op uses)");
  m.def("openmp_enabled", &kcd::cpu::openmp_enabled);
  m.def("openmp_threads", &kcd::cpu::openmp_threads);
  m.attr("__version__") = KCD_VERSION;
}
