#include <gtest/gtest.h>

#include "gradmap/core/error.hpp"
#include "gradmap/mpi/partition.hpp"

using gradmap::mpi::block_of;
using gradmap::mpi::chunked_block_of;

TEST(Partition, BlocksTileTheRangeAndDifferByAtMostOne) {
  for (int parts : {1, 2, 3, 7, 16})
    for (std::int64_t n : {0, 1, 5, 16, 100, 1001}) {
      std::int64_t expect = 0, mn = n, mx = 0;
      for (int p = 0; p < parts; ++p) {
        auto b = block_of(n, parts, p);
        EXPECT_EQ(b.begin, expect);
        expect = b.end;
        mn = std::min(mn, b.size());
        mx = std::max(mx, b.size());
      }
      EXPECT_EQ(expect, n);
      EXPECT_LE(mx - mn, 1);
    }
}

TEST(Partition, ChunkedBlocksStartOnChunkBoundaries) {
  for (int parts : {1, 2, 3, 5})
    for (std::int64_t n : {0, 7, 16, 33, 600}) {
      std::int64_t expect = 0;
      for (int p = 0; p < parts; ++p) {
        auto b = chunked_block_of(n, 16, parts, p);
        EXPECT_EQ(b.begin, expect);
        if (b.size() > 0) {
          EXPECT_EQ(b.begin % 16, 0);
        }
        expect = b.end;
      }
      EXPECT_EQ(expect, n);
    }
}

TEST(Partition, RejectsBadArguments) {
  EXPECT_THROW(block_of(10, 0, 0), gradmap::Error);
  EXPECT_THROW(block_of(10, 2, 2), gradmap::Error);
  EXPECT_THROW(chunked_block_of(10, 0, 1, 0), gradmap::Error);
}
