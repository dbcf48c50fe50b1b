// Per-layer activations and gradients (docs/design.md "Conventions"). The only
// translation unit that includes LibTorch; everything else sees plain buffers.
#include "gradmap/model/features.hpp"

#include "backend.hpp"

#include <torch/script.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "gradmap/core/error.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::model {
namespace {

// Built-in networks: per-layer outputs in network order and the final output (logits).
struct BuiltinNet : torch::nn::Module {
  virtual std::pair<std::vector<torch::Tensor>, torch::Tensor> run(const torch::Tensor& x) = 0;
  virtual std::vector<std::string> layer_names() const = 0;
  virtual int64_t input_size() const { return 0; } // 0: any size
};

// ------------------------------------------------------------- built-in: tinycnn, deepcnn
// A stack of 3x3 conv + ReLU stages (padding 1), global average pooling and a linear head of 10
// classes; the layers are the stages' outputs conv1..convN. Accepts any input size >= 8 pixels.
// channels[i] and strides[i] describe stage i + 1.
struct ConvStack : BuiltinNet {
  std::vector<torch::nn::Conv2d> convs;
  torch::nn::Linear head{nullptr};
  ConvStack(const std::vector<int64_t>& channels, const std::vector<int64_t>& strides) {
    int64_t in = 3;
    for (size_t i = 0; i < channels.size(); ++i) {
      convs.push_back(register_module(
          "conv" + std::to_string(i + 1),
          torch::nn::Conv2d(
              torch::nn::Conv2dOptions(in, channels[i], 3).stride(strides[i]).padding(1))));
      in = channels[i];
    }
    head = register_module("head", torch::nn::Linear(in, 10));
  }
  std::pair<std::vector<torch::Tensor>, torch::Tensor> run(const torch::Tensor& input) override {
    std::vector<torch::Tensor> out;
    torch::Tensor x = input;
    for (auto& c : convs) {
      x = torch::relu(c->forward(x));
      out.push_back(x);
    }
    return {out, head->forward(x.mean({2, 3}))};
  }
  std::vector<std::string> layer_names() const override {
    std::vector<std::string> n;
    for (size_t i = 1; i <= convs.size(); ++i)
      n.push_back("conv" + std::to_string(i));
    return n;
  }
};

// tinycnn: six stages, 16-32-32-64-64-128 channels, stride 2 at stages 2, 4, 6.
std::shared_ptr<BuiltinNet> make_tinycnn() {
  return std::make_shared<ConvStack>(std::vector<int64_t>{16, 32, 32, 64, 64, 128},
                                     std::vector<int64_t>{1, 2, 1, 2, 1, 2});
}

// deepcnn, the deeper reference network of the calibrations (12 layers, as many as small real
// models): 16 channels at stages 1-4, 32 at 5-8, 64 at 9-12, stride 2 at stages 4, 8, 12.
std::shared_ptr<BuiltinNet> make_deepcnn() {
  return std::make_shared<ConvStack>(
      std::vector<int64_t>{16, 16, 16, 16, 32, 32, 32, 32, 64, 64, 64, 64},
      std::vector<int64_t>{1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2});
}

// ----------------------------------------------------------------------- built-in: tinyvit
// Input 32x32 (images are resized), 4x4 patches -> 64 tokens + CLS, width 64, 4 pre-norm blocks
// x + Attn(LN(x)), x + MLP(LN(x)) (4 heads, MLP 2x with GELU), final LN, linear head on CLS.
// Layers: the embedded tokens and each block's output, [B, 65, 64].
struct VitBlock : torch::nn::Module {
  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  int64_t heads;
  VitBlock(int64_t dim, int64_t h) : heads(h) {
    norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
    norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    fc1 = register_module("fc1", torch::nn::Linear(dim, 2 * dim));
    fc2 = register_module("fc2", torch::nn::Linear(2 * dim, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), d = x.size(2), dh = d / heads;
    auto q = qkv->forward(norm1->forward(x)).view({b, t, 3, heads, dh}).permute({2, 0, 3, 1, 4});
    auto att =
        torch::softmax(torch::matmul(q[0], q[1].transpose(-2, -1)) / std::sqrt(double(dh)), -1);
    auto y = torch::matmul(att, q[2]).transpose(1, 2).reshape({b, t, d});
    auto h = x + proj->forward(y);
    return h + fc2->forward(torch::gelu(fc1->forward(norm2->forward(h))));
  }
};

struct TinyVit : BuiltinNet {
  static constexpr int64_t kSize = 32, kPatch = 4, kDim = 64, kDepth = 4, kHeads = 4;
  torch::nn::Conv2d embed{nullptr};
  torch::Tensor cls, pos;
  std::vector<std::shared_ptr<VitBlock>> blocks;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  TinyVit() {
    embed = register_module(
        "embed", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, kDim, kPatch).stride(kPatch)));
    cls = register_parameter("cls_token", torch::zeros({1, 1, kDim}));
    pos = register_parameter("pos_embed",
                             torch::zeros({1, (kSize / kPatch) * (kSize / kPatch) + 1, kDim}));
    for (int64_t i = 0; i < kDepth; ++i)
      blocks.push_back(register_module("block" + std::to_string(i + 1),
                                       std::make_shared<VitBlock>(kDim, kHeads)));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    head = register_module("head", torch::nn::Linear(kDim, 10));
  }
  std::pair<std::vector<torch::Tensor>, torch::Tensor> run(const torch::Tensor& x) override {
    auto t = embed->forward(x).flatten(2).transpose(1, 2);
    t = torch::cat({cls.expand({t.size(0), 1, kDim}), t}, 1) + pos;
    std::vector<torch::Tensor> out{t};
    for (auto& blk : blocks) {
      t = blk->forward(t);
      out.push_back(t);
    }
    return {out, head->forward(norm->forward(t).select(1, 0))};
  }
  std::vector<std::string> layer_names() const override {
    std::vector<std::string> n{"embed"};
    for (int64_t i = 1; i <= kDepth; ++i)
      n.push_back("block" + std::to_string(i));
    return n;
  }
  int64_t input_size() const override { return kSize; }
};

