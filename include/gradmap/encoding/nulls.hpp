#pragma once
// Permutation and bootstrap replicates of the test-set scores, computed while the test
// predictions are in memory (docs/design.md, docs/statistics.md).
//
// Permutation b pairs the prediction of test row perm_b(i) with the response of test row i:
// r_b = Pearson(pred[perm_b], y). The same permutations serve every target, layer and kind, and
// do not depend on the rank count (Philox keyed by seed and b), so that max-statistics over
// targets and group aggregates are valid joint nulls. Bootstrap b resamples the test rows with
// replacement (counts c_{b,i}, sum m) and gives the weighted Pearson r of each target.
//
// Per target the permutation p-value needs only the exceedance count #{b: r_b >= r}; what the
// statistics stage needs beyond it is reduced over targets here:
//   null_max[b]     = max over the (kind, layer)'s targets of r_b (max-statistic FWER)
//   perm_sum[g, b]  = sum over the targets of group g of r_b
//   boot_sum[g, b]  = sum over the targets of group g of the bootstrap r
//   obs_sum[g], n[g] = the same for the observed r, and the number of scored targets
// Groups are ROIs (fMRI) or time points (MEG: the sensor-mean latency curve).
#include <mpi.h>

#include <cstdint>
#include <vector>

#include "gradmap/encoding/clusters.hpp"

namespace gradmap::encoding {

struct Resamples {
  std::int64_t m = 0;
  int permutations = 0, bootstraps = 0;
  std::vector<std::uint32_t> perm;  ///< [permutations, m]
  std::vector<std::uint32_t> count; ///< [bootstraps, m]
};

/// Not collective; identical on every rank. Permutation b: Fisher-Yates from
/// Philox(seed, Stream::permutation, b); bootstrap b: m draws below(m) from
/// Philox(seed, Stream::bootstrap, b).
Resamples make_resamples(std::int64_t m, int permutations, int bootstraps, std::uint64_t seed);

struct NullAccumulator {
  int groups = 0;
  std::vector<float> null_max;  ///< [B], -inf until a target is scored
  std::vector<double> perm_sum; ///< [groups, B]
  std::vector<double> boot_sum; ///< [groups, Bb]
  std::vector<double> obs_sum;  ///< [groups]
  std::vector<std::int64_t> n;  ///< [groups]
  /// Cluster tests (MEG): bit (b, target) of `above` [B, words] is set when r_b(target) >
  /// cluster_threshold (targets in global numbering). Empty when clusters are off.
  float cluster_threshold = 0;
  std::int64_t words = 0;
  std::vector<std::uint64_t> above;
  /// clusters_over: the total number of targets when cluster tests are on, else 0.
  NullAccumulator(const Resamples& rs, int groups, std::int64_t clusters_over = 0,
                  float cluster_threshold = 0);
};

/// Not collective. pred and y: [m, t] row-major (this rank's chunk of targets, the first of which
/// is target t0 globally); group[c] in [-1, groups) (-1: in no group). Adds the chunk to acc and
/// writes exceed[c] = #{b: r_b >= r} (-1 where r is undefined: a constant prediction or
/// response). Threads over replicates (OpenMP); the result does not depend on the thread count.
/// boot_r (optional, [Bb, t]): every target's bootstrap r (NaN where undefined), for the
/// per-target peak-layer tests.
void accumulate_nulls(const Resamples& rs, const std::vector<double>& pred,
                      const std::vector<double>& y, std::int64_t t, const std::int32_t* group,
                      NullAccumulator& acc, std::int32_t* exceed, std::int64_t t0 = 0,
                      float* boot_r = nullptr);

/// Not collective; identical on every rank. `replicates` bootstrap count vectors [replicates, m]
/// for the unique-variance null: m draws below(m) from Philox(seed, bootstrap, 2^31 + b)
/// (independent of the interval resamples, which use b < 2^31).
std::vector<std::uint32_t> null_bootstrap_counts(std::int64_t m, int replicates,
                                                 std::uint64_t seed);

/// Not collective. The gradients' unique variance of a chunk (docs/statistics.md, "Unique
/// variance"); y (the test responses), e (the activation model's test residuals) and d (the
/// joint model's change to its predictions) are [m, t]. Per target with defined[c]:
///   l_i = e_i^2 - (e_i - d_i)^2 = 2 e_i d_i - d_i^2,  dR^2 = sum_i l_i / SST,
///   t = mean(l) / (sd(l) / sqrt(m)) (0 when d = 0: the activation model was kept),
/// and the bootstrap-t test of E[l] > 0 given the fitted models, over the B count vectors of
/// null_counts: t*_b = (mean_b(l) - mean(l)) / (sd_b(l) / sqrt(m)) (0 when d = 0 or sd_b = 0);
/// exceed[c] = #{b: t*_b >= t}; acc.null_max[b] = max over targets of t*_b; per group
/// acc.perm_sum[g, b] += dR^2*_b - dR^2 (the centred group null), acc.boot_sum[g, b] += dR^2*_b
/// over rs.count, acc.obs_sum[g] += dR^2. Writes stat[c] = t, dr2[c], the 95% percentile
/// interval of dR^2*_b over rs.count (NaN where d = 0) and, when boot is given ([Bb, t]),
/// dR^2*_b. Undefined targets: exceed -1, NaN. acc may be null (no replicates kept). Threads over
/// replicates; the result does not depend on the thread count.
void accumulate_unique(const Resamples& rs, const std::vector<std::uint32_t>& null_counts,
                       const std::vector<double>& y, const std::vector<double>& e,
                       const std::vector<double>& d, std::int64_t t, const std::int32_t* group,
                       const std::uint8_t* defined, NullAccumulator* acc, std::int32_t* exceed,
                       float* stat, float* dr2, float* ci_lo, float* ci_hi, float* boot);

/// Collective: max of null_max, sums of the rest, the union of the cluster bits, on every rank.
void reduce_nulls(NullAccumulator& acc, MPI_Comm comm);

/// Collective: the largest cluster of each permutation, max_cluster[b] (the permutations are
/// dealt to ranks; the result is on every rank).
std::vector<std::int64_t> null_cluster_max(const NullAccumulator& acc, const ClusterGraph& g,
                                           int permutations, MPI_Comm comm);

} // namespace gradmap::encoding
