#pragma once
// The pure steps of `gradmap encode` that decide what is fitted where: the train/test/fold split
// of the images, the standardisation of a feature block, the noise ceiling, the layout of the
// feature spaces (kinds x layers, and --joint's activation models and joint designs) and the
// memory plan (which training sides are cached, how many targets a round holds). None of them is
// collective; encode.cpp runs them and the fits.
#include <cstdint>
#include <string>
#include <vector>

#include "gradmap/core/text.hpp" // format_bytes

#include "gradmap/encoding/encode.hpp"

namespace gradmap::io {
struct FeaturesInfo;
}

namespace gradmap::encoding {

/// The images of one encode run. Training images: shown in some trial and not test images, in
/// image order (train). K-fold: each training image's fold (fold, in the order of train) from a
/// seeded permutation dealt in contiguous runs, the same for every target, layer, kind and rank
/// count. Internally the training rows are ordered by fold, then image (rows, row_fold), so that
/// each fold's held-out rows are contiguous: fold_start[f] .. fold_start[f + 1]. LOO: one fold,
/// rows = train.
struct ImageSplit {
  std::vector<std::int64_t> train, test; ///< image ids (test in /brain/test_stimuli order)
  std::vector<std::int32_t> fold;        ///< K-fold: fold of each image of train (else 0)
  std::vector<std::int64_t> rows;        ///< the training rows' images, ordered by fold
  std::vector<std::int32_t> row_fold;    ///< fold of each training row
  std::vector<std::int64_t> fold_start;  ///< [folds + 1]: the rows of each fold
  std::vector<std::int64_t> row_of;      ///< image -> its row in rows or in test (-1: none)
  std::vector<std::int64_t> count;       ///< image -> its number of trials
  std::vector<std::uint8_t> is_test;     ///< image -> 1 if a test image
  std::int64_t min_fold_train = 0;       ///< K-fold: the fewest training rows of any fold
  std::int64_t n() const { return std::int64_t(train.size()); }
  std::int64_t m() const { return std::int64_t(test.size()); }
};

/// Throws UsageError naming `brain` when there are fewer than 3 training or test images, or
/// fewer than 2 training images per fold.
ImageSplit split_images(const std::vector<std::int64_t>& trial_stimulus,
                        const std::vector<std::int64_t>& test_stimuli, std::int64_t images,
                        const EncodeOptions& opt);

/// Standardises the columns of x [N, p] with the mean and population std of the training rows;
/// returns the training and test rows, and the number of columns constant over the training rows
/// (set to 0).
std::int64_t standardise(const std::vector<float>& x, std::int64_t p,
                         const std::vector<std::int64_t>& train,
                         const std::vector<std::int64_t>& test, std::vector<double>& xtr,
                         std::vector<double>& xte);

/// Noise ceiling per target from the repetitions of the test images (Allen et al. 2022, NSD's
/// ncsnr, generalised to responses that are not z-scored):
///   noise variance  s2n = mean over test images with >= 2 trials of their trial variance (ddof 1)
///   signal variance s2s = max(0, s2t - s2n), s2t the variance over all test trials (ddof 1)
///   ncsnr = sqrt(s2s / s2n);  NC = ncsnr^2 / (ncsnr^2 + mean_i 1/k_i)
/// NC is the share of variance of the trial-averaged test responses that a perfect model could
/// explain (a ceiling for R^2; sqrt(NC) for r). Split-half (MEG): per test image, the mean of
/// its first and of its second half of trials, correlated over images; Spearman-Brown
/// 2 r / (1 + r). raw: [trials, t] as stored.
void noise_ceiling(const std::vector<float>& raw, std::int64_t t,
                   const std::vector<std::int64_t>& trial_stim,
                   const std::vector<std::int64_t>& test, std::vector<double>& nc,
                   std::vector<double>& split_half);

/// The feature spaces of a run. Without --joint: every (kind, layer). --joint adds the
/// activation block A (every layer's standardised activations, layer l's columns scaled by
/// 1 / sqrt(parts p_l), so that each layer adds 1/parts to its total variance; optionally its
/// first principal components; plus the nuisance block of nq = L + 1 columns as one more part),
/// the activation models R_0 = A and R_k = [layer k - 1, nuisance] (k = 1..L), and the joint
/// designs [sqrt(w) R_k, sqrt(1 - w) G_l / sqrt(p_l)] for every k, l and band weight w.
struct Layout {
  std::int64_t K = 0, L = 0, A = 0, W = 0; ///< kinds, layers, alphas, band weights (0: no joint)
  std::int64_t ka = -1, kg = -1;           ///< the activations' and gradients' kind index
  std::vector<std::int64_t> dims;          ///< per layer
  bool joint = false, reduce_a = false, nuisance = false;
  std::int64_t pa_all = 0;    ///< columns of all layers' activations
  std::int64_t pa_layers = 0; ///< columns of A's layer part (pa_all, or the kept components)
  std::int64_t nq = 0;        ///< nuisance columns (0: none)
  std::int64_t parts = 0;     ///< L, plus 1 with the nuisance block
  std::int64_t pa = 0;        ///< columns of A = pa_layers + nq
  /// Widths of every fitted side: every (kind, layer); then R_0..R_L, then (k, l, w).
  std::vector<std::int64_t> side_dims() const;
};

/// `nuisance_present`: the features file holds /nuisance/{loss, grad_norm}. Throws UsageError
/// when --joint is asked of a file without both activations and gradients.
Layout make_layout(const io::FeaturesInfo& fi, const EncodeOptions& opt, std::int64_t alphas,
                   std::int64_t weights, std::int64_t n, bool nuisance_present);

/// K-fold fits a side of this width in the Gram form (fit_kfold_gram): K-fold with no more
/// features than the smallest fold's training rows, unless --solver dual asks for the kernel form
/// (or --solver primal asks for it always).
bool use_gram(const EncodeOptions& opt, const ImageSplit& s, std::int64_t dim);

/// How encode fits in its memory budget (bytes per rank).
struct MemoryPlan {
  std::int64_t basis_bytes = 0; ///< every training side (bases, folds) at once
  std::int64_t per_target = 0;  ///< per target (MEG: per (sensor, time))
  std::int64_t pmax = 0;        ///< widest side
  double fixed = 0;             ///< bytes that do not scale with the targets of a round
  bool cache = false;           ///< training sides kept for all rounds
  std::int64_t chunk_units = 0; ///< target units (voxels, sensors) per round, >= 1
};

/// Encode's rounds: at least this many per rank where the targets allow when the training sides
/// are cached (each round ends in a checkpoint: a kill loses at most one round).
constexpr std::int64_t kMinRounds = 8;
/// Cached sides are worth more rounds than kMinRounds down to rounds of this many targets (a
/// round's GEMMs stay large; recomputing the sides every round costs all their SVDs again).
constexpr std::int64_t kMinRoundTargets = 512;

/// `trials`: trials in the brain file; `groups`: ROIs or time points; `per_unit`: targets per
/// unit (MEG: times); `meg`: no voxel-level peaks and, with permutations and --cluster-p, the
/// cluster null's bits (one per target of all ranks, `targets`, and permutation, per kind and
/// layer); `units_here`: this rank's target units (0: unknown). The training sides are cached when
/// they take at most half the budget, or when with them a round of ceil(units_here / kMinRounds)
/// units, or of kMinRoundTargets targets if that is fewer units, still fits; cached, a round holds
/// as many units as fit, at most ceil(units_here / kMinRounds) (at least kMinRounds rounds);
/// recomputed per round, as many as fit (every round recomputes them). Throws UsageError, with the
/// sizes, when not even one unit fits in `budget` bytes.
MemoryPlan plan_memory(const Layout& lay, const ImageSplit& s, const EncodeOptions& opt,
                       std::int64_t trials, std::int64_t groups, std::int64_t per_unit, bool meg,
                       std::int64_t images, double budget, std::int64_t units_here = 0,
                       std::int64_t targets = 0);

} // namespace gradmap::encoding
