#pragma once
// `gradmap extract` (docs/design.md): per-layer activations and gradients of every stimulus,
// written to features.h5. Images are dealt to ranks in blocks; each rank runs its own model copy;
// rows are written with collective parallel-HDF5 writes. Completion is recorded per block in the
// partial output, so a rerun after a kill continues where it stopped.
#include <mpi.h>

#include <cstdint>
#include <string>

#include "gradmap/model/options.hpp"

namespace gradmap::extract {

struct ExtractOptions {
  std::string stimuli;                   ///< stimuli.h5
  std::string out;                       ///< features.h5
  std::string model = "builtin:tinycnn"; ///< builtin:NAME | torchscript:PATH
  std::string weights;        ///< built-in models: weights file to load (default: built-in init)
  std::string save_weights;   ///< built-in models: write the weights used here (rank 0)
  model::Objective objective; ///< cross-entropy | cosine | dino | torchscript:PATH
  std::uint64_t seed = 0;     ///< augmentations and the DINO prototype head
  model::Labels labels = model::Labels::stimuli; ///< stimuli | self | shuffled (control)
  model::Pooling pooling;     ///< mean | cls | patch-mean | cls+patch-mean | grid:G
  std::string device = "cpu"; ///< cpu | cuda (rank r uses cuda:<node-local rank mod devices>)
  std::int64_t batch_size = 16;
  std::int64_t block = 256; ///< images per resumable block
  int threads = 1;
  int local_rank = 0;
  bool resume = true;
  bool randomize_weights = false; ///< control: parameters permuted within each tensor
  std::int64_t projection = 0;    ///< sparse random projection to K dims (0: off)
  std::int64_t pca = 0;           ///< PCA components (0: off); needs split_from
  std::string split_from; ///< brain.h5 whose /brain/test_stimuli are left out of the PCA fit
  std::int64_t pca_oversample = 10; ///< randomized SVD oversampling p
  int pca_power_iterations = 2;     ///< randomized SVD power iterations q
};

/// Not collective. Throws UsageError naming the option when a value is invalid.
void validate(const ExtractOptions& opt);

/// Collective on comm.
void extract(const ExtractOptions& opt, MPI_Comm comm);

} // namespace gradmap::extract
