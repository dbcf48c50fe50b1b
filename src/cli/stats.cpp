// gradmap stats: p-values, FDR/FWER and hierarchy statistics from scores.h5 (stats::stats).
#include "gradmap/stats/stats.hpp"
#include "command.hpp"

namespace gradmap::cli {

Command stats_command() {
  Command c;
  c.name = "stats";
  c.usage = "--scores FILE [--scores FILE] --out DIR [--q 0.05] [--alpha 0.05] [--ci 0.95]\n"
            "      [--space-margin 0.2] [--time-margin 0]";
  c.summary =
      "From the scores and replicates written by encode (one fMRI and/or one MEG scores.h5):\n"
      "per-target permutation p-values, BH and BY q-values (per kind x layer and across all),\n"
      "max-statistic FWER p-values; ROI best layers and rho_space (fMRI), latency curves,\n"
      "peak latencies and rho_time (MEG), with bootstrap CIs and permutation p-values;\n"
      "the divergence tests D_space and D_time, each with a verdict (diverges, consistent,\n"
      "undetermined), and the voxelwise agreement of the peak-layer maps.\n"
      "Writes DIR/stats.h5 and DIR/summary.json (definitions: docs/statistics.md).";
  c.options = [](po::options_description& d) {
    d.add_options()("scores", po::value<std::vector<std::string>>()->required(),
                    "scores.h5 from encode (repeat for fMRI and MEG)")(
        "out", po::value<std::string>()->required(), "output directory")(
        "q", po::value<double>()->default_value(0.05), "FDR level for the significance counts")(
        "alpha", po::value<double>()->default_value(0.05),
        "FWER level and the level of the divergence verdicts")(
        "ci", po::value<double>()->default_value(0.95), "bootstrap confidence level")(
        "space-margin", po::value<double>()->default_value(0.2),
        "equivalence margin of D_space: peak layers this share of the depth (L - 1) apart count "
        "as the same place")("time-margin", po::value<double>()->default_value(0.0),
                             "equivalence margin of D_time: the gradients' peak latencies must "
                             "fall by more than this many seconds per layer");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    stats::StatsOptions o;
    o.scores = vm["scores"].as<std::vector<std::string>>();
    o.out = vm["out"].as<std::string>();
    o.q = vm["q"].as<double>();
    o.alpha = vm["alpha"].as<double>();
    o.ci = vm["ci"].as<double>();
    o.space_margin = vm["space-margin"].as<double>();
    o.time_margin = vm["time-margin"].as<double>();
    stats::stats(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
