#pragma once
// `gradmap aggregate`: combines the stats of several subjects or models (each a `gradmap stats`
// output directory) into one table: per headline statistic the per-input values, their mean,
// a Student-t confidence interval across inputs, an exact sign-flip test of mean = 0 for the rho
// statistics, and the group divergence verdicts (Fisher's combination, intersection-union, k of
// S; docs/statistics.md); for inputs with the same layers (subjects of one model) also the mean
// ROI x layer and latency-curve tables. Writes OUT/aggregate.h5, OUT/aggregate.json,
// OUT/aggregate.csv.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::stats {

/// Not collective. Two-sided sign-flip p-value of H0: mean(x) = 0. Exact over all 2^n sign
/// vectors (identity included) for n <= 20, else (1 + #) / (B + 1) over `random_flips` Philox
/// draws keyed by `seed`. NaN values are dropped; NaN if none remain.
double sign_flip_p(const std::vector<double>& x, std::int64_t random_flips = 100000,
                   std::uint64_t seed = 0);

/// Not collective. Student-t interval mean +- t_{(1+level)/2, n-1} sd / sqrt(n) of the finite
/// values ({NaN, NaN} for fewer than 2).
std::pair<double, double> t_interval(const std::vector<double>& x, double level);

/// Not collective. Fisher's combination of independent p-values: P(chi2(2S) >= -2 sum ln p_i);
/// 1 if any p is not in [0, 1].
double fisher_combined_p(const std::vector<double>& p);

struct AggregateOptions {
  std::vector<std::string> stats;  ///< `gradmap stats` output directories
  std::vector<std::string> labels; ///< one per input (default: the directory names)
  std::string out;
  double ci = 0.95;
  double alpha = 0.05; ///< level of the group verdicts
};

/// Collective on comm.
void aggregate(const AggregateOptions& o, MPI_Comm comm);

} // namespace gradmap::stats
