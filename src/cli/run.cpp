// gradmap run: the whole pipeline from one config file. Each stage is configured by the config's
// section of the same name ([simulate], ...) exactly as if that command had been given
// `--config FILE`; [run] holds the pipeline's own options. Stages run in order:
//   1. simulate  -> OUT/data/{stimuli,brain_fmri,brain_meg}.h5  (when [run] data = simulate),
//      or import-nsd -> OUT/data/{stimuli,brain_fmri}.h5 (data = nsd), or import-things-meg ->
//      OUT/data/{stimuli,brain_meg}.h5 (data = things-meg)
//   2. extract   -> OUT/features.h5; for simulated data with the model, objective, labels and
//                   pooling recorded in /truth unless [extract] sets them
//   3. encode    -> OUT/scores_fmri.h5, OUT/scores_meg.h5 (one per brain file; [encode] section)
//   4. stats     -> OUT/stats/stats.h5, OUT/stats/summary.json ([stats] section)
//   5. report    -> OUT/report/index.html, figures/, tables/, maps/ ([report] section)
//   6. validate the stage outputs against the schema
// With [run] models / objectives lists, steps 2-5 run for every model x objective in
// OUT/runs/<model>__<objective>/ and `aggregate` compares them in OUT/aggregate/.
// With [run] controls, steps 2-5 also run for each control of each analysis, in
// <its directory>/controls/<control>/, before the analysis itself, whose report shows them side
// by side: random-weights (extract --randomize-weights), shuffled-labels (extract --labels
// shuffled). The nuisance features (loss, gradient norms) are in every encode --joint.
// With several models x objectives the reports run last, each with a table across all runs.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "command.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::cli {
namespace {

// The text of the config that a stage reads: its top-level keys and its own section, as
// normalised "key=value" lines (comments, blank lines and spacing dropped).
std::string config_text(const std::string& config, const std::string& section) {
  std::ifstream in(config);
  std::string line, current, text;
  while (std::getline(in, line)) {
    const auto hash = line.find_first_of("#;");
    if (hash != std::string::npos)
      line.erase(hash);
    std::string t;
    for (char ch : line)
      if (!std::isspace(static_cast<unsigned char>(ch)))
        t += ch;
    if (t.empty())
      continue;
    if (t.front() == '[' && t.back() == ']')
      current = t.substr(1, t.size() - 2);
    else if (current.empty() || current == section)
      text += "[" + current + "]" + t + "\n";
  }
  return text;
}

std::uint64_t fnv1a(const std::string& s, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

constexpr const char* kKeyAttr = "gradmap_run_key";

// Collective. The run key recorded in an HDF5 output, or "" (missing file, no key, not HDF5).
std::string recorded_key(const std::string& path, MPI_Comm comm) {
  if (!std::filesystem::exists(path))
    return "";
  if (path.size() < 3 || path.compare(path.size() - 3, 3, ".h5") != 0) {
    std::ifstream in(path);
    std::string k;
    std::getline(in, k);
    return k;
  }
  io::File f = io::File::open(path, comm);
  return f.has_attr("/", kKeyAttr) ? f.attr_string("/", kKeyAttr) : "";
}

// A stage of the pipeline: what it is given, what it reads and what it writes. Its key hashes
// the stage, its arguments, the config text it reads and the keys of its inputs (inputs that
// carry none, e.g. the user's own files, contribute their size and modification time), so a
// changed option re-runs the stage and, through the keys, every stage downstream of it.
struct Stage {
  std::string name;
  std::vector<std::string> args;
  std::vector<std::string> inputs;
  std::vector<std::string> outputs; // all must carry the key: .h5 files, or "X.key" files
                                    // written once X (a non-HDF5 output) is complete
};

std::string stage_key(const Stage& st, const std::string& config, MPI_Comm comm) {
  std::string text = st.name + "\n" + config_text(config, st.name);
  for (const auto& a : st.args)
    text += a + "\n";
  for (const auto& in : st.inputs) {
    std::string k = recorded_key(in, comm);
    if (k.empty() && std::filesystem::exists(in))
      k = std::to_string(std::filesystem::file_size(in)) + "@" +
          std::to_string(std::filesystem::last_write_time(in).time_since_epoch().count());
    text += in + "=" + k + "\n";
  }
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(text)));
  return buf;
}

