// gradmap encode:
// 1. Validate features and brain files against each other (image counts, split).
// 2. Split images: training = shown in some trial and not a test image; test = test_stimuli.
// 3. Each rank reads its column block of the responses, averages the repetitions of each image,
//    and centres with the training means.
// 4. Per (kind, layer): standardise the features with training statistics (population std;
//    constant columns set to 0), build the SVD basis (or the kernel form for p > n, or for
//    K-fold with p <= the folds' training rows the Gram eigendecompositions), select alpha per
//    target by efficient LOO or K-fold CV, refit, score on the test images.
// 5. While the test predictions are in memory: permutation exceedance counts per target, the
//    max-statistic and group (ROI / time point) means per permutation and bootstrap resample;
//    fMRI: every voxel's peak-layer p-values from its bootstrap layer profiles (voxel_peak_p).
// 6. Write r, R^2, alpha, exceedances [layers, targets] (and K-fold's per-fold r) per kind to
//    scores.h5 (column blocks per rank), and the reduced null and bootstrap replicates.
// --joint: also the activation model A (the activations of all layers in one band) and, per
// layer, the banded ridge of A with the gradients G_l (band weights w, penalties chosen per target
// among w and alpha by the same cross-validation), the gradients' unique variance dR^2 and its
// residual-permutation null, treated as a third kind "unique_gradients" (docs/statistics.md).
#include "gradmap/encoding/encode.hpp"

#include <sys/stat.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "checkpoint.hpp"
#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/encoding/clusters.hpp"
#include "gradmap/encoding/encode_plan.hpp"
#include "gradmap/encoding/nulls.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "gradmap/sim/philox.hpp"
#include "gradmap/stats/divergence.hpp"
#include "training_sides.hpp"

