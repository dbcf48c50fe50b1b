#pragma once
// The interface between gradmap and its LibTorch module, libgradmap_torch.so (src/model/
// features.cpp, the only code that includes LibTorch). gradmap loads the module with dlopen
// (src/model/loader.cpp) when a command first needs a network, so that LibTorch's load and
// start-up (~0.9 s of every process) are paid only by extract, simulate and run.
#include <cstdint>
#include <string>
#include <vector>

#include "gradmap/model/features.hpp"

namespace gradmap::model {

class ExtractorBackend {
public:
  virtual ~ExtractorBackend() = default;
  virtual const std::vector<std::string>& layer_names() const = 0;
  virtual const std::vector<std::int64_t>& layer_dims() const = 0;
  virtual void save_weights(const std::string& path) const = 0;
  virtual std::int64_t num_outputs() const = 0;
  virtual BatchFeatures run(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                            std::int64_t width, const std::int64_t* labels,
                            const std::int64_t* indices) const = 0;
};

} // namespace gradmap::model

// The module's entry points (C linkage: looked up with dlsym). create throws gradmap::Error on a
// bad model or options; the caller owns the result.
extern "C" {
using gradmap_torch_create_fn =
    gradmap::model::ExtractorBackend* (*)(const gradmap::model::ExtractorOptions&);
using gradmap_torch_version_fn = const char* (*)();
gradmap::model::ExtractorBackend* gradmap_torch_create(const gradmap::model::ExtractorOptions&);
const char* gradmap_torch_version();
}