// Weights are a fixed function of the model: drawn from Philox keyed by (model seed, parameter
// index), so they are identical on every platform and rank. Weights (dim >= 2): uniform with
// bound sqrt(gain / fan_in) (gain 6: He-uniform, for ReLU nets; 3: variance-preserving, for the
// ViT); biases: PyTorch's default bound 1/sqrt(fan_in); LayerNorm: weight 1, bias 0; token and
// position embeddings: N(0, 0.02^2).
void init_deterministic(torch::nn::Module& m, std::uint64_t seed, double gain) {
  torch::NoGradGuard ng;
  std::uint32_t index = 0;
  int64_t last_fan_in = 1;
  for (auto& p : m.named_parameters()) {
    auto& t = p.value();
    const std::string& name = p.key();
    sim::Philox rng(seed, sim::Stream::weights, index++);
    auto acc = t.data_ptr<float>();
    if (name.find("norm") != std::string::npos) {
      t.fill_(name.size() >= 6 && name.compare(name.size() - 6, 6, "weight") == 0 ? 1.0 : 0.0);
      continue;
    }
    if (name.find("cls_token") != std::string::npos ||
        name.find("pos_embed") != std::string::npos) {
      for (int64_t i = 0; i < t.numel(); ++i)
        acc[i] = static_cast<float>(0.02 * rng.normal());
      continue;
    }
    const bool is_bias = t.dim() == 1;
    int64_t fan_in = 1;
    for (int64_t d = 1; d < t.dim(); ++d)
      fan_in *= t.size(d);
    if (!is_bias)
      last_fan_in = fan_in;
    else
      fan_in = last_fan_in; // a bias follows its layer's weight
    const double bound =
        is_bias ? 1.0 / std::sqrt(double(fan_in)) : std::sqrt(gain / double(fan_in));
    for (int64_t i = 0; i < t.numel(); ++i)
      acc[i] = static_cast<float>(rng.uniform(-bound, bound));
  }
}