namespace gradmap::encoding {

std::vector<double> default_joint_weights() {
  return {0.2, 0.5, 0.8};
}

std::vector<double> default_alphas() {
  std::vector<double> a;
  for (int e = -1; e <= 8; ++e)
    a.push_back(std::pow(10.0, e));
  return a;
}

AlphaCV parse_alpha_cv(const std::string& s) {
  if (s == "loo")
    return AlphaCV::loo;
  if (s == "kfold")
    return AlphaCV::kfold;
  throw UsageError("--alpha-cv: must be loo or kfold, not '" + s + "'");
}

Solver parse_solver(const std::string& s) {
  if (s == "auto")
    return Solver::automatic;
  if (s == "primal")
    return Solver::primal;
  if (s == "dual")
    return Solver::dual;
  throw UsageError("--solver: must be auto, primal or dual, not '" + s + "'");
}

Precision parse_precision(const std::string& s) {
  if (s == "float32")
    return Precision::float32;
  if (s == "float64")
    return Precision::float64;
  throw UsageError("--precision: must be float32 or float64, not '" + s + "'");
}

const char* name(AlphaCV v) {
  return v == AlphaCV::kfold ? "kfold" : "loo";
}

const char* name(Solver v) {
  return v == Solver::dual ? "dual" : v == Solver::primal ? "primal" : "auto";
}

const char* name(Precision v) {
  return v == Precision::float64 ? "float64" : "float32";
}

void validate(const EncodeOptions& o) {
  if (o.features.empty())
    throw UsageError("--features: a features file is required");
  if (o.brain.empty())
    throw UsageError("--brain: a brain file is required");
  if (o.out.empty())
    throw UsageError("--out: an output file is required");
  if (o.alpha_cv == AlphaCV::kfold && o.folds < 2)
    throw UsageError("--folds: at least 2 folds are needed");
  for (double a : o.alphas)
    if (!(a > 0) || !std::isfinite(a))
      throw UsageError("--alphas: every alpha must be a positive finite number");
  if (o.permutations < 0 || o.permutations > 10000000)
    throw UsageError("--permutations: must be between 0 and 10^7");
  if (o.bootstraps < 0 || o.bootstraps > 10000000)
    throw UsageError("--bootstraps: must be between 0 and 10^7");
  if (!(o.memory_gb >= 0) || !std::isfinite(o.memory_gb))
    throw UsageError("--memory-gb: must be positive (0: 80% of the node's memory over its ranks)");
  if (!(o.cluster_p >= 0 && o.cluster_p < 0.5))
    throw UsageError("--cluster-p: must be in [0, 0.5) (0: no cluster null)");
  for (double w : o.joint_weights)
    if (!(w > 0 && w < 1))
      throw UsageError("--joint-weights: every band weight must be strictly between 0 and 1 (the "
                       "activations-only model, w = 1, is always a candidate)");
  if (o.joint_activation_dims < 0)
    throw UsageError("--joint-activation-dims: must be >= 0 (0: all)");
}

namespace {

// Reduces the replicates over ranks and writes them (identical on every rank):
//   /<kind>/null_max [L, B], /<kind>/null_group [L, G, B], /<kind>/boot_group [L, G, Bb],
//   /<kind>/group_r [L, G], /<kind>/group_n [L, G], /groups/{value, names}.
void write_nulls(const io::File& f, const EncodeOptions& opt, const Resamples& rs,
                 const std::vector<std::string>& kinds, std::int64_t L, std::int64_t G,
                 std::vector<NullAccumulator>& acc, bool meg, const io::File& bf, MPI_Comm comm) {
  const std::int64_t B = rs.permutations, Bb = rs.bootstraps;
  for (auto& a : acc)
    reduce_nulls(a, comm);
  for (size_t k = 0; k < kinds.size(); ++k) {
    std::vector<float> mx;
    std::vector<double> perm, boot, obs;
    std::vector<std::int64_t> cnt;
    for (std::int64_t l = 0; l < L; ++l) {
      const NullAccumulator& a = acc[k * size_t(L) + size_t(l)];
      mx.insert(mx.end(), a.null_max.begin(), a.null_max.end());
      for (std::int64_t g = 0; g < G; ++g) {
        const double inv = a.n[g] > 0 ? 1.0 / double(a.n[g]) : std::nan("");
        for (std::int64_t b = 0; b < B; ++b)
          perm.push_back(a.perm_sum[g * B + b] * inv);
        for (std::int64_t b = 0; b < Bb; ++b)
          boot.push_back(a.boot_sum[g * Bb + b] * inv);
        obs.push_back(a.obs_sum[g] * inv);
        cnt.push_back(a.n[g]);
      }
    }
    const std::string base = "/" + kinds[k] + "/";
    if (B > 0) {
      f.write_small(base + "null_max", mx, {L, B});
      f.write_small(base + "null_group", perm, {L, G, B});
    }
    if (Bb > 0)
      f.write_small(base + "boot_group", boot, {L, G, Bb});
    f.write_small(base + "group_r", obs, {L, G});
    f.write_small(base + "group_n", cnt, {L, G});
  }
  if (meg && !acc.empty() && acc[0].words > 0) {
    // Cluster null: the largest supra-threshold cluster of every permutation (clusters.hpp).
    const auto shape = bf.dataset("/brain/responses").shape(); // [trials, sensors, times]
    const std::int64_t S = shape[1];
    std::vector<std::int32_t> adj;
    if (bf.exists("/brain/sensor_adjacency")) {
      adj = bf.dataset("/brain/sensor_adjacency").read_all<std::int32_t>();
      if (std::int64_t(adj.size()) != S * S)
        throw UsageError(bf.path() + ": /brain/sensor_adjacency must be [sensors, sensors]");
      f.write_small("/cluster_adjacency", adj, {S, S}); // for stats
    }
    const std::string adjacency = adj.empty() ? "time" : "sensors+time";
    const ClusterGraph g = make_cluster_graph(S, shape[2], adj);
    for (size_t k = 0; k < kinds.size(); ++k) {
      if (acc[k * size_t(L)].words == 0)
        continue; // the unique kind
      std::vector<std::int64_t> mx;
      for (std::int64_t l = 0; l < L; ++l) {
        const auto one = null_cluster_max(acc[k * size_t(L) + size_t(l)], g, int(B), comm);
        mx.insert(mx.end(), one.begin(), one.end());
      }
      f.write_small("/" + kinds[k] + "/null_cluster", mx, {L, B});
    }
    f.set_attr("/", "cluster_threshold", std::vector<double>{double(acc[0].cluster_threshold)});
    f.set_attr("/", "cluster_p", std::vector<double>{opt.cluster_p});
    f.set_attr("/", "cluster_adjacency", adjacency);
  }
  if (meg) {
    f.write_small("/groups/value", bf.dataset("/brain/times").read_all<double>(), {G});
    f.set_attr("/groups", "by", std::string("time"));
  } else {
    const auto level = bf.dataset("/brain/roi_level").read_all<double>();
    f.write_small("/groups/value", level, {G});
    f.write_strings("/groups/names", bf.dataset("/brain/roi_names").read_strings());
    f.set_attr("/groups", "by", std::string("roi"));
  }
  f.set_attr("/", "permutations", B);
  f.set_attr("/", "bootstraps", Bb);
  f.set_attr("/", "seed", static_cast<std::int64_t>(opt.seed));
  if (opt.store_resamples) {
    const std::vector<std::int32_t> perm(rs.perm.begin(), rs.perm.end()),
        count(rs.count.begin(), rs.count.end());
    if (B > 0)
      f.write_small("/resamples/permutations", perm, {B, rs.m});
    if (Bb > 0)
      f.write_small("/resamples/bootstrap_counts", count, {Bb, rs.m});
  }
}

// The outputs of scores.h5 that encode fills chunk by chunk (created collectively).
struct Outputs {
  std::vector<io::Dataset> kind; // per kind: r, r_normalised, r2, alpha (+ a prediction per layer)
  std::vector<io::Dataset> exceed; // per kind
  std::vector<io::Dataset> peak;   // per kind: voxel_peak_p
  std::vector<io::Dataset> fold;   // per kind: K-fold's fold_r
  std::vector<io::Dataset> ja;     // --joint: /joint/activations/{r, r2, alpha}
  std::vector<io::Dataset> ju;     // --joint: /unique_gradients/{t, dr2, r2_joint, shared, ...}
  std::vector<io::Dataset> ju_pred;
  std::optional<io::Dataset> ju_ci, ju_exceed, ju_peak, ja_layer, nc, split_half;
};

// Creates an output dataset, or opens it in a resumed output, which has them all.
struct OutputMaker {
  const io::File& f;
  bool resumed;
  io::Dataset operator()(const std::string& name, io::DType type,
                         const std::vector<std::int64_t>& dims,
                         const std::vector<std::int64_t>& chunks = {}) const {
    return resumed ? f.dataset(name) : f.create_dataset(name, type, dims, chunks);
  }
};

// Not collective. Size and modification time of a file: a changed input invalidates a partial
// output.
std::string file_stamp(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0)
    return path + ":missing";
  return path + ":" + std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec);
}

// One round's targets: columns t0 .. t0 + t of the responses, repetitions averaged and centred
// with the training means (ytr [n, t], yte [m, t]), and their noise ceilings.
struct Chunk {
  std::int64_t t0 = 0, t = 0;
  std::vector<double> ytr, yte, nc, split_half;
};

// --joint, per chunk: the activation model chosen per target, the targets of each R_k and which
// R_k some target of this round chose on any rank.
struct ActivationModel {
  RidgeScores scores;
  std::vector<std::int32_t> layer;                 // per target: k - 1 (-1: all layers)
  std::vector<std::vector<std::int64_t>> group_of; // per k: its targets
  std::vector<int> present;                        // per k: chosen on some rank
};

class Encoder {
public:
  Encoder(const EncodeOptions& opt, MPI_Comm comm);
  void run();

private:
  void read_inputs();
  void make_groups();
  void plan();
  void write_attributes(const io::File& f) const;
  std::string resume_key() const;
  std::unique_ptr<io::OutputFile> open_output(std::int64_t& rounds_done);
  void create_outputs(const io::File& f, bool resumed);
  void create_joint_outputs(const io::File& f, bool resumed);
  void checkpoint(io::File& f, std::int64_t rounds_done);
  Chunk read_chunk(std::int64_t u0, std::int64_t u1);
  void fit_chunk(const Chunk& ch);
  void fit_kind(std::int64_t k, const Chunk& ch, std::vector<double>& r2_grad);
  RidgeScores fit(const Side& side, const std::vector<double>& y_tr,
                  const std::vector<double>& y_te, std::int64_t tt,
                  const std::vector<double>& grid) const;
  ActivationModel choose_activation_model(const Chunk& ch);
  RidgeScores fit_joint_weight(const Chunk& ch, const ActivationModel& am, std::int64_t l,
                               std::int64_t w);
  void fit_joint(const Chunk& ch, const std::vector<double>& r2_grad);
  void warn_excluded();

