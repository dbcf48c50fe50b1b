// The numerical cores of `gradmap stats` and `aggregate` (pure functions; run at 1, 2 and 4 ranks
// with the other MPI tests, where every rank must get the same numbers): BH/BY, Spearman with ties,
// the BC interval, the contrast and peak-layer p-values, the Theil-Sen slope, latencies, Fisher's
// combination and the verdict rule. Expected values computed by hand or with SciPy (noted).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "gradmap/encoding/clusters.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/stats/aggregate.hpp"
#include "gradmap/stats/divergence.hpp"
#include "gradmap/stats/stats.hpp"

using namespace gradmap::stats;

namespace {
const double kNaN = std::numeric_limits<double>::quiet_NaN();
}

TEST(StatsCore, BenjaminiHochbergAndYekutieli) {
  // statsmodels multipletests([0.01, 0.04, 0.03, nan, 0.2], method=fdr_bh / fdr_by) over the finite
  // 4
  const std::vector<double> p = {0.01, 0.04, 0.03, kNaN, 0.2};
  const auto bh = fdr(p, false), by = fdr(p, true);
  EXPECT_NEAR(bh[0], 0.04, 1e-15);
  EXPECT_NEAR(bh[1], 0.0533333333333333, 1e-12);
  EXPECT_NEAR(bh[2], 0.0533333333333333, 1e-12);
  EXPECT_TRUE(std::isnan(bh[3]));
  EXPECT_NEAR(bh[4], 0.2, 1e-15);
  const double c = 1 + 0.5 + 1.0 / 3 + 0.25;
  EXPECT_NEAR(by[0], 0.04 * c, 1e-12);
  EXPECT_NEAR(by[4], std::min(1.0, 0.2 * c), 1e-12);
}

TEST(StatsCore, SpearmanWithTies) {
  // scipy.stats.spearmanr([1, 2, 3, 4, 5], [1, 1, 2, 4, 3]) = 0.8720815992723809
  EXPECT_NEAR(spearman({1, 2, 3, 4, 5}, {1, 1, 2, 4, 3}), 0.8720815992723809, 1e-12);
  EXPECT_TRUE(std::isnan(spearman({1, 2, 3}, {2, 2, 2}))); // constant: undefined
}

TEST(StatsCore, BiasCorrectedIntervalContainsItsEstimate) {
  // Symmetric replicates around the estimate: z0 = 0, BC = percentile interval.
  std::vector<double> b;
  for (int i = 0; i <= 1000; ++i)
    b.push_back(i / 1000.0);
  const Interval sym = bc_interval(b, 0.5, 0.95);
  EXPECT_NEAR(sym.lo, 0.025, 1e-9);
  EXPECT_NEAR(sym.hi, 0.975, 1e-9);
  EXPECT_FALSE(sym.extended);
  // Every replicate above the estimate (the old D_time): the percentile interval would exclude
  // it; BC shifts down and, at the extreme, is extended to contain it.
  std::vector<double> above(200, 1.0);
  for (int i = 0; i < 200; ++i)
    above[i] = 1.0 + i / 100.0;
  const Interval ex = bc_interval(above, 0.5, 0.95);
  EXPECT_LE(ex.lo, 0.5);
  EXPECT_GE(ex.hi, 0.5);
  EXPECT_TRUE(ex.extended);
  // Undefined replicates widen the interval: half at each end.
  std::vector<double> with_nan = b;
  with_nan.insert(with_nan.end(), 200, kNaN);
  const Interval w = bc_interval(with_nan, 0.5, 0.95);
  EXPECT_TRUE(std::isnan(w.lo) && std::isnan(w.hi)); // 100 at -inf, 100 at +inf: infinite bounds
}

