// The pure planning steps of `gradmap encode` (encode_plan.hpp): the image split and K-fold
// folds, standardisation, the noise ceiling, the layout of the joint feature spaces and the
// memory plan. Expected values by hand (noted); run with the other MPI tests at 1, 2 and 4 ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "gradmap/core/error.hpp"
#include "gradmap/encoding/encode_plan.hpp"
#include "gradmap/io/schema.hpp"

using namespace gradmap::encoding;

namespace {

EncodeOptions kfold_options(int folds, std::uint64_t seed) {
  EncodeOptions o;
  o.brain = "brain.h5";
  o.alpha_cv = AlphaCV::kfold;
  o.folds = folds;
  o.seed = seed;
  return o;
}

// Images 0..29 shown twice except 7 (never shown); tests 3, 11, 20, 25.
void trials(std::vector<std::int64_t>& stim, std::vector<std::int64_t>& test) {
  stim.clear();
  for (int rep = 0; rep < 2; ++rep)
    for (std::int64_t i = 0; i < 30; ++i)
      if (i != 7)
        stim.push_back(i);
  test = {25, 3, 20, 11};
}

} // namespace

TEST(EncodePlan, SplitKeepsShownNonTestImagesAndDealsBalancedContiguousFolds) {
  std::vector<std::int64_t> stim, test;
  trials(stim, test);
  const ImageSplit s = split_images(stim, test, 30, kfold_options(4, 9));
  EXPECT_EQ(s.n(), 25); // 30 - 1 unshown - 4 test
  EXPECT_EQ(s.test, test);
  for (auto i : s.train) {
    EXPECT_NE(i, 7);
    EXPECT_EQ(s.is_test[size_t(i)], 0);
    EXPECT_EQ(s.count[size_t(i)], 2);
  }
  EXPECT_TRUE(std::is_sorted(s.train.begin(), s.train.end()));
  // folds of sizes 6 or 7; rows ordered by fold; fold_start delimits them
  std::vector<int> size(4, 0);
  for (auto f : s.fold)
    ++size[size_t(f)];
  for (int f = 0; f < 4; ++f) {
    EXPECT_GE(size[f], 6);
    EXPECT_LE(size[f], 7);
    EXPECT_EQ(s.fold_start[size_t(f) + 1] - s.fold_start[size_t(f)], size[f]);
    for (auto r = s.fold_start[f]; r < s.fold_start[f + 1]; ++r)
      EXPECT_EQ(s.row_fold[size_t(r)], f);
  }
  EXPECT_EQ(s.min_fold_train, 25 - *std::max_element(size.begin(), size.end()));
  // row_of inverts rows and test; each training image keeps its fold
  for (std::int64_t r = 0; r < s.n(); ++r) {
    EXPECT_EQ(s.row_of[size_t(s.rows[r])], r);
    const auto pos = std::find(s.train.begin(), s.train.end(), s.rows[r]) - s.train.begin();
    EXPECT_EQ(s.fold[size_t(pos)], s.row_fold[size_t(r)]);
  }
  for (std::int64_t r = 0; r < s.m(); ++r)
    EXPECT_EQ(s.row_of[size_t(test[r])], r);
  EXPECT_EQ(s.row_of[7], -1);
  // deterministic in the seed, and the seed matters
  EXPECT_EQ(split_images(stim, test, 30, kfold_options(4, 9)).fold, s.fold);
  EXPECT_NE(split_images(stim, test, 30, kfold_options(4, 10)).fold, s.fold);
}

TEST(EncodePlan, SplitRefusesTooFewImagesNamingTheBrainFile) {
  std::vector<std::int64_t> stim, test;
  trials(stim, test);
  EXPECT_THROW(split_images(stim, {1, 2}, 30, EncodeOptions{}), gradmap::UsageError);
  try {
    split_images(stim, test, 30, kfold_options(13, 0)); // 25 training images < 2 x 13
    FAIL() << "no error";
  } catch (const gradmap::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("brain.h5"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("13 folds"), std::string::npos);
  }
  const ImageSplit loo = split_images(stim, test, 30, EncodeOptions{});
  EXPECT_EQ(loo.rows, loo.train);
}

TEST(EncodePlan, StandardiseUsesTrainingStatisticsAndZeroesConstantColumns) {
  // 4 images x 2 columns; training rows 0, 1, 2; column 1 constant over them.
  const std::vector<float> x = {1, 5, 2, 5, 3, 5, 10, 7};
  std::vector<double> xtr, xte;
  EXPECT_EQ(standardise(x, 2, {0, 1, 2}, {3}, xtr, xte), 1);
  const double sd = std::sqrt(2.0 / 3.0); // population std of 1, 2, 3
  EXPECT_NEAR(xtr[0], -1 / sd, 1e-12);
  EXPECT_NEAR(xtr[2], 0, 1e-12);
  EXPECT_NEAR(xtr[4], 1 / sd, 1e-12);
  EXPECT_NEAR(xte[0], 8 / sd, 1e-12); // (10 - 2) / sd
  EXPECT_EQ(xtr[1], 0.0);
  EXPECT_EQ(xte[1], 0.0);
}