  const EncodeOptions& opt_;
  MPI_Comm comm_;
  int me_, p_;
  std::vector<double> alphas_, jw_;
  // --joint: the joint design of weight w is fitted with the penalties alpha w, so that its
  // activation band's penalty (alpha w / w = alpha) runs over the same grid as the activation
  // models' (a joint model cannot win by a better-tuned activation penalty alone) and the
  // gradient band's is alpha w / (1 - w).
  std::vector<std::vector<double>> joint_alphas_;
  io::File ff_, bf_;
  io::FeaturesInfo fi_;
  io::BrainInfo bi_;
  std::vector<std::int64_t> trial_stim_;
  ImageSplit split_;
  std::int64_t n_ = 0, m_ = 0, nf_ = 0;
  bool meg_ = false, nulls_ = false, voxel_peaks_ = false;
  // Groups of targets for the hierarchy statistics: the ROI of each voxel, or the time point of
  // each (sensor, time) target.
  std::vector<std::int32_t> group_;
  std::int64_t G_ = 0;
  Resamples rs_;
  Layout lay_;
  MemoryPlan mp_;
  std::int64_t units_ = 0, per_unit_ = 1, rounds_ = 0;
  mpi::Block ub_;
  Outputs o_;
  std::vector<NullAccumulator> acc_;
  // --joint: the B bootstrap count vectors of the unique-variance null (nulls.hpp)
  std::vector<std::uint32_t> null_counts_;
  std::unique_ptr<TrainingSides> sides_;
  std::optional<io::Dataset> resp_; // /brain/responses
  std::int64_t constant_ = 0, nonfinite_ = 0;
  std::vector<std::int64_t> nonfinite_examples_;
  Progress* progress_ = nullptr; // counts target fits
  // float32 selection: target fits of this run, and those rechecked in float64 (a diagnostic:
  // not checkpointed, so a resumed run counts its own rounds)
  mutable std::int64_t fits_ = 0, rechecked_ = 0;
  std::string key_; // the resume key of this run (open_output)
};

Encoder::Encoder(const EncodeOptions& opt, MPI_Comm comm)
    : opt_(opt), comm_(comm), me_(mpi::rank(comm)), p_(mpi::size(comm)),
      alphas_(opt.alphas.empty() ? default_alphas() : opt.alphas),
      jw_(opt.joint_weights.empty() ? default_joint_weights() : opt.joint_weights),
      ff_(io::File::open(opt.features, comm)), bf_(io::File::open(opt.brain, comm)) {
  for (double w : jw_) {
    joint_alphas_.emplace_back(alphas_);
    for (double& a : joint_alphas_.back())
      a *= w;
  }
  read_inputs();
  make_groups();
  plan();
}

// 1.-2. Inputs, checked against each other, and the train/test/fold split of the images.
void Encoder::read_inputs() {
  fi_ = with_context("while checking features " + opt_.features,
                     [&] { return io::check_features(ff_); });
  bi_ = with_context("while checking brain " + opt_.brain,
                     [&] { return io::check_brain(bf_, -1, false); });
  if (bi_.max_stimulus >= fi_.n)
    throw UsageError(opt_.features + " has " + std::to_string(fi_.n) + " images but " + opt_.brain +
                     " shows stimulus " + std::to_string(bi_.max_stimulus) +
                     ": the feature and brain image counts disagree (made from different "
                     "stimuli?)");
  trial_stim_ = bf_.dataset("/brain/trial_stimulus").read_all<std::int64_t>();
  const auto test_list = bf_.dataset("/brain/test_stimuli").read_all<std::int64_t>();
  split_ = split_images(trial_stim_, test_list, fi_.n, opt_);
  n_ = split_.n();
  m_ = split_.m();
  nf_ = opt_.alpha_cv == AlphaCV::kfold ? opt_.folds : 0;
  meg_ = bi_.modality == "meg";
  nulls_ = opt_.permutations > 0 || opt_.bootstraps > 0;
  voxel_peaks_ = !meg_ && opt_.bootstraps > 0;
}

void Encoder::make_groups() {
  if (meg_) {
    G_ = bi_.times;
    group_.resize(static_cast<size_t>(bi_.targets));
    for (std::int64_t c = 0; c < bi_.targets; ++c)
      group_[c] = std::int32_t(c % bi_.times);
  } else {
    const auto roi = bf_.dataset("/brain/roi").read_all<std::int64_t>();
    G_ = bf_.dataset("/brain/roi_names").shape()[0];
    group_.assign(roi.begin(), roi.end());
  }
  rs_ = make_resamples(m_, opt_.permutations, opt_.bootstraps, opt_.seed);
}

