// The pure planning steps of gradmap encode (encode_plan.hpp).
#include "gradmap/encoding/encode_plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>

#include "gradmap/core/error.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::encoding {

namespace {

// K-fold: training images dealt to folds by a seeded permutation (contiguous runs of it).
std::vector<std::int32_t> deal_folds(std::int64_t n, const EncodeOptions& opt) {
  std::vector<std::int32_t> fold(static_cast<size_t>(n), 0);
  if (opt.alpha_cv != AlphaCV::kfold)
    return fold;
  std::vector<std::int64_t> perm(static_cast<size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    perm[i] = i;
  sim::Philox rng(opt.seed, sim::Stream::folds);
  for (std::int64_t i = n - 1; i > 0; --i)
    std::swap(perm[i], perm[rng.below(std::uint32_t(i + 1))]);
  for (std::int64_t j = 0; j < n; ++j)
    fold[perm[j]] = std::int32_t(j * opt.folds / n);
  return fold;
}

// The training rows ordered by fold (then image); /split/ keeps the image order.
void order_rows(ImageSplit& s, const EncodeOptions& opt) {
  const std::int64_t n = s.n();
  s.rows = s.train;
  s.row_fold = s.fold;
  s.fold_start.assign(static_cast<size_t>(opt.folds + 1), 0);
  s.min_fold_train = n;
  if (opt.alpha_cv != AlphaCV::kfold)
    return;
  std::vector<std::int64_t> idx(static_cast<size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::int64_t a, std::int64_t b) { return s.fold[a] < s.fold[b]; });
  for (std::int64_t i = 0; i < n; ++i) {
    s.rows[i] = s.train[idx[i]];
    s.row_fold[i] = s.fold[idx[i]];
    ++s.fold_start[size_t(s.row_fold[i]) + 1];
  }
  for (int f = 0; f < opt.folds; ++f)
    s.fold_start[size_t(f) + 1] += s.fold_start[size_t(f)];
  for (int f = 0; f < opt.folds; ++f)
    s.min_fold_train = std::min(s.min_fold_train, n - (s.fold_start[f + 1] - s.fold_start[f]));
}

} // namespace

ImageSplit split_images(const std::vector<std::int64_t>& trial_stimulus,
                        const std::vector<std::int64_t>& test_stimuli, std::int64_t images,
                        const EncodeOptions& opt) {
  ImageSplit s;
  s.count.assign(size_t(images), 0);
  s.is_test.assign(size_t(images), 0);
  for (auto i : trial_stimulus)
    ++s.count[size_t(i)];
  for (auto i : test_stimuli)
    s.is_test[size_t(i)] = 1;
  s.test = test_stimuli;
  for (std::int64_t i = 0; i < images; ++i)
    if (s.count[i] > 0 && !s.is_test[i])
      s.train.push_back(i);
  const std::int64_t n = s.n(), m = s.m();
  if (n < 3 || m < 3)
    throw UsageError(opt.brain + ": " + std::to_string(n) + " training and " + std::to_string(m) +
                     " test images; ridge with leave-one-out needs at least 3 of each");
  if (opt.alpha_cv == AlphaCV::kfold && n < 2 * std::int64_t(opt.folds))
    throw UsageError(opt.brain + ": " + std::to_string(n) + " training images are too few for " +
                     std::to_string(opt.folds) + " folds (need at least 2 per fold)");
  s.fold = deal_folds(n, opt);
  order_rows(s, opt);
  s.row_of.assign(size_t(images), -1);
  for (std::int64_t r = 0; r < n; ++r)
    s.row_of[s.rows[r]] = r;
  for (std::int64_t r = 0; r < m; ++r)
    s.row_of[s.test[r]] = r;
  return s;
}

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

std::vector<std::int64_t> Layout::side_dims() const {
  std::vector<std::int64_t> out;
  for (std::int64_t k = 0; k < K; ++k)
    out.insert(out.end(), dims.begin(), dims.end());
  if (!joint)
    return out;
  std::vector<std::int64_t> rd{pa}; // R_0, then R_k = [layer k - 1, nuisance]
  for (std::int64_t l = 0; l < L; ++l)
    rd.push_back(dims[l] + nq);
  out.insert(out.end(), rd.begin(), rd.end());
  for (auto d : rd)
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t w = 0; w < W; ++w)
        out.push_back(d + dims[l]);
  return out;
}

Layout make_layout(const io::FeaturesInfo& fi, const EncodeOptions& opt, std::int64_t alphas,
                   std::int64_t weights, std::int64_t n, bool nuisance_present) {
  Layout y;
  y.K = std::int64_t(fi.kinds.size());
  y.L = std::int64_t(fi.layers.size());
  y.A = alphas;
  y.dims = fi.dims;
  for (std::int64_t k = 0; k < y.K; ++k) {
    y.ka = fi.kinds[k] == "activations" ? k : y.ka;
    y.kg = fi.kinds[k] == "gradients" ? k : y.kg;
  }
  y.joint = opt.joint;
  if (y.joint && (y.ka < 0 || y.kg < 0))
    throw UsageError("--joint: " + opt.features +
                     " must hold both activations and gradients (extract writes both)");
  y.W = y.joint ? weights : 0;
  for (auto d : fi.dims)
    y.pa_all += d;
  y.reduce_a =
      y.joint && opt.joint_activation_dims > 0 && opt.joint_activation_dims < std::min(y.pa_all, n);
  y.nuisance = y.joint && opt.joint_nuisance && nuisance_present;
  y.nq = y.nuisance ? y.L + 1 : 0;
  y.parts = y.L + (y.nuisance ? 1 : 0);
  y.pa_layers = !y.joint ? 0 : y.reduce_a ? opt.joint_activation_dims : y.pa_all;
  y.pa = y.pa_layers + y.nq;
  return y;
}

