#pragma once
// The stage engine of `gradmap run` (src/cli/run.cpp declares its options): the whole pipeline
// from one config file, as a list of stages, each run as if its command had been given
// `--config FILE` and skipped when its outputs carry its key. Stages run in order:
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
//
// The plan (which stages, with which arguments, inputs and outputs) is made by pure functions
// (data_stage, analysis_plan, ...); only run_stage and run_pipeline touch files and run commands.
#include <mpi.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace gradmap::run {

/// A stage of the pipeline: what it is given, what it reads and what it writes. Its key hashes
/// the stage, its arguments, the config text it reads and the keys of its inputs (inputs that
/// carry none, e.g. the user's own files, contribute their size and modification time), so a
/// changed option re-runs the stage and, through the keys, every stage downstream of it.
struct Stage {
  std::string name;              ///< the command run (its config section has the same name)
  std::vector<std::string> args; ///< its arguments after `--config FILE`
  std::vector<std::string> inputs;
  std::vector<std::string> outputs; ///< all must carry the key: .h5 files, or "X.key" files
                                    ///< written once X (a non-HDF5 output) is complete
};

/// Where the data come from ([run] data).
enum class DataSource { simulate, nsd, things_meg };
/// The controls analysed beside each model ([run] controls).
enum class Control { random_weights, shuffled_labels };
/// Not collective. Parse the option's value (throw UsageError naming --data / --controls and the
/// allowed values); name() gives it back.
DataSource parse_data_source(const std::string& s);
Control parse_control(const std::string& s);
const char* name(DataSource v);
const char* name(Control v);

/// The pipeline's settings, resolved by the command from its options and the config.
struct PipelineOptions {
  std::string config;   ///< the config file every stage reads
  std::string out;      ///< the output directory of the whole run
  std::string log_file; ///< when not empty, rank 0's log lines also go there
  DataSource data = DataSource::simulate;
  std::string modality = "both"; ///< data = simulate: its --modality (fmri, meg or both)
  std::string epochs;            ///< data = things-meg: the epochs file (an input of the import)
  std::vector<std::string> models, objectives; ///< empty: the one [extract] or /truth names
  std::vector<Control> controls;
  /// The extract options (of model, objective, labels, pooling) that the config leaves at their
  /// defaults: those are taken from the simulated brain's /truth when it records them.
  std::vector<std::string> extract_defaulted;
  /// The config asks extract for a PCA (--pca K > 0) without --split-from: the pipeline gives it
  /// the brain file, whose test images are left out of the fit.
  bool extract_needs_split = false;
};

/// Not collective. The text of the config that a stage reads: its top-level keys and its own
/// section, as normalised "key=value" lines (comments, blank lines and spacing dropped).
std::string config_text(const std::string& config, const std::string& section);

/// Not collective. A stage's key (16 hex digits, FNV-1a): of its name, the config text it reads
/// (config_text), its arguments and its inputs with their keys (input_keys[i]: of inputs[i]).
std::string stage_key(const Stage& st, const std::string& config_text,
                      const std::vector<std::string>& input_keys);

/// Not collective. Whether a stage whose key is `key` is done: it has outputs and every one
/// carries the key (output_keys[i]: the key recorded in outputs[i], "" when none).
bool up_to_date(const std::string& key, const std::vector<std::string>& output_keys);

/// Not collective. A comma-separated list: items trimmed of blanks, empty items dropped.
std::vector<std::string> split_list(const std::string& list);

/// The data files of a run: OUT/data/{stimuli,brain_fmri,brain_meg}.h5.
std::vector<std::string> data_files(const std::string& out);

/// Not collective. The data stage (simulate, import-nsd or import-things-meg) and the brain
/// files it does not produce (stale: removed before it runs).
struct DataPlan {
  Stage stage;
  std::vector<std::string> stale;
};
DataPlan data_stage(const PipelineOptions& o);

/// Not collective. The extract options every analysis starts from: --stimuli, then the /truth
/// values (pairs of option name and value, in the order model, objective, labels, pooling).
std::vector<std::string>
extract_base_args(const std::string& stimuli,
                  const std::vector<std::pair<std::string, std::string>>& truth);

/// Not collective. The arguments of an analysis's extract stage: `base` (option-value pairs)
/// less the options that `extra` sets, then `extra`, then --out DIR/features.h5.
std::vector<std::string> extract_args(const std::vector<std::string>& base,
                                      const std::vector<std::string>& extra,
                                      const std::string& dir);

/// Not collective. The directory name of a model x objective run ("" : "default"), with every
/// character other than letters, digits, '-', '_' and '.' replaced by '_'.
std::string run_tag(const std::string& model, const std::string& objective);

/// Not collective. The stages after the data stage, in the order they run, and the outputs of an
/// earlier config that this one no longer writes (stale: removed first). `extract_base`: from
/// extract_base_args; `present`: the data files that exist (after the data stage).
struct AnalysisPlan {
  std::vector<Stage> stages;
  std::vector<std::string> stale;
};
AnalysisPlan analysis_plan(const PipelineOptions& o, const std::vector<std::string>& extract_base,
                           const std::vector<std::string>& present);

/// Binds a command to its arguments (after `--config FILE`): parses them, so a usage error
/// surfaces before the stage starts, and returns the call that runs the command.
using CommandBinder = std::function<std::function<void()>(const std::string& command,
                                                          const std::vector<std::string>& args)>;

/// Collective on comm. Runs the stage with the pipeline's config, unless every output already
/// carries its key. Stale outputs are removed first; the key is recorded after the stage has
/// committed its outputs, so a kill at any point leaves the stage either complete and keyed or
/// re-run on restart.
void run_stage(const Stage& st, const std::string& config, const CommandBinder& bind,
               MPI_Comm comm);

/// Collective on comm. Runs the whole pipeline (the steps in this header's comment).
void run_pipeline(const PipelineOptions& o, const CommandBinder& bind, MPI_Comm comm);

} // namespace gradmap::run