TEST(EncodePlan, NoiseCeilingByHand) {
  // Test images 0, 1, 2 with trials (1, 3), (4, 6), (7, 9); image 3 (training) has one trial.
  // s2n = mean of the trial variances = 2; s2t = var(1, 3, 4, 6, 7, 9; ddof 1) = 42 / 5;
  // snr^2 = (8.4 - 2) / 2 = 3.2; NC = 3.2 / (3.2 + 1/2). Split halves (1, 4, 7) and (3, 6, 9):
  // r = 1, Spearman-Brown 1.
  const std::vector<float> raw = {1, 3, 4, 6, 7, 9, 100};
  const std::vector<std::int64_t> stim = {0, 0, 1, 1, 2, 2, 3};
  std::vector<double> nc, sh;
  noise_ceiling(raw, 1, stim, {0, 1, 2}, nc, sh);
  EXPECT_NEAR(nc[0], 3.2 / 3.7, 1e-12);
  EXPECT_NEAR(sh[0], 1.0, 1e-12);
  // without repetitions there is no ceiling
  noise_ceiling({1, 4, 7}, 1, {0, 1, 2}, {0, 1, 2}, nc, sh);
  EXPECT_TRUE(std::isnan(nc[0]));
  EXPECT_TRUE(std::isnan(sh[0]));
}

TEST(EncodePlan, JointLayoutCountsEverySide) {
  gradmap::io::FeaturesInfo fi;
  fi.n = 100;
  fi.kinds = {"activations", "gradients"};
  fi.layers = {"a", "b", "c"};
  fi.dims = {10, 20, 30};
  EncodeOptions o;
  o.joint = true;
  const Layout y = make_layout(fi, o, 10, 3, 80, true);
  EXPECT_EQ(y.nq, 4); // loss + 3 gradient norms
  EXPECT_EQ(y.parts, 4);
  EXPECT_EQ(y.pa, 64);
  const auto d = y.side_dims();
  ASSERT_EQ(d.size(), size_t(2 * 3 + 4 * (1 + 3 * 3)));
  EXPECT_EQ(d[6], 64);              // R_0
  EXPECT_EQ(d[7], 10 + 4);          // R_1 = layer a + nuisance
  EXPECT_EQ(d[10], 64 + 10);        // [R_0, G_a], w = 0
  EXPECT_EQ(d.back(), 30 + 4 + 30); // [R_3, G_c]
  o.joint_activation_dims = 20;
  EXPECT_TRUE(make_layout(fi, o, 10, 3, 80, false).reduce_a);
  EXPECT_EQ(make_layout(fi, o, 10, 3, 80, false).pa, 20);
  o.joint_activation_dims = 60; // not below min(60 columns, 80 images): no reduction
  EXPECT_FALSE(make_layout(fi, o, 10, 3, 80, false).reduce_a);
  fi.kinds = {"activations"};
  EXPECT_THROW(make_layout(fi, o, 10, 3, 80, false), gradmap::UsageError);
  o.joint = false;
  EXPECT_EQ(make_layout(fi, o, 10, 3, 80, false).side_dims().size(), size_t(3));
}

// The inputs of a memory plan: both kinds with a layer per entry of dims, every one of `images`
// images shown once, the first 50 of them the test images.
struct PlanInputs {
  gradmap::io::FeaturesInfo fi;
  std::vector<std::int64_t> stim, test;
};

PlanInputs plan_inputs(std::int64_t images, const std::vector<std::int64_t>& dims) {
  PlanInputs in;
  in.fi.n = images;
  in.fi.kinds = {"activations", "gradients"};
  for (size_t l = 0; l < dims.size(); ++l)
    in.fi.layers.push_back(std::string(1, char('a' + l)));
  in.fi.dims = dims;
  for (std::int64_t i = 0; i < images; ++i)
    in.stim.push_back(i);
  for (std::int64_t i = 0; i < 50; ++i)
    in.test.push_back(i);
  return in;
}

