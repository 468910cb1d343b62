// Private to the CPU condensation: step 3, sorting the zone members that pass 1 copied
// (condense_sort.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "condense_internal.h"

namespace kcd {
namespace cpu {
namespace condense_detail {

// The members of pass 1, packed (key << 32 | index): chunk t's len[t] members, in index
// order, start at seg[t]; base[t] = the members of the chunks before t ([T + 1]).
struct Members {
  std::vector<const uint64_t*> seg;
  std::vector<int64_t> len, base;
  int64_t count = 0;
  int chunks() const { return static_cast<int>(seg.size()); }
};

// The members in rank order (key ascending, then exact value descending, then index), in
// one of sc's buffers: [m.count], or null when there are none. v: the values.
uint64_t* sort_members(const Members& m, const double* v, Scratch* sc);

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
