// The stage engine of `gradmap run` (include/gradmap/run/pipeline.hpp): a plan made by pure
// functions, then each stage run unless its outputs carry its key.
#include "gradmap/run/pipeline.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/mpi_check.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::run {
namespace {

std::uint64_t fnv1a(const std::string& s, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return h;
}

constexpr const char* kKeyAttr = "gradmap_run_key";

bool ends_with(const std::string& s, const char* suffix) {
  const std::string x(suffix);
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

// Collective. The run key recorded in an HDF5 output, or "" (missing file, no key, not HDF5).
std::string recorded_key(const std::string& path, MPI_Comm comm) {
  if (!std::filesystem::exists(path))
    return "";
  if (!ends_with(path, ".h5")) {
    std::ifstream in(path);
    std::string k;
    std::getline(in, k);
    return k;
  }
  io::File f = io::File::open(path, comm);
  return f.has_attr("/", kKeyAttr) ? f.attr_string("/", kKeyAttr) : "";
}

// Collective. The key of each input: the one it records, else (the user's own files) its size
// and modification time, else "" (missing).
std::vector<std::string> input_keys(const Stage& st, MPI_Comm comm) {
  std::vector<std::string> keys;
  for (const auto& in : st.inputs) {
    std::string k = recorded_key(in, comm);
    if (k.empty() && std::filesystem::exists(in))
      k = std::to_string(std::filesystem::file_size(in)) + "@" +
          std::to_string(std::filesystem::last_write_time(in).time_since_epoch().count());
    keys.push_back(k);
  }
  return keys;
}

// Collective. Records the key in every output once the stage has committed them: an attribute
// of an .h5 output, or the "X.key" file (written whole, then renamed into place).
void record_key(const Stage& st, const std::string& key, MPI_Comm comm) {
  for (const auto& o : st.outputs) {
    if (ends_with(o, ".h5")) {
      io::File f = io::File::open_rw(o, comm);
      f.set_attr("/", kKeyAttr, key);
      f.close();
    } else if (mpi::rank(comm) == 0) {
      std::ofstream(o + ".partial") << key << "\n";
      std::filesystem::rename(o + ".partial", o);
    }
  }
}

// Collective. Rank 0 removes the files; all wait for it.
void remove_files(const std::vector<std::string>& files, MPI_Comm comm) {
  if (mpi::rank(comm) == 0)
    for (const auto& f : files)
      std::filesystem::remove(f);
  GM_CHECK_MPI(MPI_Barrier(comm));
}

// Builds the analysis stages of one run directory after another (analysis_plan).
struct Planner {
  const PipelineOptions& o;
  const std::vector<std::string>& extract_base;
  std::vector<std::string> brains; // the brain files present, fMRI first
  AnalysisPlan plan;

  // The report of `dir`; `inputs`: more files whose change reruns it (the controls' stats).
  void report(const std::string& dir, const std::vector<std::string>& inputs) {
    std::vector<std::string> rin{dir + "/stats/stats.h5"};
    rin.insert(rin.end(), inputs.begin(), inputs.end());
    plan.stages.push_back({"report",
                           {"--stats", dir + "/stats", "--out", dir + "/report"},
                           rin,
                           {dir + "/report/index.html.key"}});
  }

  // extract -> encode per brain file -> stats -> report, in `dir`; `extra` extract options
  // replace the same options of extract_base; `report_inputs`: more files whose change reruns
  // the report (the controls' stats); report = false: the caller adds the report stage.
  void analyse_one(const std::string& dir, const std::vector<std::string>& extra,
                   const std::vector<std::string>& report_inputs, bool with_report) {
    const std::string features = dir + "/features.h5";
    auto args = extract_args(extract_base, extra, dir);
    std::vector<std::string> inputs{data_files(o.out)[0]};
    // --pca is fitted on the training images: the brain's test images are left out of the fit
    // (the first brain file; a simulated fMRI and MEG brain share one split).
    if (o.extract_needs_split && !brains.empty()) {
      args.insert(args.end(), {"--split-from", brains.front()});
      inputs.push_back(brains.front());
    }
    plan.stages.push_back({"extract", args, inputs, {features}});
    std::vector<std::string> scores;
    for (const std::string modality : {"fmri", "meg"}) {
      const std::string brain = o.out + "/data/brain_" + modality + ".h5";
      const std::string sc = dir + "/scores_" + modality + ".h5";
      if (std::find(brains.begin(), brains.end(), brain) == brains.end()) {
        plan.stale.push_back(sc); // from an earlier config
        continue;
      }
      plan.stages.push_back({"encode",
                             {"--features", features, "--brain", brain, "--out", sc},
                             {features, brain},
                             {sc}});
      scores.push_back(sc);
    }
    std::vector<std::string> stats_args{"--out", dir + "/stats"};
    for (const auto& sc : scores)
      stats_args.insert(stats_args.end(), {"--scores", sc});
    plan.stages.push_back(
        {"stats", stats_args, scores, {dir + "/stats/stats.h5", dir + "/stats/summary.json.key"}});
    if (with_report)
      report(dir, report_inputs);
  }

  // The controls of one analysis first (each a full analysis of its own), then the analysis,
  // whose report reads them from dir/controls/ (returned: their stats, inputs of that report).
  std::vector<std::string> analyse(const std::string& dir, const std::vector<std::string>& extra,
                                   bool with_report) {
    std::vector<std::string> control_stats;
    for (const Control ctl : o.controls) {
      std::vector<std::string> ex = extra;
      if (ctl == Control::random_weights) {
        ex.push_back("--randomize-weights");
      } else {
        // cross-entropy against the stimuli's labels, permuted (replaces a configured
        // --labels; extract refuses it for an objective without labels)
        ex.insert(ex.end(), {"--labels", "shuffled"});
      }
      const std::string cdir = dir + "/controls/" + name(ctl);
      analyse_one(cdir, ex, {}, true);
      control_stats.push_back(cdir + "/stats/stats.h5");
    }
    analyse_one(dir, extra, control_stats, with_report);
    return control_stats;
  }

  // Every model x objective in its own directory, then one table across them. The reports
  // last: each shows a sensitivity table across all the runs (OUT/runs/*). Returns the
  // features files.
  std::vector<std::string> analyse_runs() {
    std::vector<std::string> agg = {"--out", o.out + "/aggregate"}, stats_dirs, dirs, features;
    std::vector<std::vector<std::string>> report_inputs;
    const std::vector<std::string> none{""};
    for (const auto& model : o.models.empty() ? none : o.models)
      for (const auto& objective : o.objectives.empty() ? none : o.objectives) {
        const std::string tag = run_tag(model, objective);
        const std::string dir = o.out + "/runs/" + tag;
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
      report(dirs[i], in);
    }
    if (stats_dirs.size() >= 2)
      plan.stages.push_back({"aggregate", agg, stats_dirs, {o.out + "/aggregate/aggregate.h5"}});
    return features;
  }
};

// Collective. The extract options recorded in the simulated brain's /truth (fMRI brain, else
// MEG) that the config leaves at their defaults, in the order model, objective, labels, pooling.
std::vector<std::pair<std::string, std::string>> read_truth(const PipelineOptions& o,
                                                            MPI_Comm comm) {
  std::vector<std::pair<std::string, std::string>> truth;
  const auto files = data_files(o.out);
  std::string brain_path = files[1];
  if (!std::filesystem::exists(brain_path))
    brain_path = files[2];
  if (!std::filesystem::exists(brain_path))
    return truth;
  io::File brain = io::File::open(brain_path, comm);
  for (const char* key : {"model", "objective", "labels", "pooling"})
    if (brain.exists("/truth") && brain.has_attr("/truth", key) &&
        std::find(o.extract_defaulted.begin(), o.extract_defaulted.end(), key) !=
            o.extract_defaulted.end())
      truth.emplace_back(key, brain.attr_string("/truth", key));
  return truth;
}

} // namespace

DataSource parse_data_source(const std::string& s) {
  if (s == "simulate")
    return DataSource::simulate;
  if (s == "nsd")
    return DataSource::nsd;
  if (s == "things-meg")
    return DataSource::things_meg;
  throw UsageError("--data: '" + s + "' is not simulate, nsd or things-meg");
}

Control parse_control(const std::string& s) {
  if (s == "random-weights")
    return Control::random_weights;
  if (s == "shuffled-labels")
    return Control::shuffled_labels;
  throw UsageError("--controls: '" + s + "' is not random-weights or shuffled-labels");
}

const char* name(DataSource v) {
  switch (v) {
  case DataSource::simulate: return "simulate";
  case DataSource::nsd: return "nsd";
  case DataSource::things_meg: return "things-meg";
  }
  return "?";
}

const char* name(Control v) {
  return v == Control::random_weights ? "random-weights" : "shuffled-labels";
}

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

std::string stage_key(const Stage& st, const std::string& config_text,
                      const std::vector<std::string>& input_keys) {
  std::string text = st.name + "\n" + config_text;
  for (const auto& a : st.args)
    text += a + "\n";
  for (size_t i = 0; i < st.inputs.size(); ++i)
    text += st.inputs[i] + "=" + (i < input_keys.size() ? input_keys[i] : std::string()) + "\n";
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(text)));
  return buf;
}

