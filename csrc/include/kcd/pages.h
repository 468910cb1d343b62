// Large CPU results as DLPack tensors on huge-page memory (csrc/cpu/pages.cpp; the
// allocator itself, alloc_pages / free_pages and the cache's controls, is in kcd/ops.h).
#pragma once
#include <cstdint>

#include "kcd/dlpack.h"

namespace kcd {
namespace cpu {

// A uint8 [nbytes] CPU tensor on memory from alloc_pages, uninitialised; its deleter
// returns the memory to the pages cache. Throws std::invalid_argument for nbytes < 0,
// std::bad_alloc when the memory cannot be mapped.
DLManagedTensor* empty_bytes(int64_t nbytes);

}  // namespace cpu
}  // namespace kcd
