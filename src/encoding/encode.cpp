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

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/encoding/clusters.hpp"
#include "gradmap/encoding/nulls.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "gradmap/sim/philox.hpp"
#include "gradmap/stats/divergence.hpp"

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

// Standardises the columns of x [N, p] with the mean and population std of the training rows;
// returns the training and test rows, and the number of columns constant over the training rows
// (set to 0).
std::int64_t standardise(const std::vector<float>& x, std::int64_t p,
                         const std::vector<std::int64_t>& train,
                         const std::vector<std::int64_t>& test, std::vector<double>& xtr,
                         std::vector<double>& xte) {
  const std::int64_t n = std::int64_t(train.size());
  std::vector<double> mean(size_t(p), 0.0), sd(size_t(p), 0.0);
  for (auto i : train)
    for (std::int64_t j = 0; j < p; ++j)
      mean[j] += x[i * p + j];
  for (auto& v : mean)
    v /= double(n);
  for (auto i : train)
    for (std::int64_t j = 0; j < p; ++j)
      sd[j] += (x[i * p + j] - mean[j]) * (x[i * p + j] - mean[j]);
  for (auto& v : sd)
    v = std::sqrt(v / double(n));
  auto fill = [&](const std::vector<std::int64_t>& rows, std::vector<double>& out) {
    out.assign(size_t(std::int64_t(rows.size()) * p), 0.0);
    for (size_t r = 0; r < rows.size(); ++r)
      for (std::int64_t j = 0; j < p; ++j)
        out[r * p + j] = sd[j] > 0 ? (x[rows[r] * p + j] - mean[j]) / sd[j] : 0.0;
  };
  fill(train, xtr);
  fill(test, xte);
  return std::count(sd.begin(), sd.end(), 0.0);
}

// Noise ceiling per target from the repetitions of the test images (Allen et al. 2022, NSD's
// ncsnr, generalised to responses that are not z-scored):
//   noise variance  s2n = mean over test images with >= 2 trials of their trial variance (ddof 1)
//   signal variance s2s = max(0, s2t - s2n), s2t the variance over all test trials (ddof 1)
//   ncsnr = sqrt(s2s / s2n);  NC = ncsnr^2 / (ncsnr^2 + mean_i 1/k_i)
// NC is the share of variance of the trial-averaged test responses that a perfect model could
// explain (a ceiling for R^2; sqrt(NC) for r). Split-half (MEG): per test image, the mean of
// its first and of its second half of trials, correlated over images; Spearman-Brown
// 2 r / (1 + r).
void noise_ceiling(const std::vector<float>& raw, std::int64_t t,
                   const std::vector<std::int64_t>& trial_stim,
                   const std::vector<std::int64_t>& test, std::vector<double>& nc,
                   std::vector<double>& split_half) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  nc.assign(static_cast<size_t>(t), nan);
  split_half.assign(static_cast<size_t>(t), nan);
  std::map<std::int64_t, std::vector<std::int64_t>> trials; // test image -> its trials
  for (auto i : test)
    trials[i];
  for (std::int64_t k = 0; k < std::int64_t(trial_stim.size()); ++k) {
    auto it = trials.find(trial_stim[k]);
    if (it != trials.end())
      it->second.push_back(k);
  }
  double inv_k = 0;
  std::int64_t all = 0, repeated = 0;
  for (const auto& [img, ks] : trials) {
    inv_k += 1.0 / double(ks.size());
    all += std::int64_t(ks.size());
    repeated += ks.size() >= 2 ? 1 : 0;
  }
  inv_k /= double(trials.size());
  if (repeated < 2)
    return; // no repetitions: no ceiling
  for (std::int64_t c = 0; c < t; ++c) {
    double s2n = 0, sum = 0, sum2 = 0;
    std::vector<double> h1, h2;
    for (const auto& [img, ks] : trials) {
      double m = 0;
      for (auto k : ks)
        m += raw[k * t + c] / double(ks.size());
      for (auto k : ks) {
        sum += raw[k * t + c];
        sum2 += double(raw[k * t + c]) * raw[k * t + c];
      }
      if (ks.size() < 2)
        continue;
      double v = 0;
      for (auto k : ks)
        v += (raw[k * t + c] - m) * (raw[k * t + c] - m);
      s2n += v / double(ks.size() - 1) / double(repeated);
      const size_t half = ks.size() / 2;
      double a = 0, b = 0;
      for (size_t j = 0; j < ks.size(); ++j)
        (j < half ? a : b) += raw[ks[j] * t + c];
      h1.push_back(a / double(half));
      h2.push_back(b / double(ks.size() - half));
    }
    const double s2t = (sum2 - sum * sum / double(all)) / double(all - 1);
    if (s2n > 0) {
      const double snr2 = std::max(0.0, s2t - s2n) / s2n;
      nc[c] = snr2 / (snr2 + inv_k);
    }
    std::vector<double> rr, unused;
    const std::int64_t nh = std::int64_t(h1.size());
    std::vector<double> p1(h1), p2(h2);
    score_columns(p1, p2, nh, 1, rr, unused);
    if (!std::isnan(rr[0]))
      split_half[c] = 2 * rr[0] / (1 + rr[0]);
  }
}

// Broadcasts integers from root.
void broadcast_ints(std::initializer_list<std::int64_t*> v, int root, MPI_Comm comm) {
  std::vector<std::int64_t> buf;
  for (auto* x : v)
    buf.push_back(*x);
  GM_CHECK_MPI(MPI_Bcast(buf.data(), int(buf.size()), MPI_INT64_T, root, comm));
  size_t i = 0;
  for (auto* x : v)
    *x = buf[i++];
}

// Broadcasts arrays from root, each resized to its size first, in pieces under 2^27 doubles.
void broadcast_arrays(std::initializer_list<std::pair<std::vector<double>*, std::int64_t>> arrays,
                      int root, MPI_Comm comm) {
  constexpr size_t piece = size_t(1) << 27;
  for (const auto& [v, size] : arrays) {
    v->resize(static_cast<size_t>(size));
    for (size_t o = 0; o < v->size(); o += piece)
      GM_CHECK_MPI(
          MPI_Bcast(v->data() + o, int(std::min(piece, v->size() - o)), MPI_DOUBLE, root, comm));
  }
}

// Broadcasts a basis from root.
void broadcast_basis(RidgeBasis& b, int root, MPI_Comm comm) {
  broadcast_ints({&b.n, &b.p, &b.r, &b.m}, root, comm);
  broadcast_arrays({{&b.u, b.n * b.r}, {&b.s, b.r}, {&b.test_v, b.m * b.r}}, root, comm);
  b.u32.assign(b.u.begin(), b.u.end());
}

// Broadcasts the all-rows part of a Gram basis from root (b.p known everywhere).
void broadcast_gram_full(GramBasis& b, int root, MPI_Comm comm) {
  broadcast_ints({&b.r, &b.m}, root, comm);
  broadcast_arrays({{&b.v, b.p * b.r}, {&b.s2, b.r}, {&b.test_v, b.m * b.r}}, root, comm);
}

