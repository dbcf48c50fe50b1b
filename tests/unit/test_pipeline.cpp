// The pure pieces of the stage engine of `gradmap run` (include/gradmap/run/pipeline.hpp): the
// stage key and skip decision, the mapping from the config's settings to stage arguments, and
// the order of the planned stages.
#include <gtest/gtest.h>

#include <algorithm>

#include "gradmap/core/error.hpp"
#include "gradmap/run/pipeline.hpp"

namespace run = gradmap::run;
using Strings = std::vector<std::string>;

namespace {

// The names of the stages, in order, with the output directory of each analysis stage.
Strings stage_names(const run::AnalysisPlan& plan) {
  Strings names;
  for (const auto& st : plan.stages)
    names.push_back(st.name + (st.outputs.empty() ? "" : ":" + st.outputs[0]));
  return names;
}

const run::Stage& find_stage(const run::AnalysisPlan& plan, const std::string& name,
                             const std::string& output) {
  for (const auto& st : plan.stages)
    if (st.name == name && !st.outputs.empty() && st.outputs[0] == output)
      return st;
  throw std::runtime_error("no stage " + name + " writing " + output);
}

} // namespace

TEST(RunPipeline, StageKeyChangesWithEveryIngredientAndOnlyThem) {
  const run::Stage st{"encode", {"--out", "a.h5"}, {"f.h5", "b.h5"}, {"a.h5"}};
  const std::string key = run::stage_key(st, "[encode]folds=5\n", {"k1", "k2"});
  EXPECT_EQ(key.size(), 16u);
  EXPECT_EQ(key, run::stage_key(st, "[encode]folds=5\n", {"k1", "k2"})); // deterministic
  EXPECT_NE(key, run::stage_key(st, "[encode]folds=4\n", {"k1", "k2"})); // config text
  EXPECT_NE(key, run::stage_key(st, "[encode]folds=5\n", {"k1", "k3"})); // an input's key
  run::Stage other = st;
  other.args.back() = "b.h5";
  EXPECT_NE(key, run::stage_key(other, "[encode]folds=5\n", {"k1", "k2"})); // an argument
  other = st;
  other.name = "stats";
  EXPECT_NE(key, run::stage_key(other, "[encode]folds=5\n", {"k1", "k2"})); // the command
  other = st;
  other.outputs = {"elsewhere.h5"}; // outputs are not part of the key
  EXPECT_EQ(key, run::stage_key(other, "[encode]folds=5\n", {"k1", "k2"}));
}

TEST(RunPipeline, StageIsSkippedOnlyWhenEveryOutputCarriesItsKey) {
  EXPECT_TRUE(run::up_to_date("abc", {"abc", "abc"}));
  EXPECT_FALSE(run::up_to_date("abc", {"abc", ""}));    // one output missing or unkeyed
  EXPECT_FALSE(run::up_to_date("abc", {"abd", "abc"})); // one output from another config
  EXPECT_FALSE(run::up_to_date("abc", {}));             // no outputs (validate): always runs
}

TEST(RunPipeline, ExtraExtractOptionsReplaceTheTruthOnes) {
  const Strings base =
      run::extract_base_args("d/stimuli.h5", {{"model", "builtin:tinycnn"}, {"pooling", "mean"}});
  EXPECT_EQ(base, (Strings{"--stimuli", "d/stimuli.h5", "--model", "builtin:tinycnn", "--pooling",
                           "mean"}));
  EXPECT_EQ(run::extract_args(base, {"--model", "builtin:tinyvit", "--randomize-weights"}, "o"),
            (Strings{"--stimuli", "d/stimuli.h5", "--pooling", "mean", "--model", "builtin:tinyvit",
                     "--randomize-weights", "--out", "o/features.h5"}));
  EXPECT_EQ(run::extract_args(base, {}, "o"),
            (Strings{"--stimuli", "d/stimuli.h5", "--model", "builtin:tinycnn", "--pooling", "mean",
                     "--out", "o/features.h5"}));
}

TEST(RunPipeline, ListsTagsAndOptionValues) {
  EXPECT_EQ(run::split_list(" a, b ,,c\t"), (Strings{"a", "b", "c"}));
  EXPECT_TRUE(run::split_list("").empty());
  EXPECT_EQ(run::run_tag("torchscript:/m/x.pt", ""), "torchscript__m_x.pt__default");
  EXPECT_EQ(run::parse_control("shuffled-labels"), run::Control::shuffled_labels);
  EXPECT_STREQ(run::name(run::parse_data_source("things-meg")), "things-meg");
  try {
    run::parse_control("bogus");
    FAIL() << "bogus control accepted";
  } catch (const gradmap::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--controls"), std::string::npos);
  }
}

