// gradmap encode: cross-validated ridge from features to brain responses (encoding::encode).

#include <sstream>

#include "command.hpp"
#include "gradmap/core/error.hpp"
#include "gradmap/encoding/encode.hpp"

namespace gradmap::cli {

Command encode_command() {
  Command c;
  c.name = "encode";
  c.usage = "--features FILE --brain FILE --out FILE [--alphas a,b,c] [--alpha-cv loo]";
  c.summary =
      "Fits, for every kind, layer and target, a ridge regression from the features to the\n"
      "responses (repetitions averaged; features z-scored and responses centred with\n"
      "training statistics), alpha per target by efficient leave-one-out on the training\n"
      "images, and scores it by Pearson r on the test images (/brain/test_stimuli).\n"
      "While the test predictions are in memory, B permutations of the test images give\n"
      "each target's exceedance count (p = (1 + count) / (B + 1)), the max over targets and\n"
      "the ROI (fMRI) or time-point (MEG) means per permutation, and bootstrap resamples\n"
      "the group means for confidence intervals (docs/statistics.md).\n"
      "Writes /<kind>/{r,r2,alpha,exceed} [layers, targets] and the replicates to scores.h5.\n"
      "--joint adds the banded ridge of all layers' activations with each layer's gradients\n"
      "and the gradients' unique variance beyond the activations (/unique_gradients).\n"
      "Targets go in rounds (at least 8 per rank when the training sides are cached); after\n"
      "each, OUT.partial and one checkpoint per rank are saved, so a killed run resumes from\n"
      "its last round.";
  c.options = [](po::options_description& d) {
    d.add_options()("features", po::value<std::string>()->required(), "features.h5")(
        "brain", po::value<std::string>()->required(), "brain_fmri.h5 or brain_meg.h5")(
        "out", po::value<std::string>()->required(), "scores.h5 to write")(
        "alphas", po::value<std::string>()->default_value(""),
        "comma-separated ridge penalties (default: 10 values, 1e-1 ... 1e8, log-spaced)")(
        "alpha-cv", po::value<std::string>()->default_value("loo"),
        "how alpha is chosen per target: loo (efficient leave-one-out) or kfold (K-fold CV over "
        "training images)")("folds", po::value<int>()->default_value(5), "kfold: number of folds")(
        "seed", po::value<std::uint64_t>()->default_value(0),
        "seed of the fold assignment (kfold), the permutations and the bootstrap resamples")(
        "solver", po::value<std::string>()->default_value("auto"),
        "basis of the training features: primal (thin SVD, LAPACK), dual (n x n kernel "
        "eigendecomposed with ScaLAPACK PDSYEVD over all ranks), or auto (dual when a layer has "
        "more features than training images)")(
        "precision", po::value<std::string>()->default_value("float32"),
        "precision of the alpha-selection GEMMs: float32 (near-ties rechecked in float64) or "
        "float64; refit, predictions and scores are always float64")(
        "permutations", po::value<int>()->default_value(1000),
        "test-image permutations for the p-values and hierarchy nulls (0: none)")(
        "bootstraps", po::value<int>()->default_value(1000),
        "bootstrap resamples of the test images for confidence intervals (0: none)")(
        "cluster-p", po::value<double>()->default_value(0.01),
        "MEG: cluster-forming threshold as a one-sided t-test p of r over the test images; the "
        "largest cluster of every permutation is kept for cluster-based tests (0: none)")(
        "store-resamples", po::bool_switch(),
        "also write the permutations and bootstrap counts (/resamples), for audits")(
        "store-predictions", po::bool_switch(), "also write the test predictions")(
        "memory-gb", po::value<double>()->default_value(0),
        "memory budget per rank in GiB; targets are processed in chunks that fit (default: 80% "
        "of the node's memory divided by its ranks)")(
        "max-chunk", po::value<std::int64_t>()->default_value(0),
        "at most this many voxels (or MEG sensors) per round (0: as many as the budget allows)")(
        "joint", po::bool_switch(),
        "also fit the joint (banded) ridge of the activations of all layers with the gradients of "
        "each layer, and score the gradients' unique variance dR^2 with its residual-permutation "
        "null (docs/statistics.md, \"Unique variance\")")(
        "joint-weights", po::value<std::string>()->default_value(""),
        "--joint: comma-separated band weights w in (0, 1) of [sqrt(w) activations, sqrt(1 - w) "
        "gradients], chosen per target with alpha by the same cross-validation; the activations "
        "alone (w = 1) are always a candidate (default: 0.2,0.5,0.8)")(
        "joint-activation-dims", po::value<std::int64_t>()->default_value(0),
        "--joint: keep this many principal components of the activation block (0: all)")(
        "joint-nuisance", po::value<bool>()->default_value(true),
        "--joint: add the features file's nuisance features (each image's loss and per-layer "
        "gradient norms, written by extract) to the activation model (true/false)")(
        "no-resume", po::bool_switch(),
        "start over even if a killed run's OUT.partial (same options, inputs and ranks) exists");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    encoding::EncodeOptions o;
    o.features = vm["features"].as<std::string>();
    o.brain = vm["brain"].as<std::string>();
    o.out = vm["out"].as<std::string>();
    o.alpha_cv = encoding::parse_alpha_cv(vm["alpha-cv"].as<std::string>());
    o.folds = vm["folds"].as<int>();
    o.seed = vm["seed"].as<std::uint64_t>();
    o.store_predictions = vm["store-predictions"].as<bool>();
    o.permutations = vm["permutations"].as<int>();
    o.precision = encoding::parse_precision(vm["precision"].as<std::string>());
    o.solver = encoding::parse_solver(vm["solver"].as<std::string>());
    o.bootstraps = vm["bootstraps"].as<int>();
    o.store_resamples = vm["store-resamples"].as<bool>();
    o.cluster_p = vm["cluster-p"].as<double>();
    o.memory_gb = vm["memory-gb"].as<double>();
    o.max_chunk = vm["max-chunk"].as<std::int64_t>();
    o.joint = vm["joint"].as<bool>();
    o.joint_activation_dims = vm["joint-activation-dims"].as<std::int64_t>();
    o.joint_nuisance = vm["joint-nuisance"].as<bool>();
    o.resume = !vm["no-resume"].as<bool>();
    auto numbers = [&](const char* option, std::vector<double>& out) {
      std::stringstream ss(vm[option].as<std::string>());
      for (std::string item; std::getline(ss, item, ',');) {
        if (item.empty())
          continue;
        try {
          size_t used = 0;
          out.push_back(std::stod(item, &used));
          if (used != item.size())
            throw std::invalid_argument(item);
        } catch (const std::exception&) {
          throw UsageError(std::string("--") + option + ": '" + item + "' is not a number");
        }
      }
    };
    numbers("alphas", o.alphas);
    numbers("joint-weights", o.joint_weights);
    encoding::encode(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
