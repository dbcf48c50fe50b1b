// gradmap run: the whole pipeline from one config file (run::run_pipeline; the stages and their
// order are described in include/gradmap/run/pipeline.hpp). Each stage is configured by the
// config's section of the same name ([simulate], ...) exactly as if that command had been given
// `--config FILE`; [run] holds the pipeline's own options.
#include "command.hpp"
#include "gradmap/core/error.hpp"
#include "gradmap/run/pipeline.hpp"

namespace gradmap::cli {
namespace {

// The pipeline's settings: this command's options, and what the stages' own sections of the
// config say where the plan depends on it (the simulated modality, the imported epochs file,
// the extract options left at their defaults).
run::PipelineOptions pipeline_options(const po::variables_map& vm) {
  if (!vm.count("config"))
    throw UsageError("gradmap run: --config FILE is required");
  run::PipelineOptions o;
  o.config = vm["config"].as<std::string>();
  o.out = vm["out"].as<std::string>();
  o.data = run::parse_data_source(vm["data"].as<std::string>());
  if (!vm.count("log-file"))
    o.log_file = o.out + "/gradmap.log";
  o.models = run::split_list(vm["models"].as<std::string>());
  o.objectives = run::split_list(vm["objectives"].as<std::string>());
  for (const auto& ctl : run::split_list(vm["controls"].as<std::string>()))
    o.controls.push_back(run::parse_control(ctl));
  const std::string data_dir = o.out + "/data";
  if (o.data == run::DataSource::simulate) {
    const auto sim = parse(*find_command("simulate"), {"--config", o.config, "--out", data_dir});
    o.modality = (*sim)["modality"].as<std::string>();
  } else if (o.data == run::DataSource::things_meg) {
    const auto imp =
        parse(*find_command("import-things-meg"), {"--config", o.config, "--out", data_dir});
    o.epochs = (*imp)["epochs"].as<std::string>();
  }
  // Which extract options the config leaves at their defaults; extract's parser requires
  // --stimuli and --out, which '-' fills (their values are not read).
  const auto configured =
      parse(*find_command("extract"), {"--config", o.config, "--stimuli", "-", "--out", "-"});
  for (const char* key : {"model", "objective", "labels", "pooling"})
    if ((*configured)[key].defaulted())
      o.extract_defaulted.push_back(key);
  o.extract_needs_split =
      (*configured)["pca"].as<std::int64_t>() > 0 && (*configured)["split-from"].defaulted();
  return o;
}

} // namespace

Command run_command() {
  Command c;
  c.name = "run";
  c.usage = "--config FILE [--out DIR]";
  c.summary = "Runs the pipeline configured by FILE: each stage reads the section named after it\n"
              "([simulate] or [import-nsd] / [import-things-meg], [extract], [encode], ...);\n"
              "[run] sets the output directory and the data source.\n"
              "Outputs: OUT/data/*.h5 and OUT/gradmap.log.";
  c.options = [](po::options_description& d) {
    d.add_options()("out", po::value<std::string>()->default_value("gradmap-out"),
                    "output directory of the whole run")(
        "models", po::value<std::string>()->default_value(""),
        "comma-separated models to analyse, each in OUT/runs/<model>__<objective>/ and compared "
        "in OUT/aggregate/ (default: the one [extract] or /truth names, in OUT/)")(
        "objectives", po::value<std::string>()->default_value(""),
        "comma-separated objectives, crossed with --models (default: [extract] or /truth)")(
        "controls", po::value<std::string>()->default_value(""),
        "comma-separated controls analysed beside each model, in <dir>/controls/<control>/ and "
        "shown side by side in its report: random-weights (the model's parameters permuted "
        "within each tensor), shuffled-labels (cross-entropy against labels permuted across "
        "images)")(
        "data", po::value<std::string>()->default_value("simulate"),
        "where the data come from: 'simulate' (the built-in dataset, configured by [simulate]), "
        "'nsd' (import-nsd, configured by [import-nsd]) or 'things-meg' (import-things-meg, "
        "configured by [import-things-meg])");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    const run::PipelineOptions o = pipeline_options(vm);
    // A stage is its command given `--config FILE` and the stage's arguments.
    const run::CommandBinder bind = [&](const std::string& name,
                                        const std::vector<std::string>& args) {
      const Command* cmd = find_command(name);
      std::vector<std::string> all = {"--config", o.config};
      all.insert(all.end(), args.begin(), args.end());
      auto stage_vm = parse(*cmd, all);
      return std::function<void()>([cmd, stage_vm, &ctx] { cmd->run(*stage_vm, ctx); });
    };
    run::run_pipeline(o, bind, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