// Broadcasts a Gram fold from root (p known everywhere).
void broadcast_gram_fold(GramFold& f, std::int64_t p, int root, MPI_Comm comm) {
  broadcast_ints({&f.begin, &f.end, &f.r}, root, comm);
  broadcast_arrays(
      {{&f.v, p * f.r}, {&f.s2, f.r}, {&f.mu, p}, {&f.sx, p}, {&f.vd, f.r}, {&f.tri, f.r * f.r}},
      root, comm);
  f.v32.assign(f.v.begin(), f.v.end());
  f.tri32.assign(f.tri.begin(), f.tri.end());
}

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

} // namespace

void encode(const EncodeOptions& opt, MPI_Comm comm) {
  validate(opt);
  StageTimer timer("encode");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  const std::vector<double> alphas = opt.alphas.empty() ? default_alphas() : opt.alphas;
  const std::vector<double> jw =
      opt.joint_weights.empty() ? default_joint_weights() : opt.joint_weights;
  // --joint: the joint design of weight w is fitted with the penalties alpha w, so that its
  // activation band's penalty (alpha w / w = alpha) runs over the same grid as the activation
  // models' (a joint model cannot win by a better-tuned activation penalty alone) and the
  // gradient band's is alpha w / (1 - w).
  std::vector<std::vector<double>> joint_alphas;
  for (double w : jw) {
    joint_alphas.emplace_back(alphas);
    for (double& a : joint_alphas.back())
      a *= w;
  }
  const Precision prec = opt.precision;

  // 1. Inputs.
  io::File ff = io::File::open(opt.features, comm);
  const io::FeaturesInfo fi = with_context("while checking features " + opt.features,
                                           [&] { return io::check_features(ff); });
  io::File bf = io::File::open(opt.brain, comm);
  const io::BrainInfo bi = with_context("while checking brain " + opt.brain,
                                        [&] { return io::check_brain(bf, -1, false); });
  if (bi.max_stimulus >= fi.n)
    throw UsageError(opt.features + " has " + std::to_string(fi.n) + " images but " + opt.brain +
                     " shows stimulus " + std::to_string(bi.max_stimulus) +
                     ": the feature and brain image counts disagree (made from different "
                     "stimuli?)");

  // 2. Images and the split.
  const auto trial_stim = bf.dataset("/brain/trial_stimulus").read_all<std::int64_t>();
  const auto test_list = bf.dataset("/brain/test_stimuli").read_all<std::int64_t>();
  const std::set<std::int64_t> test_set(test_list.begin(), test_list.end());
  std::vector<std::int64_t> count(size_t(fi.n), 0);
  for (auto s : trial_stim)
    ++count[s];
  std::vector<std::int64_t> train, test(test_list.begin(), test_list.end());
  for (std::int64_t i = 0; i < fi.n; ++i)
    if (count[i] > 0 && !test_set.count(i))
      train.push_back(i);
  const std::int64_t n = std::int64_t(train.size()), m = std::int64_t(test.size());
  if (n < 3 || m < 3)
    throw UsageError(opt.brain + ": " + std::to_string(n) + " training and " + std::to_string(m) +
                     " test images; ridge with leave-one-out needs at least 3 of each");
  // K-fold: training images dealt to folds by a seeded permutation (contiguous runs of it), the
  // same for every target, layer, kind and rank count.
  std::vector<std::int32_t> fold(static_cast<size_t>(n), 0);
  if (opt.alpha_cv == AlphaCV::kfold) {
    if (n < 2 * std::int64_t(opt.folds))
      throw UsageError(opt.brain + ": " + std::to_string(n) + " training images are too few for " +
                       std::to_string(opt.folds) + " folds (need at least 2 per fold)");
    std::vector<std::int64_t> perm(static_cast<size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
      perm[i] = i;
    sim::Philox rng(opt.seed, sim::Stream::folds);
    for (std::int64_t i = n - 1; i > 0; --i)
      std::swap(perm[i], perm[rng.below(std::uint32_t(i + 1))]);
    for (std::int64_t j = 0; j < n; ++j)
      fold[perm[j]] = std::int32_t(j * opt.folds / n);
  }
  // Internally the training rows are ordered by fold (then image), so that each fold's held-out
  // rows are contiguous (the Gram K-fold path multiplies them in place); /split/ keeps the image
  // order. fold_start[f] .. fold_start[f + 1]: the rows of fold f.
  std::vector<std::int64_t> rows(train);
  std::vector<std::int32_t> row_fold(fold);
  std::vector<std::int64_t> fold_start(static_cast<size_t>(opt.folds + 1), 0);
  if (opt.alpha_cv == AlphaCV::kfold) {
    std::vector<std::int64_t> idx(static_cast<size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
      idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(),
                     [&](std::int64_t a, std::int64_t b) { return fold[a] < fold[b]; });
    for (std::int64_t i = 0; i < n; ++i) {
      rows[i] = train[idx[i]];
      row_fold[i] = fold[idx[i]];
      ++fold_start[size_t(row_fold[i]) + 1];
    }
    for (int f = 0; f < opt.folds; ++f)
      fold_start[size_t(f) + 1] += fold_start[size_t(f)];
  }
  std::vector<std::int64_t> row_of(size_t(fi.n), -1); // image -> row in rows or test
  for (std::int64_t r = 0; r < n; ++r)
    row_of[rows[r]] = r;
  for (std::int64_t r = 0; r < m; ++r)
    row_of[test[r]] = r;

  // Groups of targets for the hierarchy statistics: the ROI of each voxel, or the time point of
  // each (sensor, time) target.
  const bool meg = bi.modality == "meg";
  std::vector<std::int32_t> group;
  std::int64_t G = 0;
  if (meg) {
    G = bi.times;
    group.resize(static_cast<size_t>(bi.targets));
    for (std::int64_t c = 0; c < bi.targets; ++c)
      group[c] = std::int32_t(c % bi.times);
  } else {
    const auto roi = bf.dataset("/brain/roi").read_all<std::int64_t>();
    G = bf.dataset("/brain/roi_names").shape()[0];
    group.assign(roi.begin(), roi.end());
  }
  const Resamples rs = make_resamples(m, opt.permutations, opt.bootstraps, opt.seed);

  // 3. This rank's targets: a block of voxels, or of sensors with all their times, processed in
  //    chunks that fit the memory budget.
  const std::int64_t units = meg ? bi.sensors : bi.targets, per_unit = meg ? bi.times : 1;
  const mpi::Block ub = mpi::block_of(units, p, me);
  const std::int64_t L = std::int64_t(fi.layers.size()), K = std::int64_t(fi.kinds.size());
  const std::int64_t A = std::int64_t(alphas.size());
  // K-fold with no more features than the smallest fold's training rows: the Gram form
  // (fit_kfold_gram), unless --solver dual asks for the kernel form.
  std::int64_t min_fold_train = n;
  for (int f = 0; f < opt.folds && opt.alpha_cv == AlphaCV::kfold; ++f)
    min_fold_train = std::min(min_fold_train, n - (fold_start[f + 1] - fold_start[f]));
  auto use_gram = [&](std::int64_t dim) {
    return opt.alpha_cv == AlphaCV::kfold &&
           (opt.solver == Solver::primal ||
            (opt.solver == Solver::automatic && dim <= min_fold_train));
  };
  // --joint: the activation block A (every layer's standardised activations, layer l's columns
  // scaled by 1 / sqrt(L p_l), so that each layer adds 1/L to its total variance; optionally its
  // first principal components) and, per layer and band weight w, the design
  // [sqrt(w) A, sqrt(1 - w) G_l / sqrt(p_l)].
  const bool joint = opt.joint;
  std::int64_t ka = -1, kg = -1;
  for (std::int64_t k = 0; k < K; ++k) {
    ka = fi.kinds[k] == "activations" ? k : ka;
    kg = fi.kinds[k] == "gradients" ? k : kg;
  }
  if (joint && (ka < 0 || kg < 0))
    throw UsageError("--joint: " + opt.features +
                     " must hold both activations and gradients (extract writes both)");
  const std::int64_t W = joint ? std::int64_t(jw.size()) : 0;
  std::int64_t pa_all = 0;
  for (auto d : fi.dims)
    pa_all += d;
  const bool reduce_a =
      joint && opt.joint_activation_dims > 0 && opt.joint_activation_dims < std::min(pa_all, n);
  // Nuisance features (extract's /nuisance: loss and per-layer gradient norms): one more part of
  // the activation block, of nq = L + 1 columns.
  const bool nuisance = joint && opt.joint_nuisance && ff.exists("/nuisance/loss") &&
                        ff.exists("/nuisance/grad_norm");
  const std::int64_t nq = nuisance ? L + 1 : 0, parts = L + (nuisance ? 1 : 0);
  const std::int64_t pa_layers = !joint ? 0 : reduce_a ? opt.joint_activation_dims : pa_all;
  const std::int64_t pa = pa_layers + nq;
  std::vector<std::int64_t> side_dims; // every (kind, layer); then A, then (layer, w)
  for (std::int64_t k = 0; k < K; ++k)
    side_dims.insert(side_dims.end(), fi.dims.begin(), fi.dims.end());
  if (joint) {
    // the activation models R_0 = A (all layers) and R_k = [layer k - 1, nuisance], then the
    // joint designs [R_k, G_l] for every k, l and w
    std::vector<std::int64_t> rd{pa};
    for (std::int64_t l = 0; l < L; ++l)
      rd.push_back(fi.dims[l] + nq);
    side_dims.insert(side_dims.end(), rd.begin(), rd.end());
    for (auto d : rd)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t w = 0; w < W; ++w)
          side_dims.push_back(d + fi.dims[l]);
  }
  std::int64_t pmax = 0, basis_bytes = 0;
  for (auto d : side_dims) {
    const std::int64_t r = std::min(n, d);
    pmax = std::max(pmax, d);
    if (use_gram(d)) // X, V and X_test V; per fold V (double + float32), triu(H), means
      basis_bytes += 8 * (n * d + d * r + m * r) + opt.folds * (12 * (d * r + r * r) + 32 * d);
    else // U (double + float32), X_test V, s; kfold: per fold the same for its rows (about
         // n + n/K training rows and n/K held-out rows in all, per fold).
      basis_bytes +=
          12 * n * r + 8 * (m * r + r) +
          (opt.alpha_cv == AlphaCV::kfold ? 12 * opt.folds * (n + n / opt.folds) * r : 0);
  }
  const std::int64_t rmax = std::min(n, pmax);
  // Per target: its trials, the averaged/centred responses and the solver's work arrays
  // (U^T y, residuals, predictions, LOO errors) in double, and the outputs in float; K-fold:
  // the per-fold X_f^T y and their sum, [A | E], the per-fold r.
  // fMRI with bootstraps: every layer's bootstrap r of the chunk's voxels (float), for the
  // voxel-level peak-layer tests (docs/statistics.md, "Voxel level").
  // --joint: the W + 1 candidate fits of a layer (prediction and per-target arrays), the
  // activation model's residuals, the joint change and the unique kind's outputs and dR^2
  // bootstrap.
  const bool voxel_peaks = !meg && opt.bootstraps > 0;
  const std::int64_t per_target =
      8 * (bi.trials + 5 * n + 3 * m + 3 * rmax + A) + 20 * (K + (joint ? 2 : 0)) * L +
      (opt.alpha_cv == AlphaCV::kfold ? 8 * ((opt.folds + 3) * pmax + opt.folds * (A + K * L))
                                      : 0) +
      (voxel_peaks ? 4 * (L + 1) * std::int64_t(opt.bootstraps) : 0) +
      (joint ? 8 * (W + L + 5) * (m + 8 + opt.folds) + 4 * std::int64_t(opt.bootstraps) : 0);
  // Working set of one basis computation: the features, their standardised copies, the SVD.
  const std::int64_t one_basis = 8 * (fi.n * pmax + (n + m) * pmax + 2 * (n + pmax) * rmax);
  double memory_gb = opt.memory_gb;
  if (memory_gb == 0) { // the default: 80% of the node's memory shared by its ranks
    const double phys = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
    memory_gb = 0.8 * phys / double(mpi::node_size(comm)) / double(1 << 30);
  }
  const double budget = memory_gb * double(1 << 30);
  const bool cache = double(basis_bytes) <= budget / 2;
  const std::int64_t null_bytes = 4 * m * (opt.permutations + opt.bootstraps) +
                                  8 * K * L * G * (opt.permutations + opt.bootstraps);
  const double joint_bytes = joint ? 8.0 * double(n + m) * double(pa_all + pa) : 0.0;
  const double fixed = (cache ? double(basis_bytes) : 0.0) + double(one_basis) +
                       double(null_bytes) * (joint ? double(K + 1) / double(K) : 1.0) + joint_bytes;
  std::int64_t chunk_units = std::int64_t((budget - fixed) / double(per_target * per_unit));
  auto gib = [](double b) {
    return std::to_string(int(b / double(1 << 30) * 100) / 100.0) + " GiB";
  };
  if (chunk_units < 1)
    throw UsageError("encode needs about " + gib(fixed + double(per_target * per_unit)) +
                     " per rank for " + std::to_string(n) + " training images x " +
                     std::to_string(pmax) + " features, but --memory-gb allows " + gib(budget) +
                     "; raise --memory-gb, reduce the features (extract --pca), or use more nodes");
  if (opt.max_chunk > 0)
    chunk_units = std::min(chunk_units, opt.max_chunk);
  std::int64_t rounds = (ub.size() + chunk_units - 1) / chunk_units;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &rounds, 1, MPI_INT64_T, MPI_MAX, comm));
  GM_INFO("encode: " << K << " kinds x " << L << " layers, " << bi.targets << " targets ("
                     << bi.modality << "), " << n << " training / " << m << " test images, " << A
                     << " alphas, " << p << " ranks");
  GM_INFO("encode: memory per rank: training side "
          << gib(double(basis_bytes)) << (cache ? " (cached)" : " (recomputed per chunk)") << ", "
          << per_target * per_unit << " bytes per target unit; budget " << gib(budget) << " -> "
          << rounds << " round(s) of up to " << chunk_units << " units");
  if (!cache)
    GM_WARN("encode: the training side (" << gib(double(basis_bytes)) << ") exceeds half the "
                                          << "memory budget; it is recomputed for each chunk");

  // The training side of every (kind, layer): the SVD basis of its standardised training
  // features and, for kfold, the bases of its folds (or, in the Gram form, the eigenpairs of
  // X^T X and of each fold's training Gram). Every rank reads and standardises the features
  // (collective reads); the decompositions are dealt round-robin to the ranks and broadcast
  // from their owner, so the X side is computed once and shared.
  struct Side {
    std::int64_t dim = 0;
    bool gram = false;
    RidgeBasis basis;
    std::vector<FoldBasis> folds;
    GramBasis gb;
  };
  const int nf = opt.alpha_cv == AlphaCV::kfold ? opt.folds : 0;
  // Decompositions dealt to ranks: each rank first runs the jobs it owns (of every cached
  // side), then every job is broadcast from its owner, so the ranks work at the same time.
  struct Job {
    int owner;
    std::function<void()> run;
    std::function<void(int)> share;
  };
  std::vector<Job> jobs;
  std::int64_t job_count = 0; // running job counter: its owner is job_count % p
  auto add_job = [&](bool distribute, std::function<void()> run, std::function<void(int)> share) {
    if (!distribute)
      run();
    else
      jobs.push_back({int(job_count++ % p), std::move(run), std::move(share)});
  };
  auto run_jobs = [&] {
    for (auto& j : jobs)
      if (j.owner == me)
        j.run();
    for (auto& j : jobs)
      j.share(j.owner);
    jobs.clear();
  };
  auto svd_job = [&](RidgeBasis& out, std::vector<double> xa, std::int64_t na, std::int64_t dim,
                     std::vector<double> xb, std::int64_t nb, bool distribute) {
    if (opt.solver == Solver::dual || (opt.solver == Solver::automatic && dim > na)) {
      // The kernel form, computed by all ranks together (ScaLAPACK) when they are all here.
      out = make_basis_dual(xa, na, dim, xb, nb, distribute ? comm : MPI_COMM_SELF);
      return;
    }
    auto xs = std::make_shared<std::pair<std::vector<double>, std::vector<double>>>(std::move(xa),
                                                                                    std::move(xb));
    add_job(
        distribute,
        [&out, xs, na, dim, nb] {
          out = make_basis(xs->first, na, dim, xs->second, nb);
          xs->first.clear();
          xs->second.clear();
        },
        [&out, this_comm = comm](int owner) { broadcast_basis(out, owner, this_comm); });
  };
  // The standardised training and test rows of (kind k, layer l) and the layer's width.
  auto read_std = [&](std::int64_t k, std::int64_t l, std::vector<double>& xtr,
                      std::vector<double>& xte) {
    auto ds = ff.dataset("/features/" + fi.kinds[k] + "/" + fi.layers[l]);
    const std::int64_t dim = ds.shape()[1];
    const auto x = ds.read_all<float>();
    if (standardise(x, dim, rows, test, xtr, xte) == dim)
      GM_WARN("encode: every feature of " << fi.kinds[k] << "/" << fi.layers[l]
                                          << " is constant over the training images: its "
                                          << "predictions are constant and its scores NaN");
    return dim;
  };
  // Fills side (which must stay in place until run_jobs) from standardised rows.
  auto build_from = [&](std::vector<double> xtr, std::vector<double> xte, std::int64_t dim,
                        bool distribute, Side& side) {
    side.dim = dim;
    if (use_gram(side.dim)) {
      side.gram = true;
      GramBasis& gb = side.gb;
      gb.n = n;
      gb.p = side.dim;
      gb.x = std::move(xtr);
      auto xt = std::make_shared<std::vector<double>>(std::move(xte));
      add_job(
          distribute,
          [&gb, xt, m] {
            make_gram_full(gb, *xt, m);
            xt->clear();
          },
          [&gb, this_comm = comm](int owner) { broadcast_gram_full(gb, owner, this_comm); });
      gb.folds.resize(static_cast<size_t>(nf));
      for (int f = 0; f < nf; ++f)
        add_job(
            distribute,
            [&gb, f, b = fold_start[f], e = fold_start[f + 1]] {
              gb.folds[size_t(f)] = make_gram_fold(gb, b, e);
            },
            [&gb, f, this_comm = comm](int owner) {
              broadcast_gram_fold(gb.folds[size_t(f)], gb.p, owner, this_comm);
            });
      return;
    }
    side.folds.resize(static_cast<size_t>(nf));
    for (int f = 0; f < nf; ++f) {
      std::vector<double> a, b;
      fold_rows(xtr, n, side.dim, row_fold, f, side.folds[f], a, b);
      const std::int64_t na = std::int64_t(side.folds[f].train.size()),
                         nb = std::int64_t(side.folds[f].valid.size());
      svd_job(side.folds[f].basis, std::move(a), na, side.dim, std::move(b), nb, distribute);
    }
    svd_job(side.basis, std::move(xtr), n, side.dim, std::move(xte), m, distribute);
  };
  auto build = [&](std::int64_t k, std::int64_t l, bool distribute, Side& side) {
    std::vector<double> xtr, xte;
    const std::int64_t dim = read_std(k, l, xtr, xte);
    build_from(std::move(xtr), std::move(xte), dim, distribute, side);
  };
  // --joint: the activation block A, [n, pa] and [m, pa] (read by every rank; the optional
  // principal-component reduction computed on rank 0 and broadcast).
  std::vector<double> a_tr, a_te, n_tr, n_te; // n_: the z-scored nuisance block [rows, nq]
  if (joint) {
    a_tr.assign(static_cast<size_t>(n * pa_all), 0.0);
    a_te.assign(static_cast<size_t>(m * pa_all), 0.0);
    std::int64_t off = 0;
    for (std::int64_t l = 0; l < L; ++l) {
      std::vector<double> xtr, xte;
      const std::int64_t d = read_std(ka, l, xtr, xte);
      const double sc = 1.0 / std::sqrt(double(parts) * double(d));
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < d; ++j)
          a_tr[i * pa_all + off + j] = sc * xtr[i * d + j];
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t j = 0; j < d; ++j)
          a_te[i * pa_all + off + j] = sc * xte[i * d + j];
      off += d;
    }
    std::int64_t width = pa_all; // columns of a_tr / a_te so far
    if (reduce_a) { // scores on the first principal axes, rescaled to total variance L / parts
      RidgeBasis pb;
      if (me == 0)
        pb = make_basis(a_tr, n, pa_all, a_te, m);
      broadcast_basis(pb, 0, comm);
      const std::int64_t kk = std::min(pa_layers, pb.r);
      double var = 0;
      for (std::int64_t j = 0; j < kk; ++j)
        var += pb.s[j] * pb.s[j] / double(n);
      const double sc = var > 0 ? std::sqrt(double(L) / double(parts) / var) : 0.0;
      a_tr.assign(static_cast<size_t>(n * pa_layers), 0.0);
      a_te.assign(static_cast<size_t>(m * pa_layers), 0.0);
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t j = 0; j < kk; ++j)
          a_tr[i * pa_layers + j] = sc * pb.u[i * pb.r + j] * pb.s[j];
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t j = 0; j < kk; ++j)
          a_te[i * pa_layers + j] = sc * pb.test_v[i * pb.r + j];
      width = pa_layers;
    }
    if (nuisance) { // [loss, ||g_1||, ..., ||g_L||], z-scored, scaled by 1 / sqrt(parts nq)
      const auto loss = ff.dataset("/nuisance/loss").read_all<float>();
      const auto gn = ff.dataset("/nuisance/grad_norm").read_all<float>();
      if (std::int64_t(loss.size()) != fi.n || std::int64_t(gn.size()) != fi.n * L)
        throw UsageError(opt.features + ": /nuisance/loss must be [images] and "
                                        "/nuisance/grad_norm [images, layers]");
      std::vector<float> x(static_cast<size_t>(fi.n * nq));
      for (std::int64_t i = 0; i < fi.n; ++i) {
        x[i * nq] = loss[i];
        for (std::int64_t l = 0; l < L; ++l)
          x[i * nq + 1 + l] = gn[i * L + l];
      }
      for (float v : x)
        if (!std::isfinite(v))
          throw UsageError(opt.features + ": /nuisance holds NaN or Inf (run encode with "
                                          "--joint-nuisance false to leave it out)");
      std::vector<double> xtr, xte;
      standardise(x, nq, rows, test, xtr, xte);
      const double sc = 1.0 / std::sqrt(double(parts) * double(nq));
      auto append = [&](std::vector<double>& a, const std::vector<double>& q, std::int64_t r) {
        std::vector<double> out(static_cast<size_t>(r * pa));
        for (std::int64_t i = 0; i < r; ++i) {
          std::copy(a.begin() + i * width, a.begin() + (i + 1) * width, out.begin() + i * pa);
          for (std::int64_t j = 0; j < nq; ++j)
            out[i * pa + width + j] = sc * q[i * nq + j];
        }
        a.swap(out);
      };
      append(a_tr, xtr, n);
      append(a_te, xte, m);
      n_tr = std::move(xtr);
      n_te = std::move(xte);
    }
  }
  // The activation models R_k: R_0 = A (all layers, with the nuisance block), R_k = layer k - 1
  // alone with the nuisance block ([Z / sqrt(2 p), N / sqrt(2 nq)], or Z / sqrt(p) without
  // nuisance); and the joint design [sqrt(w) R_k, sqrt(1 - w) G_l / sqrt(p_l)] (k, l, w).
  auto ref_rows = [&](std::int64_t k, std::vector<double>& xtr, std::vector<double>& xte) {
    if (k == 0) {
      xtr = a_tr;
      xte = a_te;
      return pa;
    }
    std::vector<double> ztr, zte;
    const std::int64_t d = read_std(ka, k - 1, ztr, zte), q = d + nq;
    const double sz = 1.0 / std::sqrt(double(nq > 0 ? 2 : 1) * double(d)),
                 sn = nq > 0 ? 1.0 / std::sqrt(2.0 * double(nq)) : 0.0;
    auto fill = [&](const std::vector<double>& z, const std::vector<double>& nu, std::int64_t r) {
      std::vector<double> x(static_cast<size_t>(r * q));
      for (std::int64_t i = 0; i < r; ++i) {
        for (std::int64_t j = 0; j < d; ++j)
          x[i * q + j] = sz * z[i * d + j];
        for (std::int64_t j = 0; j < nq; ++j) // n_ holds the z-scored nuisance features
          x[i * q + d + j] = sn * nu[i * nq + j];
      }
      return x;
    };
    xtr = fill(ztr, n_tr, n);
    xte = fill(zte, n_te, m);
    return q;
  };
  auto build_ref = [&](std::int64_t k, bool distribute, Side& side) {
    std::vector<double> xtr, xte;
    const std::int64_t q = ref_rows(k, xtr, xte);
    build_from(std::move(xtr), std::move(xte), q, distribute, side);
  };
  // The last R_k and G_l rows read: the W designs of a (k, l) share them.
  struct Rows {
    std::int64_t key = -1, dim = 0;
    std::vector<double> tr, te;
  } ref_memo, grad_memo;
  auto build_joint = [&](std::int64_t k, std::int64_t l, double w, bool distribute, Side& side) {
    if (ref_memo.key != k) {
      ref_memo.dim = ref_rows(k, ref_memo.tr, ref_memo.te);
      ref_memo.key = k;
    }
    if (grad_memo.key != l) {
      grad_memo.dim = read_std(kg, l, grad_memo.tr, grad_memo.te);
      grad_memo.key = l;
    }
    const std::vector<double>&rtr = ref_memo.tr, &rte = ref_memo.te, &gtr = grad_memo.tr,
          &gte = grad_memo.te;
    const std::int64_t pr = ref_memo.dim, d = grad_memo.dim, q = pr + d;
    const double sa = std::sqrt(w), sg = std::sqrt((1 - w) / double(d));
    std::vector<double> xtr(static_cast<size_t>(n * q)), xte(static_cast<size_t>(m * q));
    auto fill = [&](const std::vector<double>& a, const std::vector<double>& g, std::int64_t rows_,
                    std::vector<double>& x) {
      for (std::int64_t i = 0; i < rows_; ++i) {
        for (std::int64_t j = 0; j < pr; ++j)
          x[i * q + j] = sa * a[i * pr + j];
        for (std::int64_t j = 0; j < d; ++j)
          x[i * q + pr + j] = sg * g[i * d + j];
      }
    };
    fill(rtr, gtr, n, xtr);
    fill(rte, gte, m, xte);
    build_from(std::move(xtr), std::move(xte), q, distribute, side);
  };
  auto finish = [&](Side& side) {
    for (auto& fd : side.folds)
      finish_fold(fd);
  };
  std::vector<Side> cached;
  std::vector<std::uint8_t> joint_built(static_cast<size_t>(L + 1), 0); // joint designs of R_k
  // --joint: R_k at a_side + k (k = 0..L), the joint design (k, l, w) at
  // joint_side(k, l, w).
  const size_t a_side = size_t(K * L);
  auto joint_side = [&](std::int64_t k, std::int64_t l, std::int64_t w) {
    return a_side + size_t(L + 1) + size_t((k * L + l) * W + w);
  };
  if (cache) {
    cached.resize(size_t(K * L) + (joint ? size_t((L + 1) * (1 + L * W)) : 0));
    for (std::int64_t k = 0; k < K; ++k)
      for (std::int64_t l = 0; l < L; ++l)
        build(k, l, true, cached[size_t(k * L + l)]);
    if (joint) // the joint designs of R_k are built when a target first chooses R_k (below)
      for (std::int64_t k = 0; k <= L; ++k)
        build_ref(k, true, cached[a_side + size_t(k)]);
    run_jobs();
    for (auto& side : cached)
      finish(side);
  }

  // 4. Outputs (collective creation), then the chunks.
  io::OutputFile out(opt.out, comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "modality", bi.modality);
  f.set_attr("/", "features", opt.features);
  f.set_attr("/", "brain", opt.brain);
  f.set_attr("/", "layers", fi.layers);
  f.set_attr("/", "alphas", alphas);
  f.set_attr("/", "alpha_cv", std::string(name(opt.alpha_cv)));
  f.set_attr("/", "precision", std::string(name(opt.precision)));
  f.set_attr("/", "solver", std::string(name(opt.solver)));
  f.set_attr("/", "n_train", n);
  f.set_attr("/", "n_test", m);
  if (meg)
    f.set_attr("/", "target_shape", std::vector<std::int64_t>{bi.sensors, bi.times});
  f.set_attr("/", "joint", std::int64_t{joint ? 1 : 0});
  if (joint) {
    f.set_attr("/", "joint_weights", jw);
    f.set_attr("/", "joint_activation_dims", pa_layers);
    f.set_attr("/", "joint_nuisance_columns", nq);
  }
  const char* const outputs[4] = {"r", "r_normalised", "r2", "alpha"};
  std::vector<io::Dataset> out_ds;
  for (const auto& kind : fi.kinds) {
    for (const char* name : outputs)
      out_ds.push_back(f.create_dataset("/" + kind + "/" + name, io::DType::f32, {L, bi.targets},
                                        {L, std::min<std::int64_t>(bi.targets, 4096)}));
    if (opt.store_predictions)
      for (const auto& layer : fi.layers)
        out_ds.push_back(
            f.create_dataset("/" + kind + "/prediction/" + layer, io::DType::f32, {m, bi.targets}));
  }
  const bool nulls = opt.permutations > 0 || opt.bootstraps > 0;
  std::vector<io::Dataset> exceed_ds, peak_ds;
  for (std::int64_t k = 0; voxel_peaks && k < K; ++k)
    peak_ds.push_back(f.create_dataset("/" + fi.kinds[k] + "/voxel_peak_p", io::DType::f32,
                                       {L, bi.targets},
                                       {L, std::min<std::int64_t>(bi.targets, 4096)}));
  if (opt.permutations > 0)
    for (const auto& kind : fi.kinds)
      exceed_ds.push_back(f.create_dataset("/" + kind + "/exceed", io::DType::i32, {L, bi.targets},
                                           {L, std::min<std::int64_t>(bi.targets, 4096)}));
  // --joint: the activation model's scores [T], and the unique kind [L, T] (docs/statistics.md,
  // "Unique variance"): r = Pearson(joint - activation prediction, activation residual), the
  // statistic of the residual-permutation null; dR^2, the joint R^2, the shared part, the chosen
  // band weight and alpha; the 95% bootstrap interval of dR^2 [2, L, T].
  const char* const joint_outputs[6] = {"t", "dr2", "r2_joint", "shared", "weight", "alpha"};
  std::vector<io::Dataset> ja_ds, ju_ds, ju_pred_ds;
  std::optional<io::Dataset> ju_ci, ju_exceed, ju_peak, ja_layer;
  if (joint) {
    for (const char* name : {"r", "r2", "alpha"})
      ja_ds.push_back(f.create_dataset(std::string("/joint/activations/") + name, io::DType::f32,
                                       {bi.targets}));
    ja_layer = f.create_dataset("/joint/activations/layer", io::DType::i32, {bi.targets});
    for (const char* name : joint_outputs)
      ju_ds.push_back(f.create_dataset(std::string("/unique_gradients/") + name, io::DType::f32,
                                       {L, bi.targets},
                                       {L, std::min<std::int64_t>(bi.targets, 4096)}));
    if (opt.bootstraps > 0)
      ju_ci = f.create_dataset("/unique_gradients/dr2_ci", io::DType::f32, {2, L, bi.targets});
    if (opt.permutations > 0)
      ju_exceed = f.create_dataset("/unique_gradients/exceed", io::DType::i32, {L, bi.targets},
                                   {L, std::min<std::int64_t>(bi.targets, 4096)});
    if (voxel_peaks)
      ju_peak = f.create_dataset("/unique_gradients/voxel_peak_p", io::DType::f32, {L, bi.targets},
                                 {L, std::min<std::int64_t>(bi.targets, 4096)});
    for (const auto& layer : fi.layers)
      if (opt.store_predictions)
        ju_pred_ds.push_back(f.create_dataset("/unique_gradients/prediction/" + layer,
                                              io::DType::f32, {m, bi.targets}));
  }
  std::vector<NullAccumulator> acc;
  const bool clusters = meg && opt.permutations > 0 && opt.cluster_p > 0;
  const double cluster_r = clusters ? cluster_threshold(m, opt.cluster_p) : 0.0;
  for (std::int64_t kl = 0; nulls && kl < (K + (joint ? 1 : 0)) * L; ++kl) {
    // (no clusters for the unique kind: its statistic is a t, not an r)
    acc.emplace_back(rs, int(G), clusters && kl < K * L ? bi.targets : 0, float(cluster_r));
  }
  // --joint: the B bootstrap count vectors of the unique-variance null (nulls.hpp)
  const std::vector<std::uint32_t> null_counts =
      joint ? null_bootstrap_counts(m, opt.permutations, opt.seed) : std::vector<std::uint32_t>{};
  // K-fold: the held-out Pearson r of every fold at the target's chosen alpha.
  std::vector<io::Dataset> fold_ds;
  for (std::int64_t k = 0; nf > 0 && k < K; ++k)
    fold_ds.push_back(f.create_dataset("/" + fi.kinds[k] + "/fold_r", io::DType::f32,
                                       {nf, L, bi.targets},
                                       {nf, L, std::min<std::int64_t>(bi.targets, 4096)}));
  auto nc_ds = f.create_dataset("/noise_ceiling/nc", io::DType::f32, {bi.targets});
  auto sh_ds = f.create_dataset("/noise_ceiling/split_half", io::DType::f32, {bi.targets});
  auto resp = bf.dataset("/brain/responses");
  std::int64_t constant = 0, nonfinite = 0;
  std::vector<std::int64_t> nonfinite_examples;
  Progress progress("encode", ub.size(), meg ? "sensors" : "voxels",
                    ub.size() > 0 ? double(units) / double(ub.size()) : 1.0);
  for (std::int64_t round = 0; round < rounds; ++round) {
    const std::int64_t u0 = std::min(ub.end, ub.begin + round * chunk_units);
    const std::int64_t u1 = std::min(ub.end, u0 + chunk_units);
    const std::int64_t t0 = u0 * per_unit, t = (u1 - u0) * per_unit;
    std::vector<float> raw; // as stored: no HDF5 conversion, half the bytes of double
    {
      ProfileEvent ev("gm.encode.read");
      raw = meg ? resp.read<float>({0, u0, 0}, {t ? bi.trials : 0, u1 - u0, bi.times})
                : resp.read<float>({0, u0}, {t ? bi.trials : 0, u1 - u0});
    }
    std::optional<ProfileEvent> prep;
    prep.emplace("gm.encode.prepare");
    // Targets with a NaN/Inf in any trial (e.g. voxels outside a subject's mask) are excluded:
    // zeroed, so that they are constant and score NaN, counted and reported. (`gradmap validate`
    // reports them as errors; encode reads the responses once and checks them here.)
    std::vector<std::uint8_t> bad(static_cast<size_t>(t), 0);
    for (std::int64_t k = 0; k < (t ? bi.trials : 0); ++k)
      for (std::int64_t c = 0; c < t; ++c)
        bad[c] |= std::isfinite(raw[k * t + c]) ? 0 : 1;
    for (std::int64_t c = 0; c < t; ++c)
      if (bad[c]) {
        if (nonfinite_examples.size() < 5)
          nonfinite_examples.push_back(t0 + c);
        ++nonfinite;
        for (std::int64_t k = 0; k < bi.trials; ++k)
          raw[k * t + c] = 0.0f;
      }
    std::vector<double> ytr(static_cast<size_t>(n * t), 0.0), yte(static_cast<size_t>(m * t), 0.0);
    for (std::int64_t k = 0; k < bi.trials && t > 0; ++k) {
      const std::int64_t img = trial_stim[k];
      double* dst = test_set.count(img) ? &yte[row_of[img] * t] : &ytr[row_of[img] * t];
      const double w = 1.0 / double(count[img]);
      for (std::int64_t c = 0; c < t; ++c)
        dst[c] += w * raw[k * t + c];
    }
    std::vector<double> nc, split_half;
    noise_ceiling(raw, t, trial_stim, test, nc, split_half);
    // Centre with the training means (row-major passes; per column the order of summation is
    // the row order, as in a column loop).
    std::vector<double> mean(static_cast<size_t>(t), 0.0), var(static_cast<size_t>(t), 0.0);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < t; ++c)
        mean[c] += ytr[i * t + c];
    for (std::int64_t c = 0; c < t; ++c)
      mean[c] /= double(n);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < t; ++c) {
        ytr[i * t + c] -= mean[c];
        var[c] += ytr[i * t + c] * ytr[i * t + c];
      }
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t c = 0; c < t; ++c)
        yte[i * t + c] -= mean[c];
    for (std::int64_t c = 0; c < t; ++c)
      constant += var[c] == 0 ? 1 : 0;
    prep.reset();
    // 5. Fit every (kind, layer) on this chunk; write the chunk's columns.
    size_t next_ds = 0;
    auto fit_y = [&](const Side& side, const std::vector<double>& y_tr,
                     const std::vector<double>& y_te, std::int64_t tt,
                     const std::vector<double>& grid) {
      return side.gram ? fit_kfold_gram(side.gb, y_tr, y_te, tt, grid, prec)
             : opt.alpha_cv == AlphaCV::kfold
                 ? fit_kfold(side.basis, side.folds, y_tr, y_te, tt, grid, prec)
                 : fit_loo(side.basis, y_tr, y_te, tt, grid, prec);
    };
    auto fit_side = [&](const Side& side) { return fit_y(side, ytr, yte, t, alphas); };
    std::vector<double> r2_grad(static_cast<size_t>(L * t),
                                std::numeric_limits<double>::quiet_NaN()); // for the shared part
    for (std::int64_t k = 0; k < K; ++k) {
      std::vector<std::vector<float>> buf(4, std::vector<float>(static_cast<size_t>(L * t)));
      std::vector<std::vector<float>> preds;
      std::vector<std::int32_t> exceed(static_cast<size_t>(L * t), -1);
      std::vector<float> fold_r(static_cast<size_t>(nf * L * t));
      std::vector<float> boot_r(voxel_peaks ? static_cast<size_t>(L * opt.bootstraps * t) : 0);
      for (std::int64_t l = 0; l < L; ++l) {
        Side fresh;
        if (!cache) {
          build(k, l, false, fresh);
          finish(fresh);
        }
        const Side& side = cache ? cached[size_t(k * L + l)] : fresh;
        const RidgeScores sc = fit_side(side);
        if (k == kg)
          std::copy(sc.r2.begin(), sc.r2.end(), r2_grad.begin() + l * t);
        for (std::int64_t c = 0; c < t; ++c) {
          buf[0][l * t + c] = float(sc.r[c]);
          // r normalised by sqrt(NC), the ceiling of r for the averaged test responses.
          buf[1][l * t + c] = nc[c] > 0 ? float(sc.r[c] / std::sqrt(nc[c])) : NAN;
          buf[2][l * t + c] = float(sc.r2[c]);
          buf[3][l * t + c] = float(sc.alpha[c]);
        }
        for (std::int64_t g = 0; g < nf; ++g) // K-fold: sc.fold_r is [nf, t]
          for (std::int64_t c = 0; c < t; ++c)
            fold_r[(g * L + l) * t + c] = float(sc.fold_r[g * t + c]);
        if (opt.store_predictions)
          preds.emplace_back(sc.prediction.begin(), sc.prediction.end());
        if (nulls)
          accumulate_nulls(rs, sc.prediction, yte, t, group.data() + t0, acc[k * L + l],
                           exceed.data() + l * t, t0,
                           voxel_peaks ? boot_r.data() + l * opt.bootstraps * t : nullptr);
      }
      if (voxel_peaks) {
        const auto pk = stats::target_peak_pvalues(buf[0], boot_r, L, opt.bootstraps, t);
        peak_ds[k].write(pk.data(), {0, t0}, {t ? L : 0, t});
      }
      for (int o = 0; o < 4; ++o)
        out_ds[next_ds++].write(buf[o].data(), {0, t0}, {t ? L : 0, t});
      for (std::int64_t l = 0; opt.store_predictions && l < L; ++l)
        out_ds[next_ds++].write(preds[l].data(), {0, t0}, {t ? m : 0, t});
      if (opt.permutations > 0)
        exceed_ds[k].write(exceed.data(), {0, t0}, {t ? L : 0, t});
      if (nf > 0)
        fold_ds[k].write(fold_r.data(), {0, 0, t0}, {t ? nf : 0, t ? L : 0, t});
    }
    if (joint) {
      // The activation model: per target the best (by the cross-validation criterion) of all
      // layers together (A) and each layer alone (with the nuisance block); then each layer's
      // joint model, candidates: the activation model, then each w.
      std::vector<RidgeScores> ref_cand;
      for (std::int64_t k = 0; k <= L; ++k) {
        Side fresh;
        if (!cache) {
          build_ref(k, false, fresh);
          finish(fresh);
        }
        ref_cand.push_back(fit_side(cache ? cached[a_side + size_t(k)] : fresh));
      }
      std::vector<std::int32_t> ref_chosen;
      const RidgeScores sa = select_per_target(ref_cand, m, t, ref_chosen);
      ref_cand.clear();
      std::vector<std::int32_t> ref_layer(static_cast<size_t>(t));
      // The targets of each activation model R_k: their joint models extend R_k.
      std::vector<std::vector<std::int64_t>> group_of(static_cast<size_t>(L + 1));
      for (std::int64_t c = 0; c < t; ++c) {
        ref_layer[c] = ref_chosen[c] - 1; // -1: all layers (or undefined)
        if (ref_chosen[c] >= 0)
          group_of[size_t(ref_chosen[c])].push_back(c);
      }
      // The R_k that a target of this round chose on any rank: their joint designs are built
      // (reading the features collectively) by every rank, cached: once, dealt to ranks.
      std::vector<int> present(static_cast<size_t>(L + 1));
      for (std::int64_t k = 0; k <= L; ++k)
        present[size_t(k)] = group_of[size_t(k)].empty() ? 0 : 1;
      GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, present.data(), int(L + 1), MPI_INT, MPI_MAX, comm));
      if (cache) {
        std::vector<size_t> fresh_sides;
        for (std::int64_t k = 0; k <= L; ++k)
          if (present[size_t(k)] && !joint_built[size_t(k)]) {
            joint_built[size_t(k)] = 1;
            for (std::int64_t l = 0; l < L; ++l)
              for (std::int64_t w = 0; w < W; ++w) {
                build_joint(k, l, jw[size_t(w)], true, cached[joint_side(k, l, w)]);
                fresh_sides.push_back(joint_side(k, l, w));
              }
          }
        run_jobs();
        for (auto i : fresh_sides)
          finish(cached[i]);
      }
      ja_layer->write(ref_layer.data(), {t0}, {t});
      std::vector<double> ea(static_cast<size_t>(m * t)); // the activation model's residuals
      for (std::int64_t i = 0; i < m * t; ++i)
        ea[i] = yte[i] - sa.prediction[i];
      std::vector<float> abuf[3];
      for (auto& v : abuf)
        v.resize(static_cast<size_t>(t));
      for (std::int64_t c = 0; c < t; ++c) {
        abuf[0][c] = float(sa.r[c]);
        abuf[1][c] = float(sa.r2[c]);
        abuf[2][c] = float(sa.alpha[c]);
      }
      for (int o = 0; o < 3; ++o)
        ja_ds[o].write(abuf[o].data(), {t0}, {t});
      std::vector<std::vector<float>> jbuf(6, std::vector<float>(static_cast<size_t>(L * t)));
      std::vector<float> ci(static_cast<size_t>(2 * L * t), NAN);
      std::vector<std::int32_t> exceed(static_cast<size_t>(L * t), -1);
      std::vector<float> boot_r(voxel_peaks ? static_cast<size_t>(L * opt.bootstraps * t) : 0);
      std::vector<double> delta(static_cast<size_t>(m * t));
      for (std::int64_t l = 0; l < L; ++l) {
        // candidate w: for each target, [sqrt(w) R_k, sqrt(1 - w) G_l] with its own R_k,
        // fitted per group of targets sharing k and scattered back
        std::vector<RidgeScores> cand{sa};
        for (std::int64_t w = 0; w < W; ++w) {
          RidgeScores full;
          full.alpha.assign(static_cast<size_t>(t), std::numeric_limits<double>::quiet_NaN());
          full.r = full.r2 = full.cv_error = full.alpha;
          full.prediction.assign(static_cast<size_t>(m * t), 0.0);
          full.fold_r.assign(static_cast<size_t>(nf * t), std::numeric_limits<double>::quiet_NaN());
          for (std::int64_t k = 0; k <= L; ++k) {
            const auto& cols = group_of[size_t(k)];
            const std::int64_t tk = std::int64_t(cols.size());
            if (!present[size_t(k)])
              continue;
            Side fresh;
            if (!cache) { // every rank: the reads are collective
              build_joint(k, l, jw[size_t(w)], false, fresh);
              finish(fresh);
            }
            if (tk == 0)
              continue;
            std::vector<double> ytk(static_cast<size_t>(n * tk)), yek(static_cast<size_t>(m * tk));
            for (std::int64_t i = 0; i < n; ++i)
              for (std::int64_t j = 0; j < tk; ++j)
                ytk[i * tk + j] = ytr[i * t + cols[j]];
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t j = 0; j < tk; ++j)
                yek[i * tk + j] = yte[i * t + cols[j]];
            const RidgeScores part = fit_y(cache ? cached[joint_side(k, l, w)] : fresh, ytk, yek,
                                           tk, joint_alphas[size_t(w)]);
            for (std::int64_t j = 0; j < tk; ++j)
              copy_target(part, tk, j, full, t, cols[j], m);
          }
          cand.push_back(std::move(full));
        }
        std::vector<std::int32_t> chosen;
        const RidgeScores sj = select_per_target(cand, m, t, chosen);
        cand.clear();
        for (std::int64_t i = 0; i < m * t; ++i)
          delta[i] = sj.prediction[i] - sa.prediction[i];
        std::vector<std::uint8_t> defined(static_cast<size_t>(t));
        for (std::int64_t c = 0; c < t; ++c) {
          defined[c] = std::isfinite(sa.r2[c]) ? 1 : 0;
          const std::int32_t ch = chosen[c];
          jbuf[2][l * t + c] = float(sj.r2[c]);
          jbuf[3][l * t + c] = float(sa.r2[c] + r2_grad[l * t + c] - sj.r2[c]);
          jbuf[4][l * t + c] = ch < 0 || !defined[c] ? NAN
                               : ch == 0             ? 1.0f
                                                     : float(jw[size_t(ch - 1)]);
          jbuf[5][l * t + c] = float(sj.alpha[c]);
        }
        // dR^2, its bootstrap-t statistic and null, the interval (nulls.hpp)
        accumulate_unique(rs, null_counts, yte, ea, delta, t, group.data() + t0, defined.data(),
                          nulls ? &acc[size_t(K * L + l)] : nullptr, exceed.data() + l * t,
                          &jbuf[0][size_t(l * t)], &jbuf[1][size_t(l * t)], &ci[size_t(l * t)],
                          &ci[size_t((L + l) * t)],
                          voxel_peaks ? boot_r.data() + l * opt.bootstraps * t : nullptr);
        if (opt.store_predictions) {
          const std::vector<float> pf(sj.prediction.begin(), sj.prediction.end());
          ju_pred_ds[size_t(l)].write(pf.data(), {0, t0}, {t ? m : 0, t});
        }
      }
      for (int o = 0; o < 6; ++o)
        ju_ds[size_t(o)].write(jbuf[size_t(o)].data(), {0, t0}, {t ? L : 0, t});
      if (opt.bootstraps > 0)
        ju_ci->write(ci.data(), {0, 0, t0}, {t ? 2 : 0, t ? L : 0, t});
      if (opt.permutations > 0)
        ju_exceed->write(exceed.data(), {0, t0}, {t ? L : 0, t});
      if (voxel_peaks) {
        const auto pk = stats::target_peak_pvalues(jbuf[1], boot_r, L, opt.bootstraps, t);
        ju_peak->write(pk.data(), {0, t0}, {t ? L : 0, t});
      }
    }
    const std::vector<float> ncf(nc.begin(), nc.end()), shf(split_half.begin(), split_half.end());
    nc_ds.write(ncf.data(), {t0}, {t});
    sh_ds.write(shf.data(), {t0}, {t});
    progress.advance(u1 - u0);
    signals::check(comm, "during encode (the partial " + opt.out +
                             " is not resumable: the "
                             "stage restarts)");
  }
  progress.finish();
  constant -= nonfinite; // the excluded targets are constant now; count them once
  nonfinite = mpi::sum(comm, nonfinite);
  if (nonfinite > 0) {
    std::string ex;
    for (auto c : nonfinite_examples)
      ex += (ex.empty() ? "" : ", ") + std::to_string(c);
    GM_WARN("encode: " << nonfinite << " targets of " << opt.brain
                       << " have NaN/Inf responses and are excluded (scores NaN); e.g. "
                       << (ex.empty() ? std::string("on other ranks") : ex));
  }
  constant = mpi::sum(comm, constant);
  if (constant > 0)
    GM_WARN("encode: " << constant << " targets are constant over the training images; their "
                       << "scores are NaN");
  if (nulls) {
    std::vector<std::string> names = fi.kinds;
    if (joint)
      names.push_back("unique_gradients");
    write_nulls(f, opt, rs, names, L, G, acc, meg, bf, comm);
  }
  if (!meg) // the ROI of every voxel (-1: none), for the voxel-level tests' per-ROI counts
    f.write_small("/groups/target", group, {bi.targets});
  f.write_small("/split/train_stimuli", train, {n});
  f.write_small("/split/test_stimuli", test, {m});
  if (opt.alpha_cv == AlphaCV::kfold) {
    f.write_small("/split/fold", fold, {n}); // fold of each training image (order of train_stimuli)
    f.set_attr("/", "folds", std::int64_t{opt.folds});
  }
  out.commit();
  GM_INFO("encode: wrote " << opt.out);
}

} // namespace gradmap::encoding