// 3. This rank's targets: a block of voxels, or of sensors with all their times, processed in
//    chunks that fit the memory budget.
void Encoder::plan() {
  units_ = meg_ ? bi_.sensors : bi_.targets;
  per_unit_ = meg_ ? bi_.times : 1;
  ub_ = mpi::block_of(units_, p_, me_);
  lay_ = make_layout(fi_, opt_, std::int64_t(alphas_.size()), std::int64_t(jw_.size()), n_,
                     ff_.exists("/nuisance/loss") && ff_.exists("/nuisance/grad_norm"));
  double memory_gb = opt_.memory_gb;
  if (memory_gb == 0) // the default: 80% of the node's memory shared by its ranks
    memory_gb = default_memory_budget(mpi::node_size(comm_)) / double(1 << 30);
  const double budget = memory_gb * double(1 << 30);
  // the largest rank's share, so that every rank makes the same plan (caching is collective)
  mp_ = plan_memory(lay_, split_, opt_, bi_.trials, G_, per_unit_, meg_, fi_.n, budget,
                    (units_ + p_ - 1) / p_, bi_.targets);
  rounds_ = (ub_.size() + mp_.chunk_units - 1) / mp_.chunk_units;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &rounds_, 1, MPI_INT64_T, MPI_MAX, comm_));
  GM_INFO("encode: " << lay_.K << " kinds x " << lay_.L << " layers, " << bi_.targets
                     << " targets (" << bi_.modality << "), " << n_ << " training / " << m_
                     << " test images, " << lay_.A << " alphas, " << p_ << " ranks");
  GM_INFO("encode: memory per rank: training side "
          << format_bytes(double(mp_.basis_bytes))
          << (mp_.cache ? " (cached)" : " (recomputed per chunk)") << ", "
          << mp_.per_target * per_unit_ << " bytes per target unit; budget " << format_bytes(budget)
          << " -> " << rounds_ << " round(s) of up to " << mp_.chunk_units << " units");
  if (!mp_.cache)
    GM_WARN("encode: the training side (" << format_bytes(double(mp_.basis_bytes))
                                          << ") exceeds half the memory budget; it is "
                                          << "recomputed for each chunk");
}

void Encoder::write_attributes(const io::File& f) const {
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "modality", bi_.modality);
  f.set_attr("/", "features", opt_.features);
  f.set_attr("/", "brain", opt_.brain);
  f.set_attr("/", "layers", fi_.layers);
  f.set_attr("/", "alphas", alphas_);
  f.set_attr("/", "alpha_cv", std::string(name(opt_.alpha_cv)));
  f.set_attr("/", "precision", std::string(name(opt_.precision)));
  f.set_attr("/", "solver", std::string(name(opt_.solver)));
  f.set_attr("/", "n_train", n_);
  f.set_attr("/", "n_test", m_);
  if (meg_)
    f.set_attr("/", "target_shape", std::vector<std::int64_t>{bi_.sensors, bi_.times});
  f.set_attr("/", "joint", std::int64_t{lay_.joint ? 1 : 0});
  if (lay_.joint) {
    f.set_attr("/", "joint_weights", jw_);
    f.set_attr("/", "joint_activation_dims", lay_.pa_layers);
    f.set_attr("/", "joint_nuisance_columns", lay_.nq);
  }
}

// 4. Outputs (collective creation).
void Encoder::create_outputs(const io::File& f, bool resumed) {
  const std::int64_t L = lay_.L, T = bi_.targets, K = lay_.K;
  const OutputMaker make{f, resumed};
  const std::vector<std::int64_t> chunk{L, std::min<std::int64_t>(T, 4096)};
  for (const auto& kind : fi_.kinds) {
    for (const char* name : {"r", "r_normalised", "r2", "alpha"})
      o_.kind.push_back(make("/" + kind + "/" + name, io::DType::f32, {L, T}, chunk));
    if (opt_.store_predictions)
      for (const auto& layer : fi_.layers)
        o_.kind.push_back(make("/" + kind + "/prediction/" + layer, io::DType::f32, {m_, T}));
  }
  for (std::int64_t k = 0; voxel_peaks_ && k < K; ++k)
    o_.peak.push_back(make("/" + fi_.kinds[k] + "/voxel_peak_p", io::DType::f32, {L, T}, chunk));
  if (opt_.permutations > 0)
    for (const auto& kind : fi_.kinds)
      o_.exceed.push_back(make("/" + kind + "/exceed", io::DType::i32, {L, T}, chunk));
  if (lay_.joint)
    create_joint_outputs(f, resumed);
  const bool clusters = meg_ && opt_.permutations > 0 && opt_.cluster_p > 0;
  const double cluster_r = clusters ? cluster_threshold(m_, opt_.cluster_p) : 0.0;
  for (std::int64_t kl = 0; nulls_ && kl < (K + (lay_.joint ? 1 : 0)) * L; ++kl) {
    // (no clusters for the unique kind: its statistic is a t, not an r)
    acc_.emplace_back(rs_, int(G_), clusters && kl < K * L ? T : 0, float(cluster_r));
  }
  if (lay_.joint)
    null_counts_ = null_bootstrap_counts(m_, opt_.permutations, opt_.seed);
  // K-fold: the held-out Pearson r of every fold at the target's chosen alpha.
  for (std::int64_t k = 0; nf_ > 0 && k < K; ++k)
    o_.fold.push_back(make("/" + fi_.kinds[k] + "/fold_r", io::DType::f32, {nf_, L, T},
                           {nf_, L, std::min<std::int64_t>(T, 4096)}));
  o_.nc = make("/noise_ceiling/nc", io::DType::f32, {T});
  o_.split_half = make("/noise_ceiling/split_half", io::DType::f32, {T});
}

// --joint: the activation model's scores [T], and the unique kind [L, T] (docs/statistics.md,
// "Unique variance"): t, the bootstrap-t statistic of the null; dR^2, the joint R^2, the shared
// part, the chosen band weight and alpha; the 95% bootstrap interval of dR^2 [2, L, T].
void Encoder::create_joint_outputs(const io::File& f, bool resumed) {
  const std::int64_t L = lay_.L, T = bi_.targets;
  const OutputMaker make{f, resumed};
  const std::vector<std::int64_t> chunk{L, std::min<std::int64_t>(T, 4096)};
  for (const char* name : {"r", "r2", "alpha"})
    o_.ja.push_back(make(std::string("/joint/activations/") + name, io::DType::f32, {T}));
  o_.ja_layer = make("/joint/activations/layer", io::DType::i32, {T});
  for (const char* name : {"t", "dr2", "r2_joint", "shared", "weight", "alpha"})
    o_.ju.push_back(make(std::string("/unique_gradients/") + name, io::DType::f32, {L, T}, chunk));
  if (opt_.bootstraps > 0)
    o_.ju_ci = make("/unique_gradients/dr2_ci", io::DType::f32, {2, L, T});
  if (opt_.permutations > 0)
    o_.ju_exceed = make("/unique_gradients/exceed", io::DType::i32, {L, T}, chunk);
  if (voxel_peaks_)
    o_.ju_peak = make("/unique_gradients/voxel_peak_p", io::DType::f32, {L, T}, chunk);
  for (const auto& layer : fi_.layers)
    if (opt_.store_predictions)
      o_.ju_pred.push_back(make("/unique_gradients/prediction/" + layer, io::DType::f32, {m_, T}));
}

