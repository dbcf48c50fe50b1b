// gradmap aggregate: cross-subject / cross-model table of stats outputs (stats::aggregate).
#include "gradmap/stats/aggregate.hpp"
#include "command.hpp"

namespace gradmap::cli {

Command aggregate_command() {
  Command c;
  c.name = "aggregate";
  c.usage = "--stats DIR --stats DIR [...] [--label NAME ...] --out DIR [--ci 0.95] [--alpha 0.05]";
  c.summary =
      "Combines several `gradmap stats` outputs (subjects, or models) into one table: for\n"
      "rho_space / rho_time per kind, D_space, D_time and the peak-layer agreement, the value\n"
      "of each input, their mean, a Student-t CI across inputs and an exact sign-flip test of\n"
      "mean = 0; plus the mean ROI x layer and latency-curve tables.\n"
      "Writes DIR/aggregate.h5, DIR/aggregate.json and DIR/aggregate.csv.";
  c.options = [](po::options_description& d) {
    d.add_options()("stats", po::value<std::vector<std::string>>()->required(),
                    "a stats output directory (repeat)")(
        "label", po::value<std::vector<std::string>>(), "a name per input (default: dir name)")(
        "out", po::value<std::string>()->required(),
        "output directory")("ci", po::value<double>()->default_value(0.95),
                            "confidence level")("alpha", po::value<double>()->default_value(0.05),
                                                "level of the group divergence verdicts");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    stats::AggregateOptions o;
    o.stats = vm["stats"].as<std::vector<std::string>>();
    if (vm.count("label"))
      o.labels = vm["label"].as<std::vector<std::string>>();
    o.out = vm["out"].as<std::string>();
    o.ci = vm["ci"].as<double>();
    o.alpha = vm["alpha"].as<double>();
    stats::aggregate(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