bool up_to_date(const std::string& key, const std::vector<std::string>& output_keys) {
  bool done = !output_keys.empty();
  for (const auto& k : output_keys)
    done = done && k == key;
  return done;
}

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty())
      items.push_back(item);
  }
  return items;
}

std::vector<std::string> data_files(const std::string& out) {
  const std::string data_dir = out + "/data";
  return {data_dir + "/stimuli.h5", data_dir + "/brain_fmri.h5", data_dir + "/brain_meg.h5"};
}

DataPlan data_stage(const PipelineOptions& o) {
  // The data: simulated, or imported from a real dataset; a brain file the config no longer
  // produces is stale and removed.
  const std::string data_dir = o.out + "/data";
  const auto files = data_files(o.out);
  std::vector<std::string> outputs = {files[0]};
  DataPlan plan;
  if (o.data == DataSource::simulate) {
    if (o.modality != "meg")
      outputs.push_back(files[1]);
    if (o.modality != "fmri")
      outputs.push_back(files[2]);
    plan.stage = {"simulate", {"--out", data_dir}, {}, outputs};
  } else if (o.data == DataSource::nsd) {
    outputs.push_back(files[1]);
    plan.stage = {"import-nsd", {"--out", data_dir}, {}, outputs};
  } else {
    // The epochs file is an input: its size and time stamp are part of the stage's key.
    outputs.push_back(files[2]);
    plan.stage = {"import-things-meg", {"--out", data_dir}, {o.epochs}, outputs};
  }
  for (size_t i = 1; i < 3; ++i)
    if (std::find(outputs.begin(), outputs.end(), files[i]) == outputs.end())
      plan.stale.push_back(files[i]);
  return plan;
}

