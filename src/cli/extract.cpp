// gradmap extract: per-layer activations and gradients -> features.h5 (extract::extract).
#include "gradmap/extract/extract.hpp"
#include "command.hpp"

namespace gradmap::cli {

Command extract_command() {
  Command c;
  c.name = "extract";
  c.usage = "--stimuli FILE --model builtin:NAME|torchscript:PATH --out FILE [options]";
  c.summary =
      "Runs the model forward and backward on every stimulus and writes, per layer, the pooled\n"
      "activations and gradients dL/dh_l (L = sum of per-image losses) to features.h5.\n"
      "Images are split over ranks; a killed run resumes from its completed blocks.\n"
      "TorchScript contract: forward(x: Tensor[B,3,H,W]) -> Tuple[List[Tensor], Tensor]\n"
      "(per-layer outputs in network order, final output); optional attributes\n"
      "layer_names: List[str] and input_size: int (see tools/export_torchscript.py).";
  c.options = [](po::options_description& d) {
    const extract::ExtractOptions def;
    d.add_options()("stimuli", po::value<std::string>()->required(), "stimuli.h5")(
        "out", po::value<std::string>()->required(),
        "features.h5 to write")("model", po::value<std::string>()->default_value(def.model),
                                "builtin:tinycnn, builtin:tinyvit or torchscript:PATH")(
        "weights", po::value<std::string>()->default_value(""),
        "built-in models: load weights from this file (default: the built-in initialisation)")(
        "save-weights", po::value<std::string>()->default_value(""),
        "built-in models: write the weights in use to this file")(
        "objective", po::value<std::string>()->default_value(model::name(def.objective)),
        "objective whose gradients are extracted: cross-entropy (labels), cosine (view "
        "consistency with an augmented view), dino (self-distillation, fixed random prototypes), "
        "or torchscript:PATH (forward(output, teacher, labels) -> per-image losses [B])")(
        "seed", po::value<std::uint64_t>()->default_value(def.seed),
        "seed of the augmentations and of the DINO prototype head")(
        "labels", po::value<std::string>()->default_value(model::name(def.labels)),
        "cross-entropy targets: 'stimuli' (/stimuli/labels), 'self' (the model's argmax), or "
        "'shuffled' (control: /stimuli/labels permuted across images with --seed)")(
        "randomize-weights", po::bool_switch(),
        "control: permute the elements of every parameter tensor of the model (after loading), "
        "keeping each tensor's weight distribution and none of its learned structure")(
        "pooling", po::value<std::string>()->default_value(model::name(def.pooling)),
        "mean (all tokens / positions), cls (token 0), patch-mean (tokens 1..T-1), "
        "cls+patch-mean (both), grid:G (G x G average grid of a feature map)")(
        "device", po::value<std::string>()->default_value(def.device),
        "cpu, or cuda (rank r uses GPU <node-local rank> mod <GPUs on the node>)")(
        "batch-size", po::value<std::int64_t>()->default_value(def.batch_size),
        "images per forward/backward pass (results do not depend on it)")(
        "block", po::value<std::int64_t>()->default_value(def.block), "images per resumable block")(
        "no-resume", po::bool_switch(), "start over even if a matching partial output exists")(
        "projection", po::value<std::int64_t>()->default_value(0),
        "sparse random projection of layers wider than K to K dimensions (0: off)")(
        "pca", po::value<std::int64_t>()->default_value(0),
        "PCA to K components by randomized SVD, fitted on training images only (0: off); the "
        "pooled features stay in OUT-stem.pooled.h5")(
        "split-from", po::value<std::string>()->default_value(""),
        "brain.h5 whose /brain/test_stimuli are left out of the PCA fit")(
        "pca-oversample", po::value<std::int64_t>()->default_value(10),
        "randomized SVD oversampling (sketch of K + p columns)")(
        "pca-power-iterations", po::value<int>()->default_value(2),
        "randomized SVD power (subspace) iterations");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    extract::ExtractOptions o;
    o.stimuli = vm["stimuli"].as<std::string>();
    o.out = vm["out"].as<std::string>();
    o.model = vm["model"].as<std::string>();
    o.weights = vm["weights"].as<std::string>();
    o.save_weights = vm["save-weights"].as<std::string>();
    o.objective = model::parse_objective(vm["objective"].as<std::string>());
    o.seed = vm["seed"].as<std::uint64_t>();
    o.labels = model::parse_labels(vm["labels"].as<std::string>());
    o.pooling = model::parse_pooling(vm["pooling"].as<std::string>());
    o.device = vm["device"].as<std::string>();
    o.batch_size = vm["batch-size"].as<std::int64_t>();
    o.block = vm["block"].as<std::int64_t>();
    o.resume = !vm["no-resume"].as<bool>();
    o.randomize_weights = vm["randomize-weights"].as<bool>();
    o.projection = vm["projection"].as<std::int64_t>();
    o.pca = vm["pca"].as<std::int64_t>();
    o.split_from = vm["split-from"].as<std::string>();
    o.pca_oversample = vm["pca-oversample"].as<std::int64_t>();
    o.pca_power_iterations = vm["pca-power-iterations"].as<int>();
    o.threads = threads_of(vm, ctx);
    o.local_rank = ctx.env.local_rank();
    extract::extract(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
