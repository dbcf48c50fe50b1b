#pragma once
// `gradmap encode` (docs/design.md): for every kind, layer and target, ridge regression from the
// features to the responses with a per-target penalty chosen on the training images, scored by
// Pearson r on the test images. Targets (voxels, or sensors with all their times) are split
// over ranks; each rank reads its column block of the responses and writes its columns of the
// scores.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "gradmap/encoding/ridge.hpp"

namespace gradmap::encoding {

/// How alpha is chosen per target, and which basis of the training features is used; parsed once
/// from the command line or config (parse_* throw UsageError naming the option), written back
/// by name() (the scores.h5 attributes).
enum class AlphaCV { loo, kfold };
enum class Solver { automatic, primal, dual };
AlphaCV parse_alpha_cv(const std::string& s);
Solver parse_solver(const std::string& s);
Precision parse_precision(const std::string& s);
const char* name(AlphaCV v);
const char* name(Solver v);
const char* name(Precision v);

struct EncodeOptions {
  std::string features, brain, out;
  std::vector<double> alphas; ///< empty: the default grid 10^-1 ... 10^8 (10 values)
  AlphaCV alpha_cv = AlphaCV::loo;
  int folds = 5;                  ///< kfold: number of folds of training images
  std::uint64_t seed = 0;         ///< fold assignment, permutations and bootstrap resamples
  bool store_predictions = false; ///< also write the test predictions
  /// Memory budget per rank (GiB): targets are chunked to fit. 0: 80% of the node's memory
  /// divided by the ranks on the node (resolved by encode(), the one place of this default).
  double memory_gb = 0;
  std::int64_t max_chunk = 0; ///< at most this many target units per round (0: budget only)
  Precision precision = Precision::float32; ///< of the alpha-selection GEMMs (ridge.hpp)
  /// primal (SVD) | dual (kernel, ScaLAPACK) | automatic: dual when p > n
  Solver solver = Solver::automatic;
  int permutations = 1000;      ///< test-image permutations (0: none; see nulls.hpp)
  int bootstraps = 1000;        ///< bootstrap resamples of the test images (0: none)
  bool store_resamples = false; ///< also write the permutations and bootstrap counts
  /// MEG cluster tests: the one-sided t-test p that sets the cluster-forming r threshold
  /// (0: no cluster null; see clusters.hpp)
  double cluster_p = 0.01;
  /// Joint (banded) ridge of the activations of all layers with the gradients of each layer,
  /// and the gradients' unique variance beyond the activations (docs/statistics.md, "Unique
  /// variance"): /unique_gradients/... and /joint/activations/... in scores.h5.
  bool joint = false;
  /// The band weights w of the joint design [sqrt(w) A, sqrt(1 - w) G_l], each in (0, 1); the
  /// activations-only model (w = 1) is always a candidate. Empty: 0.2, 0.5, 0.8.
  std::vector<double> joint_weights;
  /// Principal components of the activation block kept (0: all; the block is then used as is).
  std::int64_t joint_activation_dims = 0;
  /// The features file's nuisance features (/nuisance/loss and /nuisance/grad_norm: each
  /// image's loss and per-layer gradient norms), when present, join the activation block as one
  /// more part: the reference model is then activations + nuisance.
  bool joint_nuisance = true;
  bool resume = true; ///< continue a killed run's OUT.partial when its key matches
};

/// The default band weights of the joint model: 0.2, 0.5, 0.8.
std::vector<double> default_joint_weights();

/// The default alpha grid: 10 values log-spaced from 1e-1 to 1e8.
std::vector<double> default_alphas();

/// Not collective. Throws UsageError naming the option.
void validate(const EncodeOptions& o);

/// Collective on comm.
void encode(const EncodeOptions& o, MPI_Comm comm);

} // namespace gradmap::encoding