std::vector<std::string>
extract_base_args(const std::string& stimuli,
                  const std::vector<std::pair<std::string, std::string>>& truth) {
  std::vector<std::string> args = {"--stimuli", stimuli};
  for (const auto& [key, value] : truth)
    args.insert(args.end(), {"--" + key, value});
  return args;
}

std::vector<std::string> extract_args(const std::vector<std::string>& base,
                                      const std::vector<std::string>& extra,
                                      const std::string& dir) {
  std::vector<std::string> args;
  for (size_t i = 0; i + 1 < base.size(); i += 2) // option-value pairs
    if (std::find(extra.begin(), extra.end(), base[i]) == extra.end())
      args.insert(args.end(), {base[i], base[i + 1]});
  args.insert(args.end(), extra.begin(), extra.end());
  args.insert(args.end(), {"--out", dir + "/features.h5"});
  return args;
}

std::string run_tag(const std::string& model, const std::string& objective) {
  std::string tag =
      (model.empty() ? "default" : model) + "__" + (objective.empty() ? "default" : objective);
  for (char& ch : tag)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-' && ch != '_' && ch != '.')
      ch = '_';
  return tag;
}

AnalysisPlan analysis_plan(const PipelineOptions& o, const std::vector<std::string>& extract_base,
                           const std::vector<std::string>& present) {
  Planner pl{o, extract_base, {}, {}};
  const auto files = data_files(o.out);
  for (size_t i = 1; i < 3; ++i)
    if (std::find(present.begin(), present.end(), files[i]) != present.end())
      pl.brains.push_back(files[i]);
  std::vector<std::string> features = {o.out + "/features.h5"};
  if (o.models.empty() && o.objectives.empty())
    pl.analyse(o.out, {}, true);
  else
    features = pl.analyse_runs();
  // Validate what the stages wrote, as any later stage will before reading it.
  std::vector<std::string> to_validate;
  for (const auto& f : files)
    if (std::find(present.begin(), present.end(), f) != present.end())
      to_validate.push_back(f);
  to_validate.insert(to_validate.end(), features.begin(), features.end());
  pl.plan.stages.push_back({"validate", to_validate, {}, {}});
  return pl.plan;
}

