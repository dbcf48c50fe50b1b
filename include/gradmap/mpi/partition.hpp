#pragma once
// Block partitioning of [0, n) over ranks: contiguous blocks, the first n % p ranks one longer.
#include <cstdint>
#include <vector>

namespace gradmap::mpi {

struct Block {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
  bool contains(std::int64_t i) const { return i >= begin && i < end; }
};

/// Not collective. The block of [0, n) owned by `part` of `parts`.
Block block_of(std::int64_t n, int parts, int part);

/// Not collective. The block of [0, n) owned by `part` when the range is cut into chunks of
/// `chunk` elements and whole chunks are dealt out in contiguous runs. Used where results must
/// not depend on the number of ranks (each chunk is processed identically whoever owns it).
Block chunked_block_of(std::int64_t n, std::int64_t chunk, int parts, int part);

} // namespace gradmap::mpi
