// gradmap validate: checks files against the data schema (io::check_*), cross-checking a brain
// file's stimulus indices against a stimuli file given alongside it.
#include <iostream>

#include "command.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::cli {

Command validate_command() {
  Command c;
  c.name = "validate";
  c.usage = "FILE... ";
  c.summary = "Checks gradmap files (stimuli.h5, brain_*.h5, features.h5) against the schema:\n"
              "schema version, datasets, dtypes, shapes, index ranges, NaN/Inf. Stimulus indices\n"
              "of brain files are checked against a stimuli file given in the same call.\n"
              "Prints one line per valid file; exits non-zero at the first invalid one.";
  c.options = [](po::options_description& d) {
    d.add_options()("input", po::value<std::vector<std::string>>()->required(), "files to check");
  };
  c.positional = [](po::positional_options_description& p) { p.add("input", -1); };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    const auto files = vm["input"].as<std::vector<std::string>>();
    // Stimuli first, so brain files can be checked against their image count.
    std::int64_t n_stimuli = -1;
    std::vector<std::pair<std::string, std::string>> kinds;
    for (const auto& path : files) {
      io::File f = io::File::open(path, ctx.comm);
      kinds.emplace_back(path, io::file_kind(f));
      if (kinds.back().second == "stimuli")
        n_stimuli = io::check_stimuli(f).n;
    }
    const bool root = mpi::rank(ctx.comm) == 0;
    for (const auto& [path, kind] : kinds) {
      io::File f = io::File::open(path, ctx.comm);
      std::string line;
      if (kind == "stimuli") {
        const auto s = io::check_stimuli(f);
        line = "stimuli, " + std::to_string(s.n) + " images " + std::to_string(s.height) + "x" +
               std::to_string(s.width) + (s.has_labels ? ", labels" : "");
      } else if (kind == "brain") {
        const auto b = io::check_brain(f, n_stimuli);
        line = "brain (" + b.modality + "), " + std::to_string(b.trials) + " trials, " +
               (b.modality == "meg"
                    ? std::to_string(b.sensors) + " sensors x " + std::to_string(b.times) + " times"
                    : std::to_string(b.targets) + " voxels");
      } else {
        const auto x = io::check_features(f);
        line = "features, " + std::to_string(x.n) + " images, " + std::to_string(x.kinds.size()) +
               " kinds x " + std::to_string(x.layers.size()) + " layers";
      }
      if (root)
        std::cout << path << ": ok: " << line << std::endl;
    }
  };
  return c;
}

} // namespace gradmap::cli