bool use_gram(const EncodeOptions& opt, const ImageSplit& s, std::int64_t dim) {
  return opt.alpha_cv == AlphaCV::kfold &&
         (opt.solver == Solver::primal ||
          (opt.solver == Solver::automatic && dim <= s.min_fold_train));
}

MemoryPlan plan_memory(const Layout& lay, const ImageSplit& s, const EncodeOptions& opt,
                       std::int64_t trials, std::int64_t groups, std::int64_t per_unit, bool meg,
                       std::int64_t images, double budget, std::int64_t units_here,
                       std::int64_t targets) {
  const std::int64_t n = s.n(), m = s.m(), K = lay.K, L = lay.L, W = lay.W;
  const bool kfold = opt.alpha_cv == AlphaCV::kfold;
  MemoryPlan mp;
  for (auto d : lay.side_dims()) {
    const std::int64_t r = std::min(n, d);
    mp.pmax = std::max(mp.pmax, d);
    if (use_gram(opt, s, d)) // X, V and X_test V; per fold V (double + float32), triu(H), means
      mp.basis_bytes += 8 * (n * d + d * r + m * r) + opt.folds * (12 * (d * r + r * r) + 32 * d);
    else // U (double + float32), X_test V, s; kfold: per fold the same for its rows (about
         // n + n/K training rows and n/K held-out rows in all, per fold).
      mp.basis_bytes +=
          12 * n * r + 8 * (m * r + r) + (kfold ? 12 * opt.folds * (n + n / opt.folds) * r : 0);
  }
  const std::int64_t pmax = mp.pmax, rmax = std::min(n, pmax);
  // Per target: its trials, the averaged/centred responses and the solver's work arrays
  // (U^T y, residuals, predictions, LOO errors) in double, and the outputs in float; K-fold:
  // the per-fold X_f^T y and their sum, [A | E], the per-fold r.
  // fMRI with bootstraps: every layer's bootstrap r of the chunk's voxels (float), for the
  // voxel-level peak-layer tests (docs/statistics.md, "Voxel level").
  // --joint: the W + 1 candidate fits of a layer (prediction and per-target arrays), the
  // activation model's residuals, the joint change and the unique kind's outputs and dR^2
  // bootstrap.
  const bool voxel_peaks = !meg && opt.bootstraps > 0;
  mp.per_target =
      8 * (trials + 5 * n + 3 * m + 3 * rmax + lay.A) + 20 * (K + (lay.joint ? 2 : 0)) * L +
      (kfold ? 8 * ((opt.folds + 3) * pmax + opt.folds * (lay.A + K * L)) : 0) +
      (voxel_peaks ? 4 * (L + 1) * std::int64_t(opt.bootstraps) : 0) +
      (lay.joint ? 8 * (W + L + 5) * (m + 8 + opt.folds) + 4 * std::int64_t(opt.bootstraps) : 0);
  // Working set of one basis computation: the features, their standardised copies, the SVD.
  const std::int64_t one_basis = 8 * (images * pmax + (n + m) * pmax + 2 * (n + pmax) * rmax);
  const std::int64_t null_bytes = 4 * m * (opt.permutations + opt.bootstraps) +
                                  8 * K * L * groups * (opt.permutations + opt.bootstraps);
  const double joint_bytes = lay.joint ? 8.0 * double(n + m) * double(lay.pa_all + lay.pa) : 0.0;
  // MEG cluster null: per kind and layer, a bit per target and permutation (all targets)
  const bool clusters = meg && opt.permutations > 0 && opt.cluster_p > 0;
  const double cluster_bytes =
      clusters ? 8.0 * double(K * L) * double((targets + 63) / 64) * double(opt.permutations) : 0.0;
  const double uncached = double(one_basis) +
                          double(null_bytes) * (lay.joint ? double(K + 1) / double(K) : 1.0) +
                          joint_bytes + cluster_bytes;
  const std::int64_t round_units = (units_here + kMinRounds - 1) / kMinRounds;
  // the smallest round worth caching for: an eighth of the units, or kMinRoundTargets targets
  const std::int64_t min_units = std::min(
      round_units, std::max<std::int64_t>(1, (kMinRoundTargets + per_unit - 1) / per_unit));
  mp.cache =
      double(mp.basis_bytes) <= budget / 2 ||
      (min_units > 0 &&
       uncached + double(mp.basis_bytes) + double(mp.per_target * per_unit * min_units) <= budget);
  mp.fixed = (mp.cache ? double(mp.basis_bytes) : 0.0) + uncached;
  mp.chunk_units = std::int64_t((budget - mp.fixed) / double(mp.per_target * per_unit));
  if (mp.chunk_units < 1)
    throw UsageError("encode needs about " +
                     format_bytes(mp.fixed + double(mp.per_target * per_unit)) + " per rank for " +
                     std::to_string(n) + " training images x " + std::to_string(pmax) +
                     " features, but --memory-gb allows " + format_bytes(budget) +
                     "; raise --memory-gb, reduce the features (extract --pca), or use more nodes");
  if (mp.cache && round_units > 0)
    mp.chunk_units = std::min(mp.chunk_units, round_units);
  if (opt.max_chunk > 0)
    mp.chunk_units = std::min(mp.chunk_units, opt.max_chunk);
  return mp;
}

} // namespace gradmap::encoding