void run_stage(const Stage& st, const std::string& config, const CommandBinder& bind,
               MPI_Comm comm) {
  const std::string key = stage_key(st, config_text(config, st.name), input_keys(st, comm));
  std::vector<std::string> output_keys;
  for (const auto& o : st.outputs)
    output_keys.push_back(recorded_key(o, comm));
  if (up_to_date(key, output_keys)) {
    GM_INFO("run: stage " << st.name << " is up to date (key " << key << "), skipped");
    return;
  }
  std::vector<std::string> stale;
  for (const auto& o : st.outputs) {
    stale.push_back(o);
    if (ends_with(o, ".key") && o.size() > 4) // "X.key" marks X complete
      stale.push_back(o.substr(0, o.size() - 4));
  }
  remove_files(stale, comm);
  const std::function<void()> command = bind(st.name, st.args);
  GM_INFO("run: stage " << st.name << " started");
  StageTimer t("run." + st.name);
  command();
  record_key(st, key, comm);
  GM_CHECK_MPI(MPI_Barrier(comm));
  GM_INFO("run: stage " << st.name << " finished in " << t.stop() << " s");
}

void run_pipeline(const PipelineOptions& o, const CommandBinder& bind, MPI_Comm comm) {
  // 1. The output directory, and the run's log in it.
  if (mpi::rank(comm) == 0)
    io::make_directories(o.out);
  GM_CHECK_MPI(MPI_Barrier(comm));
  if (!o.log_file.empty())
    log::set_file(o.log_file);
  GM_INFO("run: config " << o.config << ", output " << o.out << ", " << mpi::size(comm)
                         << " ranks");

  // 2. The data (a brain file this config no longer produces is removed first).
  const DataPlan data = data_stage(o);
  remove_files(data.stale, comm);
  run_stage(data.stage, o.config, bind, comm);

  // 3. The analyses: extract with the settings that reproduce the features the simulated
  // responses came from (recorded in /truth), unless the config's [extract] section sets them,
  // then encode, stats, report (and aggregate), and the validation of all they wrote.
  const auto files = data_files(o.out);
  std::vector<std::string> present;
  for (const auto& f : files)
    if (std::filesystem::exists(f))
      present.push_back(f);
  const AnalysisPlan plan =
      analysis_plan(o, extract_base_args(files[0], read_truth(o, comm)), present);
  remove_files(plan.stale, comm);
  for (const Stage& st : plan.stages)
    run_stage(st, o.config, bind, comm);
  GM_INFO("run: done; outputs in " << o.out);
}

} // namespace gradmap::run
