// Python bindings of the CUDA kernels: unpack DLPack capsules (device memory), select
// the tensors' device, enqueue on the caller's stream (an integer cudaStream_t).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kcd/augment_args.h"
#include "kcd/ops.h"
#include "kcd/tensor.h"

namespace py = pybind11;
using kcd::Tensor;
using kcd::require;
using kcd::unwrap;

namespace {

void* as_stream(uintptr_t s) { return reinterpret_cast<void*>(s); }

// All tensors on one CUDA device, made current for the op when it is not, and the caller's
// device made current again afterwards only if it was changed and the caller's device has an
// active primary context (torch's MaybeSetDevice rule): since CUDA 12 cudaSetDevice creates
// the primary context, so an unconditional restore opened ~0.5 GB of context on GPU 0 in
// every DDP rank that never set its device. Without a context there, the op's device stays
// current (torch's guards leave it the same way).
class OnDevice {
 public:
  explicit OnDevice(std::initializer_list<const Tensor*> ts) {
    const Tensor* first = *ts.begin();
    for (const Tensor* t : ts) kcd::require_device(*t, kDLCUDA, first->device_id());
    const int previous = kcd::cuda::get_device();
    if (previous != first->device_id()) {
      kcd::cuda::set_device(first->device_id());
      previous_ = previous;
    }
  }
  ~OnDevice() {
    if (previous_ >= 0) {
      try {
        if (kcd::cuda::has_primary_context(previous_)) kcd::cuda::set_device(previous_);
      } catch (...) {  // nothing sensible to do in a destructor
      }
    }
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int previous_ = -1;  // the caller's device, when the op changed it
};

void check_bank(const Tensor& ix, const Tensor& sums, const Tensor& counts, const Tensor& errors, const Tensor& scratch) {
  require(ix, kDLInt, 64, 1);
  require(sums, kDLFloat, 64, 1);
  require(counts, kDLInt, 32, 1);
  require(errors, kDLInt, 64, 1);
  require(scratch, kDLFloat, 64, 1);
  if (counts.size(0) != sums.size(0) || errors.size(0) != 2) throw std::invalid_argument("bad bank shapes");
  if (scratch.size(0) < ix.size(0)) throw std::invalid_argument("scratch must hold one float64 per row");
}

void observe_entropy(py::capsule logits, py::capsule indices, py::capsule sums, py::capsule counts,
                     py::capsule errors, py::capsule scratch, uintptr_t stream) {
  Tensor lg = unwrap(logits, "logits"), ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"),
         c = unwrap(counts, "counts"), er = unwrap(errors, "errors"), sc = unwrap(scratch, "scratch");
  const kcd::FloatKind kind = kcd::float_kind(lg);
  require(lg, lg.t->dtype.code, kind == kcd::FloatKind::kF32 ? 32 : 16, 2, true);
  check_bank(ix, s, c, er, sc);
  if (ix.size(0) != lg.size(0)) throw std::invalid_argument("indices and logits differ in rows");
  const OnDevice guard({&lg, &ix, &s, &c, &er, &sc});
  kcd::cuda::observe_entropy(lg.data<void>(), kind, lg.size(0), lg.size(1), lg.row_stride(), ix.data<int64_t>(),
                             s.size(0), s.data<double>(), c.data<int32_t>(), er.data<int64_t>(), sc.data<double>(),
                             as_stream(stream));
}

void observe_kl(py::capsule student, py::capsule teacher, py::capsule indices, py::capsule sums,
                py::capsule counts, float temperature, py::capsule errors, py::capsule scratch, uintptr_t stream,
                bool commit) {
  Tensor st = unwrap(student, "student_logits"), te = unwrap(teacher, "teacher_logits"),
         ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"), c = unwrap(counts, "counts"),
         er = unwrap(errors, "errors"), sc = unwrap(scratch, "scratch");
  const kcd::FloatKind kind = kcd::float_kind(st);
  if (kcd::float_kind(te) != kind) throw py::type_error("student_logits and teacher_logits differ in dtype");
  const uint8_t bits = kind == kcd::FloatKind::kF32 ? 32 : 16;
  require(st, st.t->dtype.code, bits, 2, true);
  require(te, te.t->dtype.code, bits, 2, true);
  check_bank(ix, s, c, er, sc);
  if (ix.size(0) != st.size(0) || te.size(0) != st.size(0) || te.size(1) != st.size(1)) {
    throw std::invalid_argument("student_logits, teacher_logits and indices differ in shape");
  }
  const OnDevice guard({&st, &te, &ix, &s, &c, &er, &sc});
  kcd::cuda::observe_kl(st.data<void>(), te.data<void>(), kind, st.size(0), st.size(1), st.row_stride(),
                        te.row_stride(), ix.data<int64_t>(), s.size(0), s.data<double>(), c.data<int32_t>(),
                        temperature, er.data<int64_t>(), sc.data<double>(), as_stream(stream), commit);
}

// scratch [B] f64 rows (NaN: skipped) into sums [N] / counts [N] at indices [B], in row order.
void accumulate_rows(py::capsule indices, py::capsule scratch, py::capsule sums, py::capsule counts,
                     uintptr_t stream) {
  Tensor ix = unwrap(indices, "indices"), sc = unwrap(scratch, "scratch"), s = unwrap(sums, "sums"),
         c = unwrap(counts, "counts");
  require(ix, kDLInt, 64, 1);
  require(sc, kDLFloat, 64, 1);
  require(s, kDLFloat, 64, 1);
  require(c, kDLInt, 32, 1);
  if (c.size(0) != s.size(0) || sc.size(0) < ix.size(0)) throw std::invalid_argument("bad bank shapes");
  const OnDevice guard({&ix, &sc, &s, &c});
  kcd::cuda::accumulate_rows(ix.data<int64_t>(), sc.data<double>(), ix.size(0), s.data<double>(), c.data<int32_t>(),
                             as_stream(stream));
}

// logits [B, L, V] contiguous, mask [B, L] u8, indices [B], sums [N], counts [N], errors [2].
void observe_entropy_seq(py::capsule logits, py::capsule mask, py::capsule indices, py::capsule sums,
                         py::capsule counts, py::capsule errors, py::capsule scratch, uintptr_t stream) {
  Tensor lg = unwrap(logits, "logits"), mk = unwrap(mask, "mask"), ix = unwrap(indices, "indices"),
         s = unwrap(sums, "sums"), c = unwrap(counts, "counts"), er = unwrap(errors, "errors"),
         sc = unwrap(scratch, "scratch");
  const kcd::FloatKind kind = kcd::float_kind(lg);
  require(lg, lg.t->dtype.code, kind == kcd::FloatKind::kF32 ? 32 : 16, 3);
  require(mk, kDLUInt, 8, 2);
  check_bank(ix, s, c, er, sc);
  const int64_t B = lg.size(0), L = lg.size(1), V = lg.size(2);
  if (ix.size(0) != B || mk.size(0) != B || mk.size(1) != L) {
    throw std::invalid_argument("logits [B, L, V], mask [B, L] and indices [B] differ in shape");
  }
  const OnDevice guard({&lg, &mk, &ix, &s, &c, &er, &sc});
  kcd::cuda::observe_entropy_seq(lg.data<void>(), kind, B, L, V, V, mk.data<uint8_t>(), ix.data<int64_t>(),
                                 s.size(0), s.data<double>(), c.data<int32_t>(), er.data<int64_t>(),
                                 sc.data<double>(), as_stream(stream));
}

void observe_scores(py::capsule scores, py::capsule indices, py::capsule sums, py::capsule counts,
                    py::capsule errors, py::capsule scratch, uintptr_t stream) {
  Tensor sc = unwrap(scores, "scores"), ix = unwrap(indices, "indices"), s = unwrap(sums, "sums"),
         c = unwrap(counts, "counts"), er = unwrap(errors, "errors"), sr = unwrap(scratch, "scratch");
  require(sc, kDLFloat, 64, 1);
  check_bank(ix, s, c, er, sr);
  if (ix.size(0) != sc.size(0)) throw std::invalid_argument("indices and scores differ in length");
  const OnDevice guard({&sc, &ix, &s, &c, &er, &sr});
  kcd::cuda::observe_scores(sc.data<double>(), ix.data<int64_t>(), sc.size(0), s.size(0), s.data<double>(),
                            c.data<int32_t>(), er.data<int64_t>(), sr.data<double>(), as_stream(stream));
}

void values(py::capsule sums, py::capsule counts, py::capsule out, double period, double alpha, uintptr_t stream) {
  Tensor s = unwrap(sums, "sums"), c = unwrap(counts, "counts"), o = unwrap(out, "out");
  require(s, kDLFloat, 64, 1);
  require(c, kDLInt, 32, 1);
  require(o, kDLFloat, 64, 1);
  if (c.size(0) != s.size(0) || o.size(0) != s.size(0)) throw std::invalid_argument("sums, counts, out differ in length");
  const OnDevice guard({&s, &c, &o});
  kcd::cuda::values(s.data<double>(), c.data<int32_t>(), s.size(0), period, alpha, o.data<double>(), as_stream(stream));
}

void augment(py::capsule images, py::capsule indices, py::capsule params, py::capsule scale, py::capsule shift,
             py::capsule fill, py::capsule out, int64_t pad, bool nhwc_out, uintptr_t stream) {
  const kcd::AugmentArgs a(images, indices, params, scale, shift, fill, out, pad, nhwc_out);
  const OnDevice guard({&a.images, &a.indices, &a.params, &a.scale, &a.shift, &a.fill, &a.out});
  kcd::cuda::augment(a.images.data<uint8_t>(), a.geometry, a.indices.data<int64_t>(), a.params.data<int32_t>(),
                     a.batch, a.scale.data<float>(), a.shift.data<float>(), a.fill.data<float>(), a.out.data<void>(),
                     a.bf16, nhwc_out, as_stream(stream));
}

void blend(py::capsule images, py::capsule dst, py::capsule src, py::capsule eps, py::capsule errors,
           uintptr_t stream) {
  Tensor im = unwrap(images, "images"), d = unwrap(dst, "dst"), s = unwrap(src, "src"), e = unwrap(eps, "eps"),
         er = unwrap(errors, "errors");
  require(er, kDLInt, 64, 1);
  if (er.size(0) != 1) throw std::invalid_argument("errors must be [1]");
  require(im, kDLUInt, 8, -1);
  require(d, kDLInt, 64, 1);
  require(s, kDLInt, 64, 1);
  require(e, kDLFloat, 64, 1);
  if (im.t->ndim < 1) throw std::invalid_argument("images must have a leading point dimension");
  if (s.size(0) != d.size(0) || e.size(0) != d.size(0)) throw std::invalid_argument("dst, src, eps differ in length");
  const OnDevice guard({&im, &d, &s, &e, &er});
  const int64_t N = im.size(0);
  const int64_t D = N == 0 ? 0 : im.numel() / N;
  kcd::cuda::blend(im.data<uint8_t>(), N, D, d.data<int64_t>(), s.data<int64_t>(), e.data<double>(), d.size(0),
                   er.data<int64_t>(), as_stream(stream));
}

void condense(py::capsule values, int64_t n_keep, int64_t n_prev, int mode, double eps_m, py::capsule random_pos,
              py::capsule workspace, py::capsule keep, py::capsule dropped, py::capsule dst, py::capsule src,
              py::capsule eps, uintptr_t stream) {
  Tensor v = unwrap(values, "values"), rp = unwrap(random_pos, "random_pos"), ws = unwrap(workspace, "workspace"),
         k = unwrap(keep, "keep"), dr = unwrap(dropped, "dropped"), d = unwrap(dst, "dst"), s = unwrap(src, "src"),
         e = unwrap(eps, "eps");
  require(v, kDLFloat, 64, 1);
  for (const Tensor* t : {&rp, &k, &dr, &d, &s}) require(*t, kDLInt, 64, 1);
  require(e, kDLFloat, 64, 1);
  require(ws, kDLUInt, 8, 1);
  const auto m = static_cast<kcd::VaksMode>(mode);
  const int64_t P = kcd::vaks_pairs(n_keep, n_prev, m);
  if (k.size(0) != n_keep || dr.size(0) != n_prev - n_keep || d.size(0) != P || s.size(0) != P || e.size(0) != P ||
      (m == kcd::VaksMode::kRandom && rp.size(0) != P)) {
    throw std::invalid_argument("condense outputs have the wrong lengths");
  }
  const OnDevice guard({&v, &rp, &ws, &k, &dr, &d, &s, &e});
  kcd::cuda::condense(v.data<double>(), v.size(0), n_keep, n_prev, m, eps_m, rp.data<int64_t>(), ws.data<void>(),
                      static_cast<size_t>(ws.size(0)), k.data<int64_t>(), dr.data<int64_t>(), d.data<int64_t>(),
                      s.data<int64_t>(), e.data<double>(), as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kcd_fast CUDA kernels (DLPack device tensors, enqueued on the given stream)";
  m.def("observe_entropy", &observe_entropy);
  m.def("observe_kl", &observe_kl, py::arg("student"), py::arg("teacher"), py::arg("indices"), py::arg("sums"),
        py::arg("counts"), py::arg("temperature"), py::arg("errors"), py::arg("scratch"), py::arg("stream"),
        py::arg("commit") = true);
  m.def("accumulate_rows", &accumulate_rows);
  m.def("observe_entropy_seq", &observe_entropy_seq);
  m.def("observe_scores", &observe_scores);
  m.def("values", &values);
  m.def("augment", &augment);
  m.def("blend", &blend);
  m.def("condense", &condense);
  m.def("condense_workspace_bytes", [](int64_t n) { return kcd::cuda::condense_workspace_bytes(n); });
  m.def("device_count", &kcd::cuda::device_count);
  m.def("has_primary_context", &kcd::cuda::has_primary_context, py::arg("device"),
        "whether the device has an active primary context (asking creates none)");
  m.def("set_variant", &kcd::cuda::set_variant, py::arg("name"), py::arg("value"),
        "opt-in kernel variants for A/B runs: 'entropy_batch' or 'blend_per_thread', 1 (default) or 4");
  m.attr("__version__") = KCD_VERSION;
  m.attr("cuda_archs") = KCD_CUDA_ARCHS;
}