TEST(EncodePlan, MemoryPlanCachesWhenItFitsAndRefusesBelowOneUnit) {
  const auto [fi, stim, test] = plan_inputs(400, {50, 300});
  EncodeOptions o;
  o.permutations = 100;
  o.bootstraps = 100;
  const ImageSplit s = split_images(stim, test, 400, o);
  const Layout y = make_layout(fi, o, 10, 0, s.n(), false);
  const double gib = double(1 << 30);
  const MemoryPlan big = plan_memory(y, s, o, 400, 7, 1, false, 400, 4 * gib);
  EXPECT_TRUE(big.cache);
  EXPECT_EQ(big.pmax, 300);
  EXPECT_GT(big.chunk_units, 1000);
  // a budget under twice the training side: recomputed per chunk, fewer units per round
  const MemoryPlan small =
      plan_memory(y, s, o, 400, 7, 1, false, 400, 1.99 * double(big.basis_bytes));
  EXPECT_FALSE(small.cache);
  EXPECT_LT(small.chunk_units, big.chunk_units);
  EXPECT_GE(small.chunk_units, 1);
  // ... unless the sides and a round of a kMinRounds-th of this rank's units fit together:
  // cached, at least kMinRounds rounds
  const double per_round_of_16 = double(small.per_target) * 2;
  const MemoryPlan fits =
      plan_memory(y, s, o, 400, 7, 1, false, 400,
                  small.fixed + double(big.basis_bytes) + per_round_of_16 + 1, 16);
  EXPECT_TRUE(fits.cache);
  EXPECT_EQ(fits.chunk_units, 2); // 16 units in kMinRounds = 8 rounds
  const double tight_budget = small.fixed + double(big.basis_bytes) + per_round_of_16 - 1;
  const MemoryPlan tight = plan_memory(y, s, o, 400, 7, 1, false, 400, tight_budget, 16);
  EXPECT_EQ(tight.cache, double(big.basis_bytes) <= tight_budget / 2); // only the first rule
  EXPECT_EQ(plan_memory(y, s, o, 400, 7, 1, false, 400, 4 * gib, 1000).chunk_units, 125);

  o.max_chunk = 3;
  EXPECT_EQ(plan_memory(y, s, o, 400, 7, 1, false, 400, 4 * gib).chunk_units, 3);
  try {
    plan_memory(y, s, o, 400, 7, 1, false, 400, 1000.0);
    FAIL() << "no error";
  } catch (const gradmap::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--memory-gb"), std::string::npos);
  }
  // --joint needs more for its sides
  o.joint = true;
  o.max_chunk = 0;
  const Layout yj = make_layout(fi, o, 10, 3, s.n(), false);
  EXPECT_GT(plan_memory(yj, s, o, 400, 7, 1, false, 400, 4 * gib).basis_bytes, big.basis_bytes);
}

// Sides larger than half the budget (4 layers x 1000 features, 4000 images) and many units:
// cached with more than kMinRounds rounds while a round keeps kMinRoundTargets targets (MEG:
// 281 per sensor, so 2 sensors), recomputed every round below that.
TEST(EncodePlan, MemoryPlanCachesWithMoreRoundsDownToAMinimumRound) {
  const auto [fi, stim, test] = plan_inputs(4000, {1000, 1000, 1000, 1000});
  EncodeOptions o;
  const ImageSplit s = split_images(stim, test, 4000, o);
  const Layout y = make_layout(fi, o, 10, 0, s.n(), false);
  const MemoryPlan probe = plan_memory(y, s, o, 4000, 7, 1, false, 4000, 1e12);
  const double room = probe.fixed, per = double(probe.per_target);
  for (std::int64_t per_unit : {std::int64_t(1), std::int64_t(281)}) {
    const std::int64_t min_units = per_unit == 1 ? 512 : 2;
    const double ok = room + per * double(per_unit) * (double(min_units) + 0.5);
    const double short_by_one = room + per * double(per_unit) * (double(min_units) - 0.5);
    ASSERT_GT(double(probe.basis_bytes), ok / 2) << "the first rule (half the budget) applies";
    const MemoryPlan cached =
        plan_memory(y, s, o, 4000, 7, per_unit, per_unit > 1, 4000, ok, 100000);
    EXPECT_TRUE(cached.cache) << per_unit;
    EXPECT_EQ(cached.chunk_units, min_units) << per_unit; // many rounds, sides built once
    const MemoryPlan recomputed =
        plan_memory(y, s, o, 4000, 7, per_unit, per_unit > 1, 4000, short_by_one, 100000);
    EXPECT_FALSE(recomputed.cache) << per_unit;
  }
  // MEG with the cluster null: a bit per target (of all ranks) and permutation, per kind and
  // layer (2 x 4 here), beside the sides.
  o.permutations = 1000;
  o.cluster_p = 0;
  const MemoryPlan no_clusters = plan_memory(y, s, o, 4000, 281, 281, true, 4000, 1e12, 271, 76151);
  o.cluster_p = 0.01;
  const MemoryPlan with_clusters =
      plan_memory(y, s, o, 4000, 281, 281, true, 4000, 1e12, 271, 76151);
  EXPECT_DOUBLE_EQ(with_clusters.fixed - no_clusters.fixed, 8.0 * 8 * 1190 * 1000);
}

TEST(EncodePlan, FormatBytes) {
  EXPECT_EQ(gradmap::format_bytes(0.05 * double(1 << 30)), "51.2 MiB");
  EXPECT_EQ(gradmap::format_bytes(2.5 * double(1 << 30)), "2.50 GiB");
}
