// Parsing and naming of the extraction options (include/gradmap/model/options.hpp).
#include "gradmap/model/options.hpp"

#include <algorithm>
#include <cctype>

#include "gradmap/core/error.hpp"

namespace gradmap::model {
namespace {
constexpr const char* kTorchscript = "torchscript:";
constexpr const char* kGrid = "grid:";

bool starts_with(const std::string& s, const char* prefix) {
  return s.rfind(prefix, 0) == 0;
}
} // namespace

Objective parse_objective(const std::string& s) {
  Objective v;
  if (s == "cross-entropy")
    v.kind = Objective::Kind::cross_entropy;
  else if (s == "cosine")
    v.kind = Objective::Kind::cosine;
  else if (s == "dino")
    v.kind = Objective::Kind::dino;
  else if (starts_with(s, kTorchscript) && s.size() > std::string(kTorchscript).size())
    v = {Objective::Kind::torchscript, s.substr(std::string(kTorchscript).size())};
  else
    throw UsageError("--objective: must be cross-entropy, cosine, dino or torchscript:PATH, not '" +
                     s + "'");
  return v;
}

Labels parse_labels(const std::string& s) {
  if (s == "stimuli")
    return Labels::stimuli;
  if (s == "self")
    return Labels::self;
  if (s == "shuffled")
    return Labels::shuffled;
  throw UsageError("--labels: must be 'stimuli', 'self' or 'shuffled', not '" + s + "'");
}

Pooling parse_pooling(const std::string& s) {
  Pooling v;
  if (s == "mean")
    v.kind = Pooling::Kind::mean;
  else if (s == "cls")
    v.kind = Pooling::Kind::cls;
  else if (s == "patch-mean")
    v.kind = Pooling::Kind::patch_mean;
  else if (s == "cls+patch-mean")
    v.kind = Pooling::Kind::cls_patch_mean;
  else if (starts_with(s, kGrid)) {
    const std::string g = s.substr(std::string(kGrid).size());
    const bool digits =
        !g.empty() && g.size() <= 9 &&
        std::all_of(g.begin(), g.end(), [](unsigned char c) { return std::isdigit(c); });
    v = {Pooling::Kind::grid, digits ? std::stoll(g) : 0};
    if (v.grid < 1)
      throw UsageError("--pooling " + s + ": G in grid:G must be a positive integer");
  } else
    throw UsageError("--pooling: must be mean, cls, patch-mean, cls+patch-mean or grid:G, not '" +
                     s + "'");
  return v;
}

std::string name(const Objective& v) {
  switch (v.kind) {
  case Objective::Kind::cross_entropy: return "cross-entropy";
  case Objective::Kind::cosine: return "cosine";
  case Objective::Kind::dino: return "dino";
  case Objective::Kind::torchscript: return kTorchscript + v.script;
  }
  return "?";
}

const char* name(Labels v) {
  switch (v) {
  case Labels::stimuli: return "stimuli";
  case Labels::self: return "self";
  case Labels::shuffled: return "shuffled";
  }
  return "?";
}

std::string name(const Pooling& v) {
  switch (v.kind) {
  case Pooling::Kind::mean: return "mean";
  case Pooling::Kind::cls: return "cls";
  case Pooling::Kind::patch_mean: return "patch-mean";
  case Pooling::Kind::cls_patch_mean: return "cls+patch-mean";
  case Pooling::Kind::grid: return kGrid + std::to_string(v.grid);
  }
  return "?";
}

} // namespace gradmap::model
