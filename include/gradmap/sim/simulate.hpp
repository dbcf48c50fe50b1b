#pragma once
// `gradmap simulate`: synthetic stimuli and fMRI / MEG responses with a planted, known answer
// (docs/design.md "Simulation"). The responses are generated from the pooled activations and
// gradients of the built-in reference network, so `gradmap extract` with the settings recorded in
// /truth reproduces the generating features.
#include <mpi.h>

#include <cstdint>
#include <string>

namespace gradmap::sim {

struct SimulateOptions {
  std::string out_dir;
  std::string scenario = "misaligned"; ///< misaligned | aligned | activations-only | null
  std::string modality = "both";       ///< fmri | meg | both
  std::uint64_t seed = 1;
  /// Seed of the trial noise only (0: the same as seed). Changing it alone keeps the stimuli, the
  /// features and the planted structure and redraws the noise (calibration over noise draws).
  std::uint64_t noise_seed = 0;
  std::uint64_t noise_seed_or_seed() const { return noise_seed ? noise_seed : seed; }
  std::int64_t images = 600;      ///< distinct stimuli
  std::int64_t test_images = 100; ///< held out (/brain/test_stimuli)
  std::int64_t image_size = 32;   ///< pixels (square)
  std::int64_t repetitions = 2;   ///< trials per image
  /// Trials per test image (0: repetitions). THINGS-MEG shows its 200 test images 12 times and
  /// its 22,248 training images once.
  std::int64_t test_repetitions = 0;
  std::int64_t test_repetitions_or_repetitions() const {
    return test_repetitions ? test_repetitions : repetitions;
  }
  std::int64_t voxels = 1400;  ///< fMRI targets
  std::int64_t sensors = 32;   ///< MEG sensors
  std::int64_t times = 36;     ///< MEG samples per epoch
  double tmin = -0.1;          ///< s, first MEG sample
  double sfreq = 50.0;         ///< Hz, MEG sampling rate
  double snr = 0.5;            ///< fMRI single-trial signal/noise variance ratio
  double meg_snr = 0.5;        ///< MEG single-trial signal/noise variance ratio at the peak
  double noise_fraction = 0.2; ///< share of targets that are pure noise
  double gradient_share = 0.5; ///< variance share of the gradient component where both drive
  /// Boundary brains for the calibration of the verdicts (scenario aligned only): the gradient
  /// layer of every voxel K layers from its activation layer (up where it can, else down), and
  /// the gradients' timing: top-down (the prediction), flat (every layer at one latency: slope 0)
  /// or gap0 (top-down, the top layer's gradient at its activation's latency: gap 0).
  int gradient_shift = 0;
  std::string gradient_timing = "top-down";
  std::string model = "builtin:tinycnn";
  int threads = 1;
  std::int64_t voxel_chunk = 512; ///< voxels generated per round (bounds memory)
  double memory_gb = 0; ///< per-rank budget of the preflight (0: 80% of the node's memory / ranks)
};

/// Not collective. Throws UsageError naming the option when a value is out of range.
void validate(const SimulateOptions& opt);

/// Collective on comm. Writes out_dir/stimuli.h5 and out_dir/brain_fmri.h5 and/or
/// out_dir/brain_meg.h5. The files are identical for any number of ranks.
void simulate(const SimulateOptions& opt, MPI_Comm comm);

} // namespace gradmap::sim