TEST(StatsCore, OneSidedClaimAndContrastPValues) {
  std::vector<double> x = {1, 2, -1, kNaN};
  EXPECT_DOUBLE_EQ(p_claim_positive(x), 3.0 / 5.0); // -1 and NaN do not support the claim
  // Wald p with the bootstrap SE: d = 2, sd(d*) = 1 -> 1 - Phi(2) = 0.022750131948179
  std::vector<double> d;
  std::mt19937 rng(3);
  std::normal_distribution<double> n01;
  for (int i = 0; i < 20000; ++i)
    d.push_back(2 + n01(rng));
  EXPECT_NEAR(p_contrast_positive(2.0, d), 0.022750131948179, 1.5e-3);
  EXPECT_NEAR(normal_quantile(0.975), 1.959963984540054, 1e-12);
}

TEST(StatsCore, PeakLayerSetsHoldTheTruePeakAndDivergeOnlyWhenSeparated) {
  // Two kinds, one ROI, 4 layers, 400 paired replicates around known profiles.
  const std::int64_t L = 4, G = 1, B = 400;
  std::vector<double> act = {0.1, 0.5, 0.2, 0.1}, grad_same = {0.05, 0.3, 0.1, 0.05},
                      grad_far = {0.05, 0.05, 0.1, 0.3};
  std::mt19937 rng(7);
  std::normal_distribution<double> noise(0, 0.02);
  auto boot_of = [&](const std::vector<double>& m) {
    std::vector<double> b(static_cast<size_t>(L * G * B));
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t r = 0; r < B; ++r)
        b[l * B + r] = m[l] + noise(rng);
    return b;
  };
  const auto ba = boot_of(act), bs = boot_of(grad_same), bf = boot_of(grad_far);
  const Profiles oa{&act, L, G, 1}, os{&grad_same, L, G, 1}, of{&grad_far, L, G, 1};
  const Profiles pa{&ba, L, G, B}, ps{&bs, L, G, B}, pf{&bf, L, G, B};
  const auto peak = peak_pvalues(oa, pa, 0);
  EXPECT_GT(peak[1], 0.05); // the true peak stays in the set
  EXPECT_LT(peak[0], 1e-6);
  // A permutation null far below the observed maxima: both kinds carry signal.
  std::vector<double> null(static_cast<size_t>(L * G * 50), 0.0);
  const Profiles pn{&null, L, G, 50};
  const std::vector<std::int64_t> n = {10};
  const auto same = space_divergence(oa, os, pa, ps, pn, pn, n, 0.6, 0.05, 0.95);
  EXPECT_EQ(same.v.verdict, "consistent");
  EXPECT_GT(same.v.p_diverges, 0.05);
  const auto far = space_divergence(oa, of, pa, pf, pn, pn, n, 0.6, 0.05, 0.95);
  EXPECT_EQ(far.v.verdict, "diverges");
  EXPECT_DOUBLE_EQ(far.v.value, 2.0); // |3 - 1|
  // No gradient signal (its observed maxima inside the null): undetermined, whatever the peaks.
  std::vector<double> high_null(static_cast<size_t>(L * G * 50), 1.0);
  const Profiles ph{&high_null, L, G, 50};
  const auto none = space_divergence(oa, of, pa, pf, pn, ph, n, 0.6, 0.05, 0.95);
  EXPECT_EQ(none.v.verdict, "undetermined");
}