// Reads the responses of units u0 .. u1 (as stored: no HDF5 conversion, half the bytes of
// double), averages the repetitions of each image and centres with the training means.
Chunk Encoder::read_chunk(std::int64_t u0, std::int64_t u1) {
  Chunk ch;
  ch.t0 = u0 * per_unit_;
  const std::int64_t t = ch.t = (u1 - u0) * per_unit_, n = n_, m = m_;
  std::vector<float> raw;
  {
    ProfileEvent ev("gm.encode.read");
    raw = meg_ ? resp_->read<float>({0, u0, 0}, {t ? bi_.trials : 0, u1 - u0, bi_.times})
               : resp_->read<float>({0, u0}, {t ? bi_.trials : 0, u1 - u0});
  }
  ProfileEvent prep("gm.encode.prepare");
  // Targets with a NaN/Inf in any trial (e.g. voxels outside a subject's mask) are excluded:
  // zeroed, so that they are constant and score NaN, counted and reported. (`gradmap validate`
  // reports them as errors; encode reads the responses once and checks them here.)
  std::vector<std::uint8_t> bad(static_cast<size_t>(t), 0);
  for (std::int64_t k = 0; k < (t ? bi_.trials : 0); ++k)
    for (std::int64_t c = 0; c < t; ++c)
      bad[c] |= std::isfinite(raw[k * t + c]) ? 0 : 1;
  for (std::int64_t c = 0; c < t; ++c)
    if (bad[c]) {
      if (nonfinite_examples_.size() < 5)
        nonfinite_examples_.push_back(ch.t0 + c);
      ++nonfinite_;
      for (std::int64_t k = 0; k < bi_.trials; ++k)
        raw[k * t + c] = 0.0f;
    }
  ch.ytr.assign(static_cast<size_t>(n * t), 0.0);
  ch.yte.assign(static_cast<size_t>(m * t), 0.0);
  for (std::int64_t k = 0; k < bi_.trials && t > 0; ++k) {
    const std::int64_t img = trial_stim_[k];
    double* dst =
        split_.is_test[img] ? &ch.yte[split_.row_of[img] * t] : &ch.ytr[split_.row_of[img] * t];
    const double w = 1.0 / double(split_.count[img]);
    for (std::int64_t c = 0; c < t; ++c)
      dst[c] += w * raw[k * t + c];
  }
  noise_ceiling(raw, t, trial_stim_, split_.test, ch.nc, ch.split_half);
  // Centre with the training means (row-major passes; per column the order of summation is
  // the row order, as in a column loop).
  std::vector<double> mean(static_cast<size_t>(t), 0.0), var(static_cast<size_t>(t), 0.0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < t; ++c)
      mean[c] += ch.ytr[i * t + c];
  for (std::int64_t c = 0; c < t; ++c)
    mean[c] /= double(n);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < t; ++c) {
      ch.ytr[i * t + c] -= mean[c];
      var[c] += ch.ytr[i * t + c] * ch.ytr[i * t + c];
    }
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < t; ++c)
      ch.yte[i * t + c] -= mean[c];
  for (std::int64_t c = 0; c < t; ++c)
    constant_ += var[c] == 0 ? 1 : 0;
  return ch;
}

RidgeScores Encoder::fit(const Side& side, const std::vector<double>& y_tr,
                         const std::vector<double>& y_te, std::int64_t tt,
                         const std::vector<double>& grid) const {
  const Precision prec = opt_.precision;
  RidgeScores sc = side.gram ? fit_kfold_gram(side.gb, y_tr, y_te, tt, grid, prec)
                   : opt_.alpha_cv == AlphaCV::kfold
                       ? fit_kfold(side.basis, side.folds, y_tr, y_te, tt, grid, prec)
                       : fit_loo(side.basis, y_tr, y_te, tt, grid, prec);
  if (progress_)
    progress_->advance(tt);
  fits_ += tt;
  rechecked_ += sc.rechecked;
  return sc;
}

// 5. Fits every layer of kind k on this chunk and writes the chunk's columns; keeps the
// gradients' R^2 (r2_grad [L, t]) for the shared part of --joint.
void Encoder::fit_kind(std::int64_t k, const Chunk& ch, std::vector<double>& r2_grad) {
  const std::int64_t L = lay_.L, t = ch.t, t0 = ch.t0, Bb = opt_.bootstraps;
  std::vector<std::vector<float>> buf(4, std::vector<float>(static_cast<size_t>(L * t)));
  std::vector<std::vector<float>> preds;
  std::vector<std::int32_t> exceed(static_cast<size_t>(L * t), -1);
  std::vector<float> fold_r(static_cast<size_t>(nf_ * L * t));
  std::vector<float> boot_r(voxel_peaks_ ? static_cast<size_t>(L * Bb * t) : 0);
  for (std::int64_t l = 0; l < L; ++l) {
    Side fresh;
    const RidgeScores sc = fit(sides_->kind(k, l, fresh), ch.ytr, ch.yte, t, alphas_);
    if (k == lay_.kg)
      std::copy(sc.r2.begin(), sc.r2.end(), r2_grad.begin() + l * t);
    for (std::int64_t c = 0; c < t; ++c) {
      buf[0][l * t + c] = float(sc.r[c]);
      // r normalised by sqrt(NC), the ceiling of r for the averaged test responses.
      buf[1][l * t + c] = ch.nc[c] > 0 ? float(sc.r[c] / std::sqrt(ch.nc[c])) : NAN;
      buf[2][l * t + c] = float(sc.r2[c]);
      buf[3][l * t + c] = float(sc.alpha[c]);
    }
    for (std::int64_t g = 0; g < nf_; ++g) // K-fold: sc.fold_r is [nf, t]
      for (std::int64_t c = 0; c < t; ++c)
        fold_r[(g * L + l) * t + c] = float(sc.fold_r[g * t + c]);
    if (opt_.store_predictions)
      preds.emplace_back(sc.prediction.begin(), sc.prediction.end());
    if (nulls_)
      accumulate_nulls(rs_, sc.prediction, ch.yte, t, group_.data() + t0, acc_[k * L + l],
                       exceed.data() + l * t, t0,
                       voxel_peaks_ ? boot_r.data() + l * Bb * t : nullptr);
  }
  if (voxel_peaks_) {
    const auto pk = stats::target_peak_pvalues(buf[0], boot_r, L, Bb, t);
    o_.peak[k].write(pk.data(), {0, t0}, {t ? L : 0, t});
  }
  const size_t base = size_t(k) * (4 + (opt_.store_predictions ? size_t(L) : 0));
  for (int o = 0; o < 4; ++o)
    o_.kind[base + o].write(buf[o].data(), {0, t0}, {t ? L : 0, t});
  for (std::int64_t l = 0; opt_.store_predictions && l < L; ++l)
    o_.kind[base + 4 + l].write(preds[l].data(), {0, t0}, {t ? m_ : 0, t});
  if (opt_.permutations > 0)
    o_.exceed[k].write(exceed.data(), {0, t0}, {t ? L : 0, t});
  if (nf_ > 0)
    o_.fold[k].write(fold_r.data(), {0, 0, t0}, {t ? nf_ : 0, t ? L : 0, t});
}

