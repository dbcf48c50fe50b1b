// Philox4x32-10 against Random123's known-answer vectors, and the distributions built on it.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "gradmap/sim/philox.hpp"

using namespace gradmap::sim;

TEST(Philox, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (Counter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}),
            (Counter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(
      philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
      (Counter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Philox, StreamIsAPureFunctionOfItsAddress) {
  Philox a(42, Stream::voxel, 7, 1), b(42, Stream::voxel, 7, 1), c(42, Stream::voxel, 8, 1);
  std::vector<std::uint32_t> va, vb, vc;
  for (int i = 0; i < 100; ++i) {
    va.push_back(a.next_u32());
    vb.push_back(b.next_u32());
    vc.push_back(c.next_u32());
  }
  EXPECT_EQ(va, vb);
  EXPECT_NE(va, vc);
}

TEST(Philox, UniformAndNormalMomentsAreRight) {
  Philox rng(1, Stream::fmri_noise);
  const int n = 200000;
  double su = 0, sn = 0, sn2 = 0, sn4 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = rng.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    su += u;
    const double z = rng.normal();
    sn += z;
    sn2 += z * z;
    sn4 += z * z * z * z;
  }
  EXPECT_NEAR(su / n, 0.5, 0.005);
  EXPECT_NEAR(sn / n, 0.0, 0.01);
  EXPECT_NEAR(sn2 / n, 1.0, 0.015);
  EXPECT_NEAR(sn4 / n, 3.0, 0.08); // Gaussian kurtosis
}

TEST(Philox, BelowIsUnbiasedAndInRange) {
  Philox rng(3, Stream::design);
  std::vector<int> hist(7, 0);
  const int n = 70000;
  for (int i = 0; i < n; ++i) {
    const auto k = rng.below(7);
    ASSERT_LT(k, 7u);
    ++hist[k];
  }
  for (int h : hist)
    EXPECT_NEAR(h, n / 7.0, 5 * std::sqrt(n / 7.0));
}
