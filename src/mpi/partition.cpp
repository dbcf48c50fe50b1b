#include "gradmap/mpi/partition.hpp"

#include "gradmap/core/error.hpp"

namespace gradmap::mpi {

Block block_of(std::int64_t n, int parts, int part) {
  GM_REQUIRE(parts > 0 && part >= 0 && part < parts && n >= 0, "block_of: bad arguments");
  const std::int64_t base = n / parts, extra = n % parts;
  Block b;
  b.begin = part * base + (part < extra ? part : extra);
  b.end = b.begin + base + (part < extra ? 1 : 0);
  return b;
}

Block chunked_block_of(std::int64_t n, std::int64_t chunk, int parts, int part) {
  GM_REQUIRE(chunk > 0, "chunked_block_of: chunk must be positive");
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  const Block c = block_of(chunks, parts, part);
  Block b;
  b.begin = c.begin * chunk < n ? c.begin * chunk : n;
  b.end = c.end * chunk < n ? c.end * chunk : n;
  return b;
}

} // namespace gradmap::mpi