// --joint: the activation model, per target the best (by the cross-validation criterion) of all
// layers together (A) and each layer alone (with the nuisance block). Collective: the R_k that a
// target of this round chose on any rank get their joint designs built (reading the features
// collectively) by every rank.
ActivationModel Encoder::choose_activation_model(const Chunk& ch) {
  const std::int64_t L = lay_.L, t = ch.t;
  ActivationModel am;
  std::vector<RidgeScores> cand;
  for (std::int64_t k = 0; k <= L; ++k) {
    Side fresh;
    cand.push_back(fit(sides_->reference(k, fresh), ch.ytr, ch.yte, t, alphas_));
  }
  std::vector<std::int32_t> chosen;
  am.scores = select_per_target(cand, m_, t, chosen);
  am.layer.resize(static_cast<size_t>(t));
  am.group_of.resize(static_cast<size_t>(L + 1));
  for (std::int64_t c = 0; c < t; ++c) {
    am.layer[c] = chosen[c] - 1; // -1: all layers (or undefined)
    if (chosen[c] >= 0)
      am.group_of[size_t(chosen[c])].push_back(c);
  }
  am.present.resize(static_cast<size_t>(L + 1));
  for (std::int64_t k = 0; k <= L; ++k)
    am.present[size_t(k)] = am.group_of[size_t(k)].empty() ? 0 : 1;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, am.present.data(), int(L + 1), MPI_INT, MPI_MAX, comm_));
  sides_->prepare_joint(am.present);
  return am;
}

// The joint candidate of band weight w for layer l: for each target, [sqrt(w) R_k,
// sqrt(1 - w) G_l] with its own R_k, fitted per group of targets sharing k and scattered back.
RidgeScores Encoder::fit_joint_weight(const Chunk& ch, const ActivationModel& am, std::int64_t l,
                                      std::int64_t w) {
  const std::int64_t t = ch.t, n = n_, m = m_;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  RidgeScores full;
  full.alpha.assign(static_cast<size_t>(t), nan);
  full.r = full.r2 = full.cv_error = full.alpha;
  full.prediction.assign(static_cast<size_t>(m * t), 0.0);
  full.fold_r.assign(static_cast<size_t>(nf_ * t), nan);
  for (std::int64_t k = 0; k <= lay_.L; ++k) {
    if (!am.present[size_t(k)])
      continue;
    const auto& cols = am.group_of[size_t(k)];
    const std::int64_t tk = std::int64_t(cols.size());
    Side fresh; // uncached: built on every rank (the reads are collective)
    const Side& side = sides_->joint(k, l, w, fresh);
    if (tk == 0)
      continue;
    std::vector<double> ytk(static_cast<size_t>(n * tk)), yek(static_cast<size_t>(m * tk));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < tk; ++j)
        ytk[i * tk + j] = ch.ytr[i * t + cols[j]];
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < tk; ++j)
        yek[i * tk + j] = ch.yte[i * t + cols[j]];
    const RidgeScores part = fit(side, ytk, yek, tk, joint_alphas_[size_t(w)]);
    for (std::int64_t j = 0; j < tk; ++j)
      copy_target(part, tk, j, full, t, cols[j], m);
  }
  return full;
}

