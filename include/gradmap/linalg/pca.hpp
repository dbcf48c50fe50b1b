#pragma once
// PCA by randomized SVD (Halko, Martinsson & Tropp 2011: Alg. 4.4, randomized subspace
// iteration, then Alg. 5.1, direct SVD of B = Q^T A), with the rows of the data matrix
// distributed over ranks. Only rows flagged for fitting (the training images) enter the fit;
// every row can then be transformed. Small reductions go to rank 0 and are broadcast, so all
// ranks hold bit-identical factors.
#include <mpi.h>

#include <cstdint>
#include <vector>

namespace gradmap::linalg {

struct Pca {
  std::int64_t d = 0, k = 0;
  std::vector<double> mean;            ///< [d], over the fitted rows
  std::vector<double> components;      ///< [k, d] row-major, orthonormal rows
  std::vector<double> singular_values; ///< [k] of the centred fitted rows
  std::int64_t n_fit = 0;

  /// Not collective. Scores (x - mean) components^T of n rows x [n, d] -> [n, k] (float).
  std::vector<float> transform(const float* x, std::int64_t n) const;
};

struct PcaOptions {
  std::int64_t k = 0;
  std::int64_t oversample = 10; ///< p: the sketch has k + p columns
  int power_iterations = 2;     ///< q
  std::uint64_t seed = 0;       ///< Gaussian test matrix: Philox(seed, projection, stream, row)
  std::uint32_t stream = 0;
};

/// Collective on comm. x: this rank's rows [n_local, d] row-major; fit[i] != 0 marks rows that
/// enter the fit. Component signs are fixed (largest-magnitude entry positive) so results do not
/// depend on the number of ranks. Throws if k exceeds min(fitted rows, d).
Pca fit_pca(MPI_Comm comm, const float* x, std::int64_t n_local, std::int64_t d,
            const std::vector<std::uint8_t>& fit, const PcaOptions& opt);

} // namespace gradmap::linalg