TEST(RunPipeline, DataStageWritesTheConfiguredBrainsAndRemovesTheOthers) {
  run::PipelineOptions o;
  o.out = "o";
  o.modality = "fmri";
  run::DataPlan p = run::data_stage(o);
  EXPECT_EQ(p.stage.name, "simulate");
  EXPECT_EQ(p.stage.outputs, (Strings{"o/data/stimuli.h5", "o/data/brain_fmri.h5"}));
  EXPECT_EQ(p.stale, (Strings{"o/data/brain_meg.h5"}));
  o.data = run::DataSource::things_meg;
  o.epochs = "e.npz";
  p = run::data_stage(o);
  EXPECT_EQ(p.stage.name, "import-things-meg");
  EXPECT_EQ(p.stage.inputs, (Strings{"e.npz"})); // its change reruns the import
  EXPECT_EQ(p.stale, (Strings{"o/data/brain_fmri.h5"}));
}

TEST(RunPipeline, ControlsRunBeforeTheirAnalysisWhoseReportReadsThem) {
  run::PipelineOptions o;
  o.out = "o";
  o.controls = {run::Control::random_weights};
  const auto plan = run::analysis_plan(o, {"--stimuli", "o/data/stimuli.h5"},
                                       {"o/data/stimuli.h5", "o/data/brain_meg.h5"});
  EXPECT_EQ(stage_names(plan),
            (Strings{"extract:o/controls/random-weights/features.h5",
                     "encode:o/controls/random-weights/scores_meg.h5",
                     "stats:o/controls/random-weights/stats/stats.h5",
                     "report:o/controls/random-weights/report/index.html.key",
                     "extract:o/features.h5", "encode:o/scores_meg.h5", "stats:o/stats/stats.h5",
                     "report:o/report/index.html.key", "validate"}));
  EXPECT_EQ(plan.stale, (Strings{"o/controls/random-weights/scores_fmri.h5", "o/scores_fmri.h5"}));
  const auto& report = find_stage(plan, "report", "o/report/index.html.key");
  EXPECT_EQ(report.inputs,
            (Strings{"o/stats/stats.h5", "o/controls/random-weights/stats/stats.h5"}));
  const auto& extract = find_stage(plan, "extract", "o/controls/random-weights/features.h5");
  EXPECT_NE(std::find(extract.args.begin(), extract.args.end(), "--randomize-weights"),
            extract.args.end());
  EXPECT_EQ(plan.stages.back().args,
            (Strings{"o/data/stimuli.h5", "o/data/brain_meg.h5", "o/features.h5"})); // validate
}

TEST(RunPipeline, ModelsByObjectivesReportLastAndAggregate) {
  run::PipelineOptions o;
  o.out = "o";
  o.models = {"builtin:tinycnn", "builtin:tinyvit"};
  const auto plan = run::analysis_plan(o, {"--stimuli", "o/data/stimuli.h5"},
                                       {"o/data/stimuli.h5", "o/data/brain_fmri.h5"});
  const Strings names = stage_names(plan);
  const std::string a = "o/runs/builtin_tinycnn__default", b = "o/runs/builtin_tinyvit__default";
  EXPECT_EQ(names, (Strings{"extract:" + a + "/features.h5", "encode:" + a + "/scores_fmri.h5",
                            "stats:" + a + "/stats/stats.h5", "extract:" + b + "/features.h5",
                            "encode:" + b + "/scores_fmri.h5", "stats:" + b + "/stats/stats.h5",
                            "report:" + a + "/report/index.html.key",
                            "report:" + b + "/report/index.html.key",
                            "aggregate:o/aggregate/aggregate.h5", "validate"}));
  // Each report reruns when any run's stats change (its table spans all the runs).
  EXPECT_EQ(find_stage(plan, "report", a + "/report/index.html.key").inputs,
            (Strings{a + "/stats/stats.h5", b + "/stats/stats.h5"}));
  EXPECT_EQ(find_stage(plan, "extract", b + "/features.h5").args,
            (Strings{"--stimuli", "o/data/stimuli.h5", "--model", "builtin:tinyvit", "--out",
                     b + "/features.h5"}));
}