TEST(StatsCore, PairTestsAndPerTargetPeakPValues) {
  // Peak-layer p-values by hand: activations' set {1}, gradients' set {1, 2} at a = 0.025.
  const std::vector<double> pa = {0.001, 1.0, 0.01, 0.0001}, pg = {0.002, 1.0, 0.3, 0.001};
  // margin 0: near pairs (l, l): max min = min(1, 1) = 1 -> p_div 1; far pairs: max over
  // |a - b| > 0 of min(pa(a), pg(b)) = min(pa(1), pg(2)) = 0.3 -> p_cons = 0.6.
  PairTests t = pair_tests(pa, pg, 0);
  EXPECT_DOUBLE_EQ(t.p_div, 1.0);
  EXPECT_DOUBLE_EQ(t.p_cons, 0.6);
  // margin 1: (1, 2) is near now; far pairs reach min(pa(2), pg(0)) = 0.002, min(pa(1), pg(3))
  // = 0.001, min(pa(3), pg(1)) = 0.0001, min(pa(0), pg(2)) = 0.001...: the largest, doubled.
  t = pair_tests(pa, pg, 1);
  double far = 0;
  for (size_t a = 0; a < 4; ++a)
    for (size_t b = 0; b < 4; ++b)
      if (std::abs(double(a) - double(b)) > 1)
        far = std::max(far, std::min(pa[a], pg[b]));
  EXPECT_DOUBLE_EQ(t.p_cons, 2 * far);
  EXPECT_DOUBLE_EQ(t.p_div, 1.0);
  // Peaks three layers apart, both sets tight: divergence at margin 1, not at margin 3.
  const std::vector<double> qa = {1.0, 1e-4, 1e-4, 1e-4}, qg = {1e-4, 1e-4, 1e-4, 1.0};
  EXPECT_NEAR(pair_tests(qa, qg, 1).p_div, 2e-4, 1e-15);
  EXPECT_DOUBLE_EQ(pair_tests(qa, qg, 3).p_div, 1.0);
  EXPECT_DOUBLE_EQ(pair_tests(qa, qg, 3).p_cons,
                   1.0); // no pair beyond 3 layers: nothing to exclude
  EXPECT_TRUE(std::isnan(pair_tests({kNaN, 1.0}, {1.0, 1.0}, 0).p_div));
  // Per target: each column of r [L, t] with its bootstrap [L, B, t] gives that column's
  // peak_pvalues; a target without a finite r gives NaN everywhere.
  const std::int64_t L = 3, B = 300, T = 2;
  std::mt19937 rng(3);
  std::normal_distribution<double> noise(0, 0.03);
  const std::vector<float> r = {0.1f, NAN, 0.4f, NAN, 0.2f, NAN};
  std::vector<float> boot(static_cast<size_t>(L * B * T));
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t c = 0; c < T; ++c)
        boot[(l * B + b) * T + c] = c == 0 ? float(r[l * T] + noise(rng)) : NAN;
  const auto p = target_peak_pvalues(r, boot, L, B, T);
  std::vector<double> obs = {0.1, 0.4, 0.2}, rep(static_cast<size_t>(L * B));
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t b = 0; b < B; ++b)
      rep[l * B + b] = boot[(l * B + b) * T];
  std::vector<double> obs_f(obs.size());
  for (size_t l = 0; l < obs.size(); ++l)
    obs_f[l] = double(float(obs[l]));
  const auto ref = peak_pvalues(Profiles{&obs_f, L, 1, 1}, Profiles{&rep, L, 1, B}, 0);
  for (std::int64_t l = 0; l < L; ++l) {
    EXPECT_NEAR(p[l * T], ref[l], 1e-5 * ref[l]); // summation order may differ by a rounding
    EXPECT_TRUE(std::isnan(p[l * T + 1]));
  }
  EXPECT_FLOAT_EQ(p[1 * T], 1.0f); // the observed peak
  EXPECT_LT(p[0], 1e-6);           // 0.1 vs 0.4 with sd 0.04: far outside
}