// --joint: each layer's joint model (candidates: the activation model, then each w), the
// gradients' unique variance dR^2, its bootstrap-t statistic and null, and the interval
// (nulls.hpp); written for the chunk's columns.
void Encoder::fit_joint(const Chunk& ch, const std::vector<double>& r2_grad) {
  const std::int64_t L = lay_.L, t = ch.t, t0 = ch.t0, m = m_, Bb = opt_.bootstraps;
  const ActivationModel am = choose_activation_model(ch);
  const RidgeScores& sa = am.scores;
  o_.ja_layer->write(am.layer.data(), {t0}, {t});
  std::vector<double> ea(static_cast<size_t>(m * t)); // the activation model's residuals
  for (std::int64_t i = 0; i < m * t; ++i)
    ea[i] = ch.yte[i] - sa.prediction[i];
  const std::vector<double>* scores[3] = {&sa.r, &sa.r2, &sa.alpha};
  for (int o = 0; o < 3; ++o) {
    const std::vector<float> v(scores[o]->begin(), scores[o]->end());
    o_.ja[o].write(v.data(), {t0}, {t});
  }
  std::vector<std::vector<float>> jbuf(6, std::vector<float>(static_cast<size_t>(L * t)));
  std::vector<float> ci(static_cast<size_t>(2 * L * t), NAN);
  std::vector<std::int32_t> exceed(static_cast<size_t>(L * t), -1);
  std::vector<float> boot_r(voxel_peaks_ ? static_cast<size_t>(L * Bb * t) : 0);
  std::vector<double> delta(static_cast<size_t>(m * t));
  for (std::int64_t l = 0; l < L; ++l) {
    std::vector<RidgeScores> cand{sa};
    for (std::int64_t w = 0; w < lay_.W; ++w)
      cand.push_back(fit_joint_weight(ch, am, l, w));
    std::vector<std::int32_t> chosen;
    const RidgeScores sj = select_per_target(cand, m, t, chosen);
    cand.clear();
    for (std::int64_t i = 0; i < m * t; ++i)
      delta[i] = sj.prediction[i] - sa.prediction[i];
    std::vector<std::uint8_t> defined(static_cast<size_t>(t));
    for (std::int64_t c = 0; c < t; ++c) {
      defined[c] = std::isfinite(sa.r2[c]) ? 1 : 0;
      const std::int32_t k = chosen[c];
      jbuf[2][l * t + c] = float(sj.r2[c]);
      jbuf[3][l * t + c] = float(sa.r2[c] + r2_grad[l * t + c] - sj.r2[c]);
      jbuf[4][l * t + c] = k < 0 || !defined[c] ? NAN : k == 0 ? 1.0f : float(jw_[size_t(k - 1)]);
      jbuf[5][l * t + c] = float(sj.alpha[c]);
    }
    accumulate_unique(rs_, null_counts_, ch.yte, ea, delta, t, group_.data() + t0, defined.data(),
                      nulls_ ? &acc_[size_t(lay_.K * L + l)] : nullptr, exceed.data() + l * t,
                      &jbuf[0][size_t(l * t)], &jbuf[1][size_t(l * t)], &ci[size_t(l * t)],
                      &ci[size_t((L + l) * t)],
                      voxel_peaks_ ? boot_r.data() + l * Bb * t : nullptr);
    if (opt_.store_predictions) {
      const std::vector<float> pf(sj.prediction.begin(), sj.prediction.end());
      o_.ju_pred[size_t(l)].write(pf.data(), {0, t0}, {t ? m : 0, t});
    }
  }
  for (int o = 0; o < 6; ++o)
    o_.ju[size_t(o)].write(jbuf[size_t(o)].data(), {0, t0}, {t ? L : 0, t});
  if (opt_.bootstraps > 0)
    o_.ju_ci->write(ci.data(), {0, 0, t0}, {t ? 2 : 0, t ? L : 0, t});
  if (opt_.permutations > 0)
    o_.ju_exceed->write(exceed.data(), {0, t0}, {t ? L : 0, t});
  if (voxel_peaks_) {
    const auto pk = stats::target_peak_pvalues(jbuf[1], boot_r, L, Bb, t);
    o_.ju_peak->write(pk.data(), {0, t0}, {t ? L : 0, t});
  }
}

void Encoder::fit_chunk(const Chunk& ch) {
  std::vector<double> r2_grad(static_cast<size_t>(lay_.L * ch.t),
                              std::numeric_limits<double>::quiet_NaN()); // for the shared part
  for (std::int64_t k = 0; k < lay_.K; ++k)
    fit_kind(k, ch, r2_grad);
  if (lay_.joint)
    fit_joint(ch, r2_grad);
  const std::vector<float> ncf(ch.nc.begin(), ch.nc.end()),
      shf(ch.split_half.begin(), ch.split_half.end());
  o_.nc->write(ncf.data(), {ch.t0}, {ch.t});
  o_.split_half->write(shf.data(), {ch.t0}, {ch.t});
}

// Collective: the counts of excluded and constant targets over all ranks.
void Encoder::warn_excluded() {
  constant_ -= nonfinite_; // the excluded targets are constant now; count them once
  const std::int64_t nonfinite = mpi::sum(comm_, nonfinite_);
  if (nonfinite > 0) {
    std::string ex;
    for (auto c : nonfinite_examples_)
      ex += (ex.empty() ? "" : ", ") + std::to_string(c);
    GM_WARN("encode: " << nonfinite << " targets of " << opt_.brain
                       << " have NaN/Inf responses and are excluded (scores NaN); e.g. "
                       << (ex.empty() ? std::string("on other ranks") : ex));
  }
  const std::int64_t constant = mpi::sum(comm_, constant_);
  if (constant > 0)
    GM_WARN("encode: " << constant << " targets are constant over the training images; their "
                       << "scores are NaN");
}

// Every option and input that changes the numbers, and the layout of the rounds: a partial
// output is resumed only under the same key.
std::string Encoder::resume_key() const {
  static_assert(sizeof(std::string) != 32 || sizeof(EncodeOptions) == 240,
                "EncodeOptions changed: decide whether the new option belongs in resume_key()");
  std::string k = "features=" + file_stamp(opt_.features) + ";brain=" + file_stamp(opt_.brain);
  for (double a : alphas_)
    k += ";alpha=" + std::to_string(a);
  for (double w : jw_)
    k += ";joint_weight=" + std::to_string(w);
  k += ";alpha_cv=" + std::string(name(opt_.alpha_cv)) + ";folds=" + std::to_string(opt_.folds) +
       ";seed=" + std::to_string(opt_.seed) +
       ";store_predictions=" + std::to_string(opt_.store_predictions) +
       ";precision=" + name(opt_.precision) + ";solver=" + name(opt_.solver) +
       ";permutations=" + std::to_string(opt_.permutations) +
       ";bootstraps=" + std::to_string(opt_.bootstraps) +
       ";store_resamples=" + std::to_string(opt_.store_resamples) +
       ";cluster_p=" + std::to_string(opt_.cluster_p) + ";joint=" + std::to_string(opt_.joint) +
       ";joint_activation_dims=" + std::to_string(opt_.joint_activation_dims) +
       ";joint_nuisance=" + std::to_string(opt_.joint_nuisance);
  // not in the key: out, memory_gb and max_chunk (they act through the round layout below)
  return k + ";ranks=" + std::to_string(p_) + ";chunk_units=" + std::to_string(mp_.chunk_units) +
         ";rounds=" + std::to_string(rounds_);
}

