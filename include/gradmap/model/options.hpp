#pragma once
// The extraction options that choose code paths (objective, labels, pooling): parsed once from
// the command line or config (parse_* throw UsageError naming the option and its allowed
// values), written back by name() (the features.h5 attributes and the resume fingerprint keep
// the strings the user gave, in canonical form). No LibTorch here.
#include <cstdint>
#include <string>

namespace gradmap::model {

/// cross-entropy | cosine | dino | torchscript:PATH (a user objective).
struct Objective {
  enum class Kind { cross_entropy, cosine, dino, torchscript };
  Kind kind = Kind::cross_entropy;
  std::string script; ///< torchscript: the module's path
};

/// Cross-entropy targets: stimuli (/stimuli/labels), self (the model's argmax), shuffled (the
/// control: /stimuli/labels permuted across images; extract passes them as stimuli labels).
enum class Labels { stimuli, self, shuffled };

/// mean | cls | patch-mean | cls+patch-mean | grid:G (G x G average grid of a feature map).
struct Pooling {
  enum class Kind { mean, cls, patch_mean, cls_patch_mean, grid };
  Kind kind = Kind::mean;
  std::int64_t grid = 0; ///< grid: G (>= 1)
};

/// Not collective. Throw UsageError naming --objective, --labels or --pooling.
Objective parse_objective(const std::string& s);
Labels parse_labels(const std::string& s);
Pooling parse_pooling(const std::string& s);

/// The option's value as the user writes it (parse_*(name(v)) == v).
std::string name(const Objective& v);
const char* name(Labels v);
std::string name(const Pooling& v);

/// Whether the objective takes labels (cross-entropy; a TorchScript objective gets them when the
/// stimuli have them); cosine and dino compare two views of each image and use none.
inline bool uses_labels(const Objective& v) {
  return v.kind == Objective::Kind::cross_entropy || v.kind == Objective::Kind::torchscript;
}

} // namespace gradmap::model