TEST(StatsCore, TheilSenSlopeAndLatencies) {
  // scipy.stats.theilslopes([0.3, 0.25, 0.9, 0.15, 0.1], range(5))[0] = -0.05 (one outlier)
  EXPECT_NEAR(layer_slope({0.3, 0.25, 0.9, 0.15, 0.1}), -0.05, 1e-12);
  EXPECT_TRUE(std::isnan(layer_slope({kNaN, 0.2})));
  // Latency curves [2 layers, 5 times]; the baseline (t <= 0) peak is ignored.
  const std::vector<double> times = {-0.1, 0.0, 0.1, 0.2, 0.3};
  const std::vector<double> c = {9, 0, 0.2, 0.6, 0.1, /* layer 1 */ 0, 0, 0.4, 0.3, 0.8};
  const Latencies lat = latencies(Profiles{&c, 2, 5, 1}, 0, times);
  EXPECT_DOUBLE_EQ(lat.peak[0], 0.2);
  EXPECT_DOUBLE_EQ(lat.onset[0], 0.2); // 0.2 < 0.6 / 2 at t = 0.1
  EXPECT_DOUBLE_EQ(lat.peak[1], 0.3);
  EXPECT_DOUBLE_EQ(lat.onset[1], 0.1); // 0.4 >= 0.8 / 2
}

TEST(StatsCore, FisherCombinationAndVerdictRule) {
  // scipy.stats.combine_pvalues([0.2, 0.04, 0.5, 0.3], method="fisher")[1] = 0.0972496313158357
  EXPECT_NEAR(fisher_combined_p({0.2, 0.04, 0.5, 0.3}), 0.0972496313158357, 1e-12);
  EXPECT_DOUBLE_EQ(fisher_combined_p({0.2, kNaN}), 1.0);
  Verdict v;
  v.p_signal_activations = v.p_signal_gradients = 0.001;
  v.p_diverges = 0.01;
  v.p_consistent = 0.5;
  decide(v, 0.05);
  EXPECT_EQ(v.verdict, "diverges");
  v.p_consistent = 0.01; // both: a difference inside the margin
  decide(v, 0.05);
  EXPECT_EQ(v.verdict, "consistent");
  v.p_signal_gradients = 0.2; // no gradient signal: never diverges
  decide(v, 0.05);
  EXPECT_EQ(v.verdict, "undetermined");
}

TEST(StatsCore, EveryRankComputesTheSameVerdict) {
  // The stats stage computes on every rank; a rank-dependent path would show here.
  Verdict v;
  v.p_signal_activations = v.p_signal_gradients = 0.001;
  v.p_diverges = 0.02;
  v.p_consistent = 0.7;
  decide(v, 0.05);
  int mine = v.verdict == "diverges" ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(all, gradmap::mpi::size(MPI_COMM_WORLD));
}

TEST(StatsCore, ClustersOnTheSensorTimeGrid) {
  using gradmap::encoding::ClusterGraph;
  using gradmap::encoding::find_clusters;
  // 3 sensors x 5 times, sensor-major; supra-threshold targets marked 1.
  const std::vector<int> above = {1, 1, 0, 0, 1,  // sensor 0
                                  0, 1, 0, 1, 1,  // sensor 1
                                  0, 0, 0, 1, 0}; // sensor 2
  auto is_above = [&](std::int64_t v) { return above[v] == 1; };
  ClusterGraph time_only{3, 5, {}};
  std::vector<std::int32_t> labels;
  const auto t_sizes = find_clusters(time_only, is_above, &labels);
  EXPECT_EQ(t_sizes, (std::vector<std::int64_t>{2, 1, 1, 2, 1})); // runs along time per sensor
  EXPECT_EQ(labels[0], labels[1]);
  EXPECT_EQ(labels[2], -1);
  ClusterGraph chain{3, 5, {{1}, {0, 2}, {1}}}; // sensors 0 - 1 - 2
  const auto c_sizes = find_clusters(chain, is_above);
  // {0:0, 0:1, 1:1} and {0:4, 1:3, 1:4, 2:3}
  EXPECT_EQ(c_sizes, (std::vector<std::int64_t>{3, 4}));
  // The threshold: one-sided t p = 0.01 with 98 degrees of freedom (scipy.stats.t.isf(0.01, 98)
  // = 2.36500241...), r = t / sqrt(98 + t^2).
  const double t = 2.3650024101176554;
  EXPECT_NEAR(gradmap::encoding::cluster_threshold(100, 0.01), t / std::sqrt(98 + t * t), 1e-9);
}
