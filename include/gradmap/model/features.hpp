#pragma once
// Per-layer activations and gradients of a vision network, exposed as plain buffers. This header
// does not include LibTorch: the implementation (src/model/) is the only code that does.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gradmap/model/options.hpp"

namespace gradmap::model {

/// What to extract and how (docs/design.md's conventions).
struct ExtractorOptions {
  std::string model = "builtin:tinycnn"; ///< builtin:NAME or torchscript:PATH
  std::string weights;                   ///< built-in models: load these weights (torch::save)
  /// cross-entropy | cosine | dino. The self-supervised objectives compare the clean image
  /// (student, with gradient) with an augmented view of it (teacher: the same network, no
  /// gradient): cosine: L = sum_i 1 - cos(z_i, z'_i); dino: L = sum_i H(softmax((p'_i - c) /
  /// tau_t), softmax(p_i / tau_s)) with p = normalize(z) W, W a fixed random prototype head
  /// [D, K] (N(0, 1/D) from the seed), c = 0, tau_s = 0.1, tau_t = 0.04.
  Objective objective;
  std::uint64_t seed = 0;          ///< augmentations and prototype head
  std::int64_t prototypes = 256;   ///< K of the DINO head
  Labels labels = Labels::stimuli; ///< stimuli (from /stimuli/labels) or self (argmax)
  Pooling pooling;                 ///< mean | cls | patch-mean | cls+patch-mean | grid:G
  std::string device = "cpu";      ///< cpu | cuda | cuda:N ("cuda": cuda:<local_rank mod devices>)
  int threads = 1;                 ///< intra-op threads of this rank
  int local_rank = 0;              ///< this rank's index on its node (picks the GPU)
  /// Control "random weights": every parameter tensor's elements permuted at random
  /// (Philox(seed, weights, 0x40000 + tensor index)), after loading: the same per-tensor weight
  /// distribution, none of the learned structure. Buffers (BatchNorm statistics) are kept.
  bool randomize_weights = false;
  /// The stimuli's stored size: the probe pass that finds the layers' shapes runs at it when the
  /// model declares no input_size (a traced TorchScript model often accepts only the size it was
  /// traced at). 0: 32 x 32.
  std::int64_t probe_height = 0, probe_width = 0;
};

/// Features of a batch: for each layer, activations and gradients, row-major [n, dims[l]].
struct BatchFeatures {
  std::int64_t n = 0;
  std::vector<std::vector<float>> activations;
  std::vector<std::vector<float>> gradients;
  std::vector<float> loss;                   ///< [n] each image's loss (the objective's term)
  std::vector<std::vector<float>> grad_norm; ///< [layers][n] L2 norm of dL/dh_l (unpooled)
};

class ExtractorBackend; // src/model/backend.hpp

/// Runs a network forward and backward and pools per-layer outputs and their gradients.
/// Not collective: each rank owns its own extractor (its own model copy). The implementation
/// lives in the LibTorch module libgradmap_torch.so, loaded (dlopen) by the first extractor or
/// torch_version() call, so that commands without a network never load LibTorch (~0.9 s).
class FeatureExtractor {
public:
  explicit FeatureExtractor(const ExtractorOptions& options);
  ~FeatureExtractor();
  FeatureExtractor(const FeatureExtractor&) = delete;
  FeatureExtractor& operator=(const FeatureExtractor&) = delete;

  const std::vector<std::string>& layer_names() const;
  /// Pooled feature dimension of each layer (known after construction: a probe forward pass).
  const std::vector<std::int64_t>& layer_dims() const;
  /// Not collective. Writes a built-in model's weights (loadable with ExtractorOptions::weights).
  void save_weights(const std::string& path) const;
  /// Number of outputs (classes) of the final layer.
  std::int64_t num_outputs() const;

  /// Images are uint8 RGB, row-major [n, height, width, 3]; labels (n values, may be null when
  /// the objective does not need them); indices: the images' global indices (the key of their
  /// augmentations). Per-image results do not depend on n: the objective is a sum of per-image
  /// losses and the model is in eval mode.
  BatchFeatures run(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                    std::int64_t width, const std::int64_t* labels,
                    const std::int64_t* indices) const;

private:
  std::unique_ptr<ExtractorBackend> impl_;
};

/// The LibTorch version this gradmap was built with.
/// Loads the LibTorch module (see FeatureExtractor) and returns LibTorch's version.
std::string torch_version();

} // namespace gradmap::model
