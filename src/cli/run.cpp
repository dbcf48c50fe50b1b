// gradmap run: the whole pipeline from one config file. Each stage is configured by the config's
// section of the same name ([simulate], ...) exactly as if that command had been given
// `--config FILE`; [run] holds the pipeline's own options. Stages run in order:
//   1. simulate  -> OUT/data/{stimuli,brain_fmri,brain_meg}.h5  (when [run] data = simulate)
//   2. extract   -> OUT/features.h5; for simulated data with the model, objective, labels and
//                   pooling recorded in /truth unless [extract] sets them
//   3. encode    -> OUT/scores_fmri.h5, OUT/scores_meg.h5 (one per brain file; [encode] section)
//   4. stats     -> OUT/stats/stats.h5, OUT/stats/summary.json ([stats] section)
//   5. report    -> OUT/report/index.html, figures/, tables/, maps/ ([report] section)
//   6. validate the stage outputs against the schema
#include <filesystem>

#include "command.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::cli {
namespace {

// Runs `name` with the pipeline's config and the given overrides, as `gradmap name --config F`.
void run_stage(const std::string& name, const std::string& config,
               std::vector<std::string> overrides, Context& ctx) {
  const Command* cmd = find_command(name);
  std::vector<std::string> args = {"--config", config};
  args.insert(args.end(), overrides.begin(), overrides.end());
  auto vm = parse(*cmd, args);
  GM_INFO("run: stage " << name << " started");
  StageTimer t("run." + name);
  cmd->run(*vm, ctx);
  GM_INFO("run: stage " << name << " finished in " << t.stop() << " s");
}

} // namespace

Command run_command() {
  Command c;
  c.name = "run";
  c.usage = "--config FILE [--out DIR]";
  c.summary = "Runs the pipeline configured by FILE: each stage reads the section named after it\n"
              "([simulate], ...); [run] sets the output directory and the data source.\n"
              "Outputs: OUT/data/*.h5 and OUT/gradmap.log.";
  c.options = [](po::options_description& d) {
    d.add_options()("out", po::value<std::string>()->default_value("gradmap-out"),
                    "output directory of the whole run")(
        "data", po::value<std::string>()->default_value("simulate"),
        "where the data come from: 'simulate' (the built-in dataset, configured by [simulate])");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    if (!vm.count("config"))
      throw UsageError("gradmap run: --config FILE is required");
    const std::string config = vm["config"].as<std::string>();
    const std::string out = vm["out"].as<std::string>();
    const std::string data = vm["data"].as<std::string>();
    if (data != "simulate")
      throw UsageError("--data: only 'simulate' is available in this build, not '" + data + "'");
    if (mpi::rank(ctx.comm) == 0)
      io::make_directories(out);
    MPI_Barrier(ctx.comm);
    if (!vm.count("log-file"))
      log::set_file(out + "/gradmap.log");
    GM_INFO("run: config " << config << ", output " << out << ", " << mpi::size(ctx.comm)
                           << " ranks");
    const std::string data_dir = out + "/data";
    run_stage("simulate", config, {"--out", data_dir}, ctx);

    // The extract settings that reproduce the features the simulated responses came from
    // (recorded in /truth), unless the config's [extract] section sets them.
    std::vector<std::string> extract_args = {"--stimuli", data_dir + "/stimuli.h5", "--out",
                                             out + "/features.h5"};
    std::string brain_path = data_dir + "/brain_fmri.h5";
    if (!std::filesystem::exists(brain_path))
      brain_path = data_dir + "/brain_meg.h5";
    if (std::filesystem::exists(brain_path)) {
      io::File brain = io::File::open(brain_path, ctx.comm);
      // Placeholders satisfy the required options; only the defaulted flags are wanted here.
      const auto configured =
          parse(*find_command("extract"), {"--config", config, "--stimuli", "-", "--out", "-"});
      for (const char* key : {"model", "objective", "labels", "pooling"})
        if (brain.has_attr("/truth", key) && (*configured)[key].defaulted()) {
          extract_args.push_back(std::string("--") + key);
          extract_args.push_back(brain.attr_string("/truth", key));
        }
    }
    run_stage("extract", config, extract_args, ctx);

    for (const char* modality : {"fmri", "meg"}) {
      const std::string brain = data_dir + "/brain_" + modality + ".h5";
      if (std::filesystem::exists(brain))
        run_stage("encode", config,
                  {"--features", out + "/features.h5", "--brain", brain, "--out",
                   out + "/scores_" + modality + ".h5"},
                  ctx);
    }

    std::vector<std::string> stats_args{"--out", out + "/stats"};
    for (const char* modality : {"fmri", "meg"})
      if (std::filesystem::exists(out + "/scores_" + modality + ".h5"))
        stats_args.insert(stats_args.end(),
                          {"--scores", out + "/scores_" + std::string(modality) + ".h5"});
    run_stage("stats", config, stats_args, ctx);
    run_stage("report", config, {"--stats", out + "/stats", "--out", out + "/report"}, ctx);

    // Validate what the stages wrote, as any later stage will before reading it.
    std::vector<std::string> files;
    for (const char* name : {"stimuli.h5", "brain_fmri.h5", "brain_meg.h5"})
      if (std::filesystem::exists(data_dir + "/" + name))
        files.push_back(data_dir + "/" + name);
    files.push_back(out + "/features.h5");
    std::vector<std::string> args(files.begin(), files.end());
    run_stage("validate", config, args, ctx);
    GM_INFO("run: done; outputs in " << out);
  };
  return c;
}

} // namespace gradmap::cli