// Runs `name` with the pipeline's config and the given overrides, as `gradmap name --config F`,
// unless every output already carries this stage's key. Stale outputs are removed first; the
// key is recorded after the stage has committed its outputs, so a kill at any point leaves the
// stage either complete and keyed or re-run on restart.
void run_stage(const Stage& st, const std::string& config, Context& ctx) {
  const std::string key = stage_key(st, config, ctx.comm);
  bool done = !st.outputs.empty();
  for (const auto& o : st.outputs)
    done = done && recorded_key(o, ctx.comm) == key;
  if (done) {
    GM_INFO("run: stage " << st.name << " is up to date (key " << key << "), skipped");
    return;
  }
  if (mpi::rank(ctx.comm) == 0)
    for (const auto& o : st.outputs) {
      std::filesystem::remove(o);
      if (o.size() > 4 && o.compare(o.size() - 4, 4, ".key") == 0) // "X.key" marks X complete
        std::filesystem::remove(o.substr(0, o.size() - 4));
    }
  GM_CHECK_MPI(MPI_Barrier(ctx.comm));
  const Command* cmd = find_command(st.name);
  std::vector<std::string> args = {"--config", config};
  args.insert(args.end(), st.args.begin(), st.args.end());
  auto vm = parse(*cmd, args);
  GM_INFO("run: stage " << st.name << " started");
  StageTimer t("run." + st.name);
  cmd->run(*vm, ctx);
  for (const auto& o : st.outputs) {
    if (o.size() >= 3 && o.compare(o.size() - 3, 3, ".h5") == 0) {
      io::File f = io::File::open_rw(o, ctx.comm);
      f.set_attr("/", kKeyAttr, key);
      f.close();
    } else if (mpi::rank(ctx.comm) == 0) {
      std::ofstream(o + ".partial") << key << "\n";
      std::filesystem::rename(o + ".partial", o);
    }
  }
  GM_CHECK_MPI(MPI_Barrier(ctx.comm));
  GM_INFO("run: stage " << st.name << " finished in " << t.stop() << " s");
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
    if (!vm.count("config"))
      throw UsageError("gradmap run: --config FILE is required");
    const std::string config = vm["config"].as<std::string>();
    const std::string out = vm["out"].as<std::string>();
    const std::string data = vm["data"].as<std::string>();
    if (data != "simulate" && data != "nsd" && data != "things-meg")
      throw UsageError("--data: '" + data + "' is not simulate, nsd or things-meg");
    if (mpi::rank(ctx.comm) == 0)
      io::make_directories(out);
    GM_CHECK_MPI(MPI_Barrier(ctx.comm));
    if (!vm.count("log-file"))
      log::set_file(out + "/gradmap.log");
    GM_INFO("run: config " << config << ", output " << out << ", " << mpi::size(ctx.comm)
                           << " ranks");
    const std::string data_dir = out + "/data";
    const std::vector<std::string> data_files = {
        data_dir + "/stimuli.h5", data_dir + "/brain_fmri.h5", data_dir + "/brain_meg.h5"};
    // The data: simulated, or imported from a real dataset; a brain file the config no longer
    // produces is stale and removed.
    std::vector<std::string> outputs = {data_files[0]};
    Stage data_stage;
    if (data == "simulate") {
      const auto sim = parse(*find_command("simulate"), {"--config", config, "--out", data_dir});
      const std::string modality = (*sim)["modality"].as<std::string>();
      if (modality != "meg")
        outputs.push_back(data_files[1]);
      if (modality != "fmri")
        outputs.push_back(data_files[2]);
      data_stage = {"simulate", {"--out", data_dir}, {}, outputs};
    } else if (data == "nsd") {
      outputs.push_back(data_files[1]);
      data_stage = {"import-nsd", {"--out", data_dir}, {}, outputs};
    } else {
      // The epochs file is an input: its size and time stamp are part of the stage's key.
      const auto imp =
          parse(*find_command("import-things-meg"), {"--config", config, "--out", data_dir});
      outputs.push_back(data_files[2]);
      data_stage = {
          "import-things-meg", {"--out", data_dir}, {(*imp)["epochs"].as<std::string>()}, outputs};
    }
    if (mpi::rank(ctx.comm) == 0)
      for (size_t i = 1; i < 3; ++i)
        if (std::find(outputs.begin(), outputs.end(), data_files[i]) == outputs.end())
          std::filesystem::remove(data_files[i]);
    GM_CHECK_MPI(MPI_Barrier(ctx.comm));
    run_stage(data_stage, config, ctx);

    // The extract settings that reproduce the features the simulated responses came from
    // (recorded in /truth), unless the config's [extract] section sets them.
    std::vector<std::string> extract_base = {"--stimuli", data_files[0]};
    std::string brain_path = data_files[1];
    if (!std::filesystem::exists(brain_path))
      brain_path = data_files[2];
    if (std::filesystem::exists(brain_path)) {
      io::File brain = io::File::open(brain_path, ctx.comm);
      // Placeholders satisfy the required options; only the defaulted flags are wanted here.
      const auto configured =
          parse(*find_command("extract"), {"--config", config, "--stimuli", "-", "--out", "-"});
      for (const char* key : {"model", "objective", "labels", "pooling"})
        if (brain.exists("/truth") && brain.has_attr("/truth", key) &&
            (*configured)[key].defaulted()) {
          extract_base.push_back(std::string("--") + key);
          extract_base.push_back(brain.attr_string("/truth", key));
        }
    }
    // extract -> encode per brain file -> stats -> report, in `dir`; `extra` extract options
    // replace the same options of extract_base; `report_inputs`: more files whose change reruns
    // the report (the controls' stats); report = false: the caller runs the report stage.
    auto report_stage = [&](const std::string& dir, const std::vector<std::string>& inputs) {
      std::vector<std::string> rin{dir + "/stats/stats.h5"};
      rin.insert(rin.end(), inputs.begin(), inputs.end());
      run_stage({"report",
                 {"--stats", dir + "/stats", "--out", dir + "/report"},
                 rin,
                 {dir + "/report/index.html.key"}},
                config, ctx);
    };
    auto analyse_one = [&](const std::string& dir, const std::vector<std::string>& extra,
                           const std::vector<std::string>& report_inputs, bool report) {
      std::vector<std::string> extract_args;
      for (size_t i = 0; i + 1 < extract_base.size(); i += 2) // option-value pairs
        if (std::find(extra.begin(), extra.end(), extract_base[i]) == extra.end())
          extract_args.insert(extract_args.end(), {extract_base[i], extract_base[i + 1]});
      extract_args.insert(extract_args.end(), extra.begin(), extra.end());
      extract_args.insert(extract_args.end(), {"--out", dir + "/features.h5"});
      run_stage({"extract", extract_args, {data_files[0]}, {dir + "/features.h5"}}, config, ctx);
      std::vector<std::string> scores;
      for (const std::string modality : {"fmri", "meg"}) {
        const std::string brain = data_dir + "/brain_" + modality + ".h5";
        const std::string sc = dir + "/scores_" + modality + ".h5";
        if (!std::filesystem::exists(brain)) {
          if (mpi::rank(ctx.comm) == 0)
            std::filesystem::remove(sc); // from an earlier config
          continue;
        }
        run_stage({"encode",
                   {"--features", dir + "/features.h5", "--brain", brain, "--out", sc},
                   {dir + "/features.h5", brain},
                   {sc}},
                  config, ctx);
        scores.push_back(sc);
      }
      std::vector<std::string> stats_args{"--out", dir + "/stats"};
      for (const auto& sc : scores)
        stats_args.insert(stats_args.end(), {"--scores", sc});
      run_stage(
          {"stats", stats_args, scores, {dir + "/stats/stats.h5", dir + "/stats/summary.json.key"}},
          config, ctx);
      if (report)
        report_stage(dir, report_inputs);
    };
    auto split = [](const std::string& list) {
      std::vector<std::string> items;
      std::stringstream ss(list);
      for (std::string item; std::getline(ss, item, ',');) {
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        if (!item.empty())
          items.push_back(item);
      }
      return items;
    };
    const auto models = split(vm["models"].as<std::string>());
    const auto objectives = split(vm["objectives"].as<std::string>());
    const auto controls = split(vm["controls"].as<std::string>());
    for (const auto& ctl : controls)
      if (ctl != "random-weights" && ctl != "shuffled-labels")
        throw UsageError("--controls: '" + ctl + "' is not random-weights or shuffled-labels");
    // The controls of one analysis first (each a full analysis of its own), then the analysis,
    // whose report reads them from dir/controls/ (returned: their stats, inputs of that report).
    auto analyse = [&](const std::string& dir, const std::vector<std::string>& extra, bool report) {
      std::vector<std::string> control_stats;
      for (const auto& ctl : controls) {
        std::vector<std::string> ex = extra;
        if (ctl == "random-weights") {
          ex.push_back("--randomize-weights");
        } else {
          // cross-entropy against the stimuli's labels, permuted (replaces a configured
          // --labels; extract refuses it for an objective without labels)
          ex.insert(ex.end(), {"--labels", "shuffled"});
        }
        const std::string cdir = dir + "/controls/" + ctl;
        analyse_one(cdir, ex, {}, true);
        control_stats.push_back(cdir + "/stats/stats.h5");
      }
      analyse_one(dir, extra, control_stats, report);
      return control_stats;
    };
    std::vector<std::string> features = {out + "/features.h5"};
    if (models.empty() && objectives.empty()) {
      analyse(out, {}, true);
    } else {
      // Every model x objective in its own directory, then one table across them.
      // The reports last: each shows a sensitivity table across all the runs (OUT/runs/*).
      std::vector<std::string> agg = {"--out", out + "/aggregate"}, stats_dirs, dirs;
      std::vector<std::vector<std::string>> report_inputs;
      features.clear();
      for (const auto& model : models.empty() ? std::vector<std::string>{""} : models)
        for (const auto& objective :
             objectives.empty() ? std::vector<std::string>{""} : objectives) {
          std::string tag = (model.empty() ? "default" : model) + "__" +
                            (objective.empty() ? "default" : objective);
          for (char& ch : tag)
            if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' &&
                ch != '.')
              ch = '_';
          const std::string dir = out + "/runs/" + tag;
          std::vector<std::string> extra;
          if (!model.empty())
            extra.insert(extra.end(), {"--model", model});
          if (!objective.empty())
            extra.insert(extra.end(), {"--objective", objective});
          report_inputs.push_back(analyse(dir, extra, false));
          dirs.push_back(dir);
          features.push_back(dir + "/features.h5");
          stats_dirs.push_back(dir + "/stats/stats.h5");
          agg.insert(agg.end(), {"--stats", dir + "/stats", "--label", tag});
        }
      for (size_t i = 0; i < dirs.size(); ++i) {
        auto in = report_inputs[i];
        for (const auto& sd : stats_dirs)
          if (sd != dirs[i] + "/stats/stats.h5")
            in.push_back(sd);
        report_stage(dirs[i], in);
      }
      if (stats_dirs.size() >= 2)
        run_stage({"aggregate", agg, stats_dirs, {out + "/aggregate/aggregate.h5"}}, config, ctx);
    }

    // Validate what the stages wrote, as any later stage will before reading it.
    std::vector<std::string> files;
    for (const char* name : {"stimuli.h5", "brain_fmri.h5", "brain_meg.h5"})
      if (std::filesystem::exists(data_dir + "/" + name))
        files.push_back(data_dir + "/" + name);
    files.insert(files.end(), features.begin(), features.end());
    std::vector<std::string> args(files.begin(), files.end());
    run_stage({"validate", args, {}, {}}, config, ctx);
    GM_INFO("run: done; outputs in " << out);
  };
  return c;
}

} // namespace gradmap::cli