// Collective. OUT.partial resumed when its key matches and every rank has its checkpoint of the
// rounds it records as done (rounds_done > 0); else a new one (rounds_done = 0).
std::unique_ptr<io::OutputFile> Encoder::open_output(std::int64_t& rounds_done) {
  key_ = resume_key();
  const std::string& key = key_;
  rounds_done = 0;
  std::unique_ptr<io::OutputFile> out;
  if (opt_.resume && io::OutputFile::has_partial(opt_.out)) {
    bool ok = false;
    try {
      out = std::make_unique<io::OutputFile>(io::OutputFile::resume(opt_.out, comm_));
      const io::File& f = out->file();
      if (f.has_attr("/progress", "key") && f.attr_string("/progress", "key") == key) {
        rounds_done = f.attr_int("/progress", "rounds_done");
        create_outputs(f, true);
        RankState st{&acc_, &constant_, &nonfinite_, &nonfinite_examples_};
        ok = rounds_done > 0 && load_checkpoint(opt_.out, me_, rounds_done, key, st);
      }
    } catch (const Error& e) {
      GM_WARN("encode: cannot resume " << io::OutputFile::partial_name(opt_.out) << " (" << e.what()
                                       << "); starting over");
    }
    if (mpi::all_of(comm_, ok)) {
      GM_INFO("encode: resuming " << io::OutputFile::partial_name(opt_.out) << ": " << rounds_done
                                  << "/" << rounds_ << " rounds already done");
      return out;
    }
    out.reset();
    rounds_done = 0;
    acc_.clear();
    constant_ = nonfinite_ = 0;
    nonfinite_examples_.clear();
    o_ = Outputs{};
  }
  remove_checkpoints(opt_.out, me_);
  out = std::make_unique<io::OutputFile>(opt_.out, comm_);
  const io::File& f = out->file();
  write_attributes(f);
  create_outputs(f, false);
  f.create_group("/progress");
  f.set_attr("/progress", "key", key);
  f.set_attr("/progress", "rounds_done", std::int64_t{0});
  f.flush();
  return out;
}

// Collective. After a round: its rows reach the file, each rank saves its accumulators, then
// the file records the round as done (a kill in between leaves the older record, whose
// checkpoints are still there: they are removed only after the new record).
void Encoder::checkpoint(io::File& f, std::int64_t rounds_done) {
  f.flush();
  save_checkpoint(opt_.out, me_, rounds_done, key_,
                  RankState{&acc_, &constant_, &nonfinite_, &nonfinite_examples_});
  GM_CHECK_MPI(MPI_Barrier(comm_));
  f.set_attr("/progress", "rounds_done", rounds_done);
  f.flush();
  std::error_code ec;
  std::filesystem::remove(checkpoint_path(opt_.out, me_, rounds_done - 1), ec);
}

void Encoder::run() {
  sides_ = std::make_unique<TrainingSides>(opt_, ff_, fi_, split_, lay_, jw_, mp_.cache, comm_);
  std::int64_t rounds_done = 0;
  const std::unique_ptr<io::OutputFile> out = open_output(rounds_done);
  io::File& f = out->file();
  resp_ = bf_.dataset("/brain/responses");
  // Progress in target fits: every kind and layer, and with --joint the activation candidates
  // (all layers, each layer) and each layer's band weights.
  const std::int64_t fits_per_target =
      lay_.K * lay_.L + (lay_.joint ? lay_.L + 1 + lay_.L * lay_.W : 0);
  const std::int64_t first = std::min(ub_.end, ub_.begin + rounds_done * mp_.chunk_units);
  const std::int64_t remaining = (ub_.end - first) * per_unit_ * fits_per_target;
  const std::int64_t all_remaining = mpi::sum(comm_, remaining);
  Progress progress("encode", remaining, "target fits",
                    remaining > 0 ? double(all_remaining) / double(remaining) : 1.0);
  progress_ = &progress;
  for (std::int64_t round = rounds_done; round < rounds_; ++round) {
    const std::int64_t u0 = std::min(ub_.end, ub_.begin + round * mp_.chunk_units);
    const std::int64_t u1 = std::min(ub_.end, u0 + mp_.chunk_units);
    fit_chunk(read_chunk(u0, u1));
    checkpoint(f, round + 1);
    // Fault injection for the resume tests: every rank dies by SIGKILL right after this round is
    // recorded, as a killed job would (a deterministic point; polling for files races).
    if (const char* k = std::getenv("GRADMAP_TEST_KILL_AFTER_ROUND");
        k && std::atoll(k) == round + 1)
      std::raise(SIGKILL);
    signals::check(comm_, "during encode (" + opt_.out + ".partial holds " +
                              std::to_string(round + 1) + "/" + std::to_string(rounds_) +
                              " rounds: a rerun resumes)");
  }
  progress.finish();
  progress_ = nullptr;
  if (opt_.precision == Precision::float32) {
    const std::int64_t fits = mpi::sum(comm_, fits_), rechecked = mpi::sum(comm_, rechecked_);
    GM_INFO("encode: float32 alpha selection: " << rechecked << " of " << fits
                                                << " target fits rechecked in float64");
  }
  warn_excluded();
  if (nulls_) {
    std::vector<std::string> names = fi_.kinds;
    if (lay_.joint)
      names.push_back("unique_gradients");
    write_nulls(f, opt_, rs_, names, lay_.L, G_, acc_, meg_, bf_, comm_);
  }
  if (!meg_) // the ROI of every voxel (-1: none), for the voxel-level tests' per-ROI counts
    f.write_small("/groups/target", group_, {bi_.targets});
  f.write_small("/split/train_stimuli", split_.train, {n_});
  f.write_small("/split/test_stimuli", split_.test, {m_});
  if (opt_.alpha_cv == AlphaCV::kfold) {
    // fold of each training image (order of train_stimuli)
    f.write_small("/split/fold", split_.fold, {n_});
    f.set_attr("/", "folds", std::int64_t{opt_.folds});
  }
  f.remove("/progress"); // the resume record: not part of the scores
  out->commit();
  remove_checkpoints(opt_.out, me_);
  GM_INFO("encode: wrote " << opt_.out);
}

} // namespace

void encode(const EncodeOptions& opt, MPI_Comm comm) {
  validate(opt);
  StageTimer timer("encode");
  Encoder(opt, comm).run();
}

} // namespace gradmap::encoding
