// FeatureExtractor and torch_version() for everything outside the LibTorch module: they load
// libgradmap_torch.so (backend.hpp) on first use. Where the module is looked for, in order:
// $GRADMAP_TORCH_MODULE; <directory of the executable>/../lib/gradmap/ (an installed gradmap);
// the executable's own directory (the build tree's src/); the build tree's path, compiled in
// (the test binaries, which live elsewhere in the build tree).
#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"
#include "gradmap/core/error.hpp"
#include "gradmap/model/features.hpp"

#ifndef GRADMAP_TORCH_MODULE
#define GRADMAP_TORCH_MODULE ""
#endif

namespace gradmap::model {
namespace {

constexpr const char* kModule = "libgradmap_torch.so";

struct Module {
  gradmap_torch_create_fn create = nullptr;
  gradmap_torch_version_fn version = nullptr;
};

std::string executable_dir() {
  std::vector<char> buf(PATH_MAX + 1, '\0');
  const ssize_t len = readlink("/proc/self/exe", buf.data(), PATH_MAX);
  if (len <= 0)
    return "";
  std::string path(buf.data(), size_t(len));
  return path.substr(0, path.rfind('/'));
}

std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("GRADMAP_TORCH_MODULE"); env && *env)
    return {env};
  const std::string dir = executable_dir();
  if (!dir.empty()) {
    c.push_back(dir + "/../lib/gradmap/" + kModule);
    c.push_back(dir + "/" + kModule);
  }
  if (*GRADMAP_TORCH_MODULE)
    c.push_back(GRADMAP_TORCH_MODULE);
  return c;
}

// Not collective. Loads the module once per process; throws gradmap::Error naming every path
// tried and the loader's message.
const Module& module() {
  static std::mutex mu;
  static Module m;
  std::lock_guard<std::mutex> lock(mu);
  if (m.create)
    return m;
  std::string tried;
  for (const auto& path : candidates()) {
    if (access(path.c_str(), F_OK) != 0) {
      tried += "\n  " + path + ": not found";
      continue;
    }
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      tried += "\n  " + path + ": " + (e ? e : "dlopen failed");
      continue;
    }
    m.create = reinterpret_cast<gradmap_torch_create_fn>(dlsym(h, "gradmap_torch_create"));
    m.version = reinterpret_cast<gradmap_torch_version_fn>(dlsym(h, "gradmap_torch_version"));
    if (m.create && m.version)
      return m;
    m = Module{};
    tried += "\n  " + path + ": lacks gradmap_torch_create / gradmap_torch_version";
  }
  throw Error(std::string("cannot load gradmap's LibTorch module ") + kModule +
              " (set GRADMAP_TORCH_MODULE to its path); tried:" + tried);
}

} // namespace

FeatureExtractor::FeatureExtractor(const ExtractorOptions& options)
    : impl_(module().create(options)) {}

FeatureExtractor::~FeatureExtractor() = default;

const std::vector<std::string>& FeatureExtractor::layer_names() const {
  return impl_->layer_names();
}

const std::vector<std::int64_t>& FeatureExtractor::layer_dims() const {
  return impl_->layer_dims();
}

void FeatureExtractor::save_weights(const std::string& path) const {
  impl_->save_weights(path);
}

std::int64_t FeatureExtractor::num_outputs() const {
  return impl_->num_outputs();
}

BatchFeatures FeatureExtractor::run(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                                    std::int64_t width, const std::int64_t* labels,
                                    const std::int64_t* indices) const {
  return impl_->run(images, n, height, width, labels, indices);
}

std::string torch_version() {
  return module().version();
}

} // namespace gradmap::model