constexpr std::uint64_t kTinyCnnSeed = 0x7469ULL; // the seed of builtin:tinycnn
constexpr std::uint64_t kTinyVitSeed = 0x7476ULL; // the seed of builtin:tinyvit
constexpr std::uint64_t kDeepCnnSeed = 0x6463ULL; // the seed of builtin:deepcnn

std::shared_ptr<BuiltinNet> make_builtin(const std::string& name) {
  std::shared_ptr<BuiltinNet> net;
  if (name == "tinycnn") {
    net = make_tinycnn();
    init_deterministic(*net, kTinyCnnSeed, 6.0);
  } else if (name == "deepcnn") {
    net = make_deepcnn();
    init_deterministic(*net, kDeepCnnSeed, 6.0);
  } else if (name == "tinyvit") {
    net = std::make_shared<TinyVit>();
    init_deterministic(*net, kTinyVitSeed, 3.0);
  } else {
    throw Error("unknown built-in model '" + name +
                "' (built-in models: tinycnn, deepcnn, tinyvit)");
  }
  return net;
}

} // namespace

// The "random weights" control: the elements of every parameter tensor permuted (Fisher-Yates
// with Philox(seed, weights, 0x40000 + tensor index)), the same on every rank and device.
void permute_parameters(const std::vector<torch::Tensor>& params, std::uint64_t seed) {
  torch::NoGradGuard ng;
  std::uint32_t index = 0;
  for (const auto& p : params) {
    sim::Philox rng(seed, sim::Stream::weights, 0x40000U + index++);
    const int64_t n = p.numel();
    std::vector<int64_t> perm(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      perm[i] = i;
    for (int64_t i = n - 1; i > 0; --i)
      std::swap(perm[i], perm[rng.below(std::uint32_t(i + 1))]);
    const auto idx = torch::from_blob(perm.data(), {n}, torch::kInt64).to(p.device());
    const auto flat = p.detach().reshape({n}).index_select(0, idx).reshape(p.sizes());
    p.detach().copy_(flat);
  }
}

struct TorchImpl {
  ExtractorOptions opt;
  torch::Device device{torch::kCPU};
  std::shared_ptr<BuiltinNet> builtin;
  std::unique_ptr<torch::jit::script::Module> script;
  std::unique_ptr<torch::jit::script::Module> objective; // user objective, torchscript:PATH
  int64_t input_size = 0;                                // 0: use images at their stored size
  std::vector<std::string> names;
  std::vector<int64_t> dims;
  int64_t outputs = 0;

  // Forward pass: per-layer outputs in network order and the final output.
  std::pair<std::vector<torch::Tensor>, torch::Tensor> forward(const torch::Tensor& x) {
    if (builtin)
      return builtin->run(x);
    auto r = script->forward({x});
    if (!r.isTuple())
      throw Error("TorchScript model " + opt.model +
                  ": forward must return Tuple[List[Tensor], Tensor] (per-layer outputs, final "
                  "output); it returned " +
                  r.tagKind());
    auto tup = r.toTuple();
    if (tup->elements().size() != 2 || !tup->elements()[0].isTensorList() ||
        !tup->elements()[1].isTensor())
      throw Error("TorchScript model " + opt.model +
                  ": forward must return Tuple[List[Tensor], Tensor] (per-layer outputs, final "
                  "output)");
    auto list = tup->elements()[0].toTensorVector();
    if (list.empty())
      throw Error("TorchScript model " + opt.model + " returned no layer outputs");
    return {list, tup->elements()[1].toTensor()};
  }

  // Pooling (docs/design.md conventions): feature maps [B, C, H, W]: `mean` over positions, or
  // `grid:G`, the average over each cell of a G x G grid (adaptive average pooling), flattened
  // channel-major to [B, C G G]; tokens [B, T, D]: `mean` over all tokens, `cls` (token 0),
  // `patch-mean` (tokens 1..T-1) or `cls+patch-mean` (both, concatenated: [B, 2D]).
  torch::Tensor pool(const torch::Tensor& h, size_t layer) const {
    using K = Pooling::Kind;
    const K p = opt.pooling.kind;
    if (h.dim() == 4) {
      if (p == K::mean)
        return h.mean({2, 3});
      if (p == K::grid)
        return torch::adaptive_avg_pool2d(h, {opt.pooling.grid, opt.pooling.grid}).flatten(1);
      throw Error("pooling '" + name(opt.pooling) + "' needs token outputs [B, T, D], but layer " +
                  names[layer] + " is a feature map [B, C, H, W]; use --pooling mean or grid:G");
    }
    if (h.dim() == 3) {
      if (p == K::mean)
        return h.mean({1});
      if (p == K::cls)
        return h.select(1, 0);
      if (p == K::patch_mean || p == K::cls_patch_mean) {
        if (h.size(1) < 2)
          throw Error("pooling " + name(opt.pooling) + " needs at least 2 tokens at layer " +
                      names[layer]);
        auto patches = h.slice(1, 1).mean({1});
        return p == K::patch_mean ? patches : torch::cat({h.select(1, 0), patches}, 1);
      }
      throw Error("pooling '" + name(opt.pooling) +
                  "' does not apply to token outputs [B, T, D] (layer " + names[layer] +
                  "); use mean, cls, patch-mean or cls+patch-mean");
    }
    if (h.dim() == 2)
      return h;
    throw Error("layer " + names[layer] + " has an output of " + std::to_string(h.dim()) +
                " dimensions; expected [B, D], [B, T, D] or [B, C, H, W]");
  }

  static torch::Tensor resize(const torch::Tensor& x, int64_t h, int64_t w) {
    namespace F = torch::nn::functional;
    return F::interpolate(x, F::InterpolateFuncOptions()
                                 .size(std::vector<int64_t>{h, w})
                                 .mode(torch::kBilinear)
                                 .align_corners(false)
                                 .antialias(true));
  }
  static torch::Tensor normalise(const torch::Tensor& x) {
    const auto mean = torch::tensor({0.485f, 0.456f, 0.406f}).view({1, 3, 1, 1});
    const auto std = torch::tensor({0.229f, 0.224f, 0.225f}).view({1, 3, 1, 1});
    return ((x - mean) / std).contiguous();
  }
  // uint8 [n, h, w, 3] -> float [n, 3, h, w] in [0, 1].
  static torch::Tensor to_unit(const std::uint8_t* images, int64_t n, int64_t h, int64_t w) {
    return torch::from_blob(const_cast<std::uint8_t*>(images), {n, h, w, 3}, torch::kUInt8)
        .permute({0, 3, 1, 2})
        .to(torch::kFloat32)
        .div(255.0);
  }
  torch::Tensor preprocess(const std::uint8_t* images, int64_t n, int64_t h, int64_t w) const {
    auto x = to_unit(images, n, h, w);
    if (input_size > 0 && (h != input_size || w != input_size))
      x = resize(x, input_size, input_size);
    return normalise(x).to(device);
  }
  // The augmented view of each image: a random resized crop (area share in [0.4, 1], aspect
  // ratio log-uniform in [3/4, 4/3]) resized to the model's input size, then a horizontal flip
  // with probability 1/2; parameters from Philox(seed, augmentation, global index, view).
  torch::Tensor augmented(const std::uint8_t* images, int64_t n, int64_t h, int64_t w,
                          const std::int64_t* indices, std::uint32_t view) const {
    const auto x = to_unit(images, n, h, w);
    const int64_t oh = input_size > 0 ? input_size : h, ow = input_size > 0 ? input_size : w;
    std::vector<torch::Tensor> views;
    for (int64_t i = 0; i < n; ++i) {
      sim::Philox rng(opt.seed, sim::Stream::augmentation, std::uint32_t(indices[i]), view);
      const double area = rng.uniform(0.4, 1.0);
      const double ratio = std::exp(rng.uniform(std::log(3.0 / 4.0), std::log(4.0 / 3.0)));
      const int64_t cw = std::clamp<int64_t>(std::llround(std::sqrt(area * ratio) * w), 1, w);
      const int64_t ch = std::clamp<int64_t>(std::llround(std::sqrt(area / ratio) * h), 1, h);
      const int64_t x0 = rng.below(std::uint32_t(w - cw + 1));
      const int64_t y0 = rng.below(std::uint32_t(h - ch + 1));
      const bool flip = rng.below(2) == 1;
      auto v = resize(x.slice(0, i, i + 1).slice(2, y0, y0 + ch).slice(3, x0, x0 + cw), oh, ow);
      views.push_back(flip ? v.flip({3}) : v);
    }
    return normalise(torch::cat(views, 0)).to(device);
  }
  // The DINO head: K fixed random prototypes, W [D, K] ~ N(0, 1/D) from Philox(seed).
  torch::Tensor prototypes;
  torch::Tensor prototype_head(int64_t d) {
    if (!prototypes.defined() || prototypes.size(0) != d) {
      sim::Philox rng(opt.seed, sim::Stream::projection, 0, 0);
      std::vector<float> w(static_cast<size_t>(d * opt.prototypes));
      for (auto& v : w)
        v = static_cast<float>(rng.normal() / std::sqrt(double(d)));
      prototypes =
          torch::from_blob(w.data(), {d, opt.prototypes}, torch::kFloat32).clone().to(device);
    }
    return prototypes;
  }
};

// The LibTorch implementation of FeatureExtractor (backend.hpp).
class TorchExtractor final : public ExtractorBackend {
public:
  explicit TorchExtractor(const ExtractorOptions& options);
  const std::vector<std::string>& layer_names() const override;
  const std::vector<std::int64_t>& layer_dims() const override;
  void save_weights(const std::string& path) const override;
  std::int64_t num_outputs() const override;
  BatchFeatures run(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                    std::int64_t width, const std::int64_t* labels,
                    const std::int64_t* indices) const override;

private:
  BatchFeatures run_batch(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                          std::int64_t width, const std::int64_t* labels,
                          const std::int64_t* indices) const;
  std::unique_ptr<TorchImpl> impl_;
};

TorchExtractor::TorchExtractor(const ExtractorOptions& options) : impl_(new TorchImpl) {
  auto& I = *impl_;
  I.opt = options;
  torch::set_num_threads(std::max(1, options.threads));
  if (options.device == "cpu") {
    I.device = torch::Device(torch::kCPU);
  } else if (options.device.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available())
      throw Error("--device " + options.device +
                  ": no CUDA device (or this gradmap's LibTorch was built without CUDA)");
    if (options.device == "cuda")
      I.device = torch::Device(
          torch::kCUDA,
          static_cast<c10::DeviceIndex>(options.local_rank % int(torch::cuda::device_count())));
    else
      I.device = torch::Device(options.device);
  } else {
    throw Error("unknown --device '" + options.device + "' (cpu or cuda)");
  }
  const std::string& m = options.model;
  if (m.rfind("builtin:", 0) == 0) {
    I.builtin = make_builtin(m.substr(8));
    if (!options.weights.empty()) {
      try {
        torch::serialize::InputArchive archive;
        archive.load_from(options.weights);
        I.builtin->load(archive);
      } catch (const c10::Error& e) {
        throw Error("cannot load weights " + options.weights + " into " + m + ": " +
                    std::string(e.what_without_backtrace()).substr(0, 300));
      }
    }
    if (options.randomize_weights)
      permute_parameters(I.builtin->parameters(), options.seed);
    I.builtin->eval();
    I.builtin->to(I.device);
    I.names = I.builtin->layer_names();
    I.input_size = I.builtin->input_size();
  } else if (m.rfind("torchscript:", 0) == 0) {
    if (!options.weights.empty())
      throw Error("--weights applies to built-in models; a TorchScript file carries its own");
    const std::string path = m.substr(12);
    try {
      I.script = std::make_unique<torch::jit::script::Module>(torch::jit::load(path, I.device));
    } catch (const c10::Error& e) {
      throw Error("cannot load TorchScript model " + path + ": " + e.what_without_backtrace());
    }
    I.script->eval();
    if (options.randomize_weights) {
      std::vector<torch::Tensor> ps;
      for (const auto& t : I.script->parameters())
        ps.push_back(t);
      permute_parameters(ps, options.seed);
    }
    if (I.script->hasattr("input_size"))
      I.input_size = I.script->attr("input_size").toInt();
    if (I.script->hasattr("layer_names"))
      for (const auto& s : I.script->attr("layer_names").toListRef())
        I.names.push_back(s.toStringRef());
  } else {
    throw Error("--model must be builtin:NAME or torchscript:PATH, not '" + m + "'");
  }
  // The option values were parsed (model/options.hpp); what remains is what parsing cannot
  // know: the user objective loads, and a caller that built the options by hand.
  if (options.objective.kind == Objective::Kind::torchscript) {
    const std::string& path = options.objective.script;
    try {
      I.objective = std::make_unique<torch::jit::script::Module>(torch::jit::load(path, I.device));
    } catch (const c10::Error& e) {
      throw Error("cannot load TorchScript objective " + path + ": " + e.what_without_backtrace());
    }
    I.objective->eval();
  }
  if (options.pooling.kind == Pooling::Kind::grid && options.pooling.grid < 1)
    throw Error("--pooling " + name(options.pooling) + ": G in grid:G must be a positive integer");
  if (options.labels == Labels::shuffled) // extract passes the permuted labels as stimuli labels
    throw Error("--labels must be 'stimuli' or 'self', not '" + std::string(name(options.labels)) +
                "'");

  // Probe pass: layer count, names and pooled dimensions.
  // It runs at the size the images will have: the model's input_size, else the stimuli's size.
  const int64_t ph = I.input_size > 0           ? I.input_size
                     : options.probe_height > 0 ? options.probe_height
                                                : 32;
  const int64_t pw = I.input_size > 0          ? I.input_size
                     : options.probe_width > 0 ? options.probe_width
                                               : 32;
  std::vector<std::uint8_t> img(static_cast<size_t>(ph * pw * 3), 128);
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> hs;
  torch::Tensor out;
  auto probe_error = [&](const std::string& what) {
    const std::string size = std::to_string(ph) + " x " + std::to_string(pw);
    return Error("model " + m + " fails on a " + size + " image (" +
                 (I.input_size > 0 ? "its input_size" : "the stimuli's size") + "). " +
                 (I.input_size > 0
                      ? ""
                      : "A model traced with torch.jit.trace accepts only the size it was traced "
                        "at and keeps no input_size attribute: add it with "
                        "`tools/export_torchscript.py wrap MODEL.pt OUT.pt --input-size N` "
                        "(gradmap then resizes every image to N), or store the stimuli at that "
                        "size. ") +
                 "PyTorch says: " + what);
  };
  try {
    std::tie(hs, out) = I.forward(I.preprocess(img.data(), 1, ph, pw));
  } catch (const c10::Error& e) {
    throw probe_error(e.what_without_backtrace());
  } catch (const std::runtime_error& e) {
    throw probe_error(e.what());
  }
  if (I.names.empty())
    for (size_t l = 0; l < hs.size(); ++l) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "layer_%02zu", l);
      I.names.emplace_back(buf);
    }
  if (I.names.size() != hs.size())
    throw Error("model " + m + " declares " + std::to_string(I.names.size()) +
                " layer_names but returns " + std::to_string(hs.size()) + " layer outputs");
  for (size_t l = 0; l < hs.size(); ++l)
    I.dims.push_back(I.pool(hs[l], l).size(1));
  I.outputs = out.size(-1);
}

