#pragma once
// `gradmap stats` (docs/statistics.md): per-target permutation p-values, FDR (BH, BY)
// and max-statistic FWER, peak layers, and the spatial (fMRI) and temporal (MEG) hierarchy and
// divergence statistics with bootstrap CIs and p-values, from the replicates encode stored in
// scores.h5. Writes OUT/stats.h5 and OUT/summary.json.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::stats {

/// Not collective. Benjamini-Hochberg (by = false) or Benjamini-Yekutieli (by = true) adjusted
/// p-values (statsmodels' fdr_bh / fdr_by); NaN entries stay NaN and are not counted.
std::vector<double> fdr(const std::vector<double>& p, bool by);

/// Not collective. Ranks 1..n with ties given their average rank (scipy.stats.rankdata).
std::vector<double> average_ranks(const std::vector<double>& x);

/// Not collective. Spearman correlation (Pearson of average ranks); NaN when either side is
/// constant or fewer than 2 pairs.
double spearman(const std::vector<double>& x, const std::vector<double>& y);

/// Not collective. Quantile with linear interpolation between order statistics (numpy's default)
/// of the finite values; NaN if there are none.
double quantile(std::vector<double> x, double q);

struct StatsOptions {
  std::vector<std::string> scores; ///< scores.h5 files (one fMRI and/or one MEG)
  std::string out;                 ///< directory for stats.h5 and summary.json
  double q = 0.05;                 ///< FDR level for "significant"
  double alpha = 0.05;             ///< FWER level
  double ci = 0.95;                ///< confidence level of the bootstrap intervals
  double space_margin = 0.2;       ///< equivalence margin of D_space, as a share of L - 1 layers
  double time_margin = 0.0;        ///< equivalence margin of D_time (s per layer)
};

/// Not collective. Throws UsageError naming the option.
void validate(const StatsOptions& o);

/// Collective on comm (every rank computes the same numbers; files are written collectively /
/// by rank 0).
void stats(const StatsOptions& o, MPI_Comm comm);

} // namespace gradmap::stats
