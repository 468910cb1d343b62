// The CUDA condensation's workspace (cuda/condense.cu), host-only and CUDA-free so that the
// CPU module can report it too (tests/test_condense.py checks it without a GPU).
//
// Five buffers of N entries and CUB's temporary storage, each start 256-byte aligned:
//   keys   2 x [N] f64   the values as sort keys (a CUB DoubleBuffer: the sort ping-pongs
//   idx    2 x [N] i64   between the two halves instead of copying them into its temp storage)
//   flags      [N] u8    kept points, for DeviceSelect
//   nsel       [1] i64
//   temp  CUB's DoubleBuffer radix sort / DeviceSelect temp storage (histograms and look-back
//         tile states, O(N / tile) bytes; asked of CUB at run time, as it depends on the
//         device: tests/test_cuda_review.py's GPU test prints it per N and bounds it by
//         max(64 MiB, N / 8))
// so 33 N bytes + CUB's temp: N = 2^30 takes 33 GiB + CUB's share (the non-DoubleBuffer
// sort copied keys and values into its temp, 16 N more: 49 GiB in all, out of memory below
// an 80 GB card).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kcd {

struct CondenseLayout {
  size_t keys_in, keys_out, idx_in, idx_out, flags, nsel, temp, temp_bytes, total;
};

constexpr size_t kCondenseAlign = 256;
inline size_t condense_aligned(size_t b) { return (b + kCondenseAlign - 1) / kCondenseAlign * kCondenseAlign; }

// The layout for N points given CUB's temp storage bytes (the larger of the sort's and the
// select's query).
inline CondenseLayout condense_layout(int64_t N, size_t cub_temp_bytes) {
  CondenseLayout l{};
  size_t off = 0;
  const size_t n8 = condense_aligned(static_cast<size_t>(N) * 8);
  l.keys_in = off;
  off += n8;
  l.keys_out = off;
  off += n8;
  l.idx_in = off;
  off += n8;
  l.idx_out = off;
  off += n8;
  l.flags = off;
  off += condense_aligned(static_cast<size_t>(N));
  l.nsel = off;
  off += condense_aligned(8);
  l.temp = off;
  l.temp_bytes = condense_aligned(cub_temp_bytes);
  l.total = off + l.temp_bytes;
  return l;
}

}  // namespace kcd