void TorchExtractor::save_weights(const std::string& path) const {
  if (!impl_->builtin)
    throw Error("--save-weights applies to built-in models");
  try {
    torch::serialize::OutputArchive archive;
    impl_->builtin->save(archive);
    archive.save_to(path);
  } catch (const c10::Error& e) {
    throw Error("cannot write weights " + path + ": " + e.what_without_backtrace());
  }
}

const std::vector<std::string>& TorchExtractor::layer_names() const {
  return impl_->names;
}
const std::vector<std::int64_t>& TorchExtractor::layer_dims() const {
  return impl_->dims;
}
std::int64_t TorchExtractor::num_outputs() const {
  return impl_->outputs;
}

BatchFeatures TorchExtractor::run(const std::uint8_t* images, std::int64_t n, std::int64_t height,
                                  std::int64_t width, const std::int64_t* labels,
                                  const std::int64_t* indices) const {
  // LibTorch reports failed allocations (CPU and CUDA) as c10::Error: turn them into advice, and
  // other LibTorch errors into one line without the C++ backtrace.
  try {
    return run_batch(images, n, height, width, labels, indices);
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find("out of memory") != std::string::npos ||
        msg.find("can't allocate memory") != std::string::npos ||
        msg.find("Cannot allocate memory") != std::string::npos)
      throw Error("out of memory in a batch of " + std::to_string(n) + " images on " +
                  impl_->opt.device + ": try a smaller --batch-size (" +
                  msg.substr(0, msg.find('\n')) + ")");
    throw Error("LibTorch error in " + impl_->opt.model + ": " + msg.substr(0, msg.find('\n')));
  } catch (const std::bad_alloc&) {
    throw Error("out of memory in a batch of " + std::to_string(n) +
                " images: try a smaller --batch-size");
  }
}

BatchFeatures TorchExtractor::run_batch(const std::uint8_t* images, std::int64_t n,
                                        std::int64_t height, std::int64_t width,
                                        const std::int64_t* labels,
                                        const std::int64_t* indices) const {
  auto& I = *impl_;
  BatchFeatures bf;
  bf.n = n;
  if (n == 0) {
    bf.activations.resize(I.names.size());
    bf.gradients.resize(I.names.size());
    bf.grad_norm.resize(I.names.size());
    return bf;
  }
  // The input requires grad so that the graph reaches every layer output even when the model's
  // parameters are frozen (requires_grad = false in a TorchScript export).
  torch::Tensor x = I.preprocess(images, n, height, width).requires_grad_(true);
  auto [hs, out] = I.forward(x);
  if (hs.size() != I.names.size())
    throw Error("model returned " + std::to_string(hs.size()) + " layer outputs, expected " +
                std::to_string(I.names.size()));
  namespace F = torch::nn::functional;
  torch::Tensor per_image; // [n]: L = sum_i per_image_i
  if (I.opt.objective.kind == Objective::Kind::cross_entropy) {
    // L = sum_i CE(out_i, y_i): a sum of per-image losses, so dL/dh_l for image i depends on
    // image i only and per-image results do not depend on the batch size.
    torch::Tensor target;
    if (I.opt.labels == Labels::self) {
      target = out.detach().argmax(1);
    } else {
      if (!labels)
        throw Error("objective cross-entropy needs /stimuli/labels (or use --labels self)");
      target = torch::from_blob(const_cast<std::int64_t*>(labels), {n}, torch::kInt64).clone();
      const int64_t mx = target.max().item<int64_t>(), mn = target.min().item<int64_t>();
      if (mn < 0 || mx >= out.size(1))
        throw Error("label out of range [0, " + std::to_string(out.size(1)) + ") for this model");
      target = target.to(I.device);
    }
    per_image = F::cross_entropy(out, target, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  } else {
    if (!indices)
      throw Error("objective " + name(I.opt.objective) + " needs the images' indices");
    torch::Tensor teacher;
    {
      torch::NoGradGuard ng;
      teacher = I.forward(I.augmented(images, n, height, width, indices, 1)).second;
    }
    if (I.objective) {
      // User objective: forward(output [B, ...], teacher [B, ...], labels [B]) -> per-image
      // losses [B], summed here (a batch mean would make results depend on the batch size).
      torch::Tensor lab =
          labels ? torch::from_blob(const_cast<std::int64_t*>(labels), {n}, torch::kInt64)
                       .clone()
                       .to(I.device)
                 : out.detach().argmax(-1);
      auto r = I.objective->forward({out, teacher, lab});
      if (!r.isTensor() || r.toTensor().dim() != 1 || r.toTensor().size(0) != n)
        throw Error("TorchScript objective " + I.opt.objective.script +
                    " must return per-image losses, a Tensor of shape [B]");
      per_image = r.toTensor();
    } else {
      if (out.dim() != 2)
        throw Error("objective " + name(I.opt.objective) + " needs a final output [B, D]");
      // The heads are computed in float64 (the sharp teacher softmax amplifies rounding).
      const auto z = out.to(torch::kFloat64), zt = teacher.to(torch::kFloat64);
      if (I.opt.objective.kind == Objective::Kind::cosine) {
        per_image = 1.0 - F::cosine_similarity(z, zt, F::CosineSimilarityFuncOptions().dim(1));
      } else { // dino
        const auto W = I.prototype_head(out.size(1)).to(torch::kFloat64);
        const auto nrm = F::NormalizeFuncOptions().dim(1);
        const auto s = torch::mm(F::normalize(z, nrm), W) / 0.1;
        const auto t = torch::softmax(torch::mm(F::normalize(zt, nrm), W) / 0.04, 1);
        per_image = -(t * torch::log_softmax(s, 1)).sum(1);
      }
    }
  }
  const torch::Tensor loss = per_image.sum();
  std::vector<torch::Tensor> grads =
      torch::autograd::grad({loss}, hs, /*grad_outputs=*/{}, /*retain_graph=*/false,
                            /*create_graph=*/false, /*allow_unused=*/true);
  // A layer output outside the graph of the loss would silently give zero gradients (seen with
  // TorchScript's optimising executor in Python returning a copy of a layer output): refuse.
  for (size_t l = 0; l < grads.size(); ++l)
    if (!grads[l].defined())
      throw Error("no gradient reached layer " + I.names[l] + " of " + I.opt.model +
                  ": its output is not connected to the final output in the autograd graph");
  torch::NoGradGuard ng;
  for (size_t l = 0; l < hs.size(); ++l) {
    auto a = I.pool(hs[l].detach(), l).to(torch::kCPU, torch::kFloat32).contiguous();
    auto g = I.pool(grads[l], l).to(torch::kCPU, torch::kFloat32).contiguous();
    bf.activations.emplace_back(a.data_ptr<float>(), a.data_ptr<float>() + a.numel());
    bf.gradients.emplace_back(g.data_ptr<float>(), g.data_ptr<float>() + g.numel());
    auto gn =
        grads[l].reshape({n, -1}).to(torch::kFloat64).norm(2, 1).to(torch::kCPU, torch::kFloat32);
    gn = gn.contiguous();
    bf.grad_norm.emplace_back(gn.data_ptr<float>(), gn.data_ptr<float>() + n);
  }
  auto li = per_image.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  bf.loss.assign(li.data_ptr<float>(), li.data_ptr<float>() + n);
  return bf;
}

} // namespace gradmap::model

extern "C" {
// The module's entry points (backend.hpp), looked up by src/model/loader.cpp.
gradmap::model::ExtractorBackend*
gradmap_torch_create(const gradmap::model::ExtractorOptions& options) {
  return new gradmap::model::TorchExtractor(options);
}
const char* gradmap_torch_version() {
  return TORCH_VERSION;
}
}
