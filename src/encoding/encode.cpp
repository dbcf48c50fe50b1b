// gradmap encode:
// 1. Validate features and brain files against each other (image counts, split).
// 2. Split images: training = shown in some trial and not a test image; test = test_stimuli.
// 3. Each rank reads its column block of the responses, averages the repetitions of each image,
//    and centres with the training means.
// 4. Per (kind, layer): standardise the features with training statistics (population std;
//    constant columns set to 0), build the SVD basis, select alpha per target by efficient LOO,
//    refit, score on the test images.
// 5. Write r, R^2 and alpha [layers, targets] per kind to scores.h5 (column blocks per rank).
#include "gradmap/encoding/encode.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::encoding {

std::vector<double> default_alphas() {
  std::vector<double> a;
  for (int e = -1; e <= 8; ++e)
    a.push_back(std::pow(10.0, e));
  return a;
}

void validate(const EncodeOptions& o) {
  if (o.features.empty())
    throw UsageError("--features: a features file is required");
  if (o.brain.empty())
    throw UsageError("--brain: a brain file is required");
  if (o.out.empty())
    throw UsageError("--out: an output file is required");
  if (o.alpha_cv != "loo" && o.alpha_cv != "kfold")
    throw UsageError("--alpha-cv: must be loo or kfold, not '" + o.alpha_cv + "'");
  if (o.alpha_cv == "kfold" && o.folds < 2)
    throw UsageError("--folds: at least 2 folds are needed");
  for (double a : o.alphas)
    if (!(a > 0) || !std::isfinite(a))
      throw UsageError("--alphas: every alpha must be a positive finite number");
}

namespace {

// Standardises the columns of x [N, p] with the mean and population std of the training rows;
// returns the training and test rows.
void standardise(const std::vector<float>& x, std::int64_t p,
                 const std::vector<std::int64_t>& train, const std::vector<std::int64_t>& test,
                 std::vector<double>& xtr, std::vector<double>& xte) {
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
void noise_ceiling(const std::vector<double>& raw, std::int64_t t,
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
        sum2 += raw[k * t + c] * raw[k * t + c];
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

} // namespace

void encode(const EncodeOptions& opt, MPI_Comm comm) {
  validate(opt);
  StageTimer timer("encode");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  const std::vector<double> alphas = opt.alphas.empty() ? default_alphas() : opt.alphas;

  // 1. Inputs.
  io::File ff = io::File::open(opt.features, comm);
  const io::FeaturesInfo fi = with_context("while checking features " + opt.features,
                                           [&] { return io::check_features(ff); });
  io::File bf = io::File::open(opt.brain, comm);
  const io::BrainInfo bi =
      with_context("while checking brain " + opt.brain, [&] { return io::check_brain(bf); });
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
  if (opt.alpha_cv == "kfold") {
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
  std::vector<std::int64_t> row_of(size_t(fi.n), -1); // image -> row in train or test
  for (std::int64_t r = 0; r < n; ++r)
    row_of[train[r]] = r;
  for (std::int64_t r = 0; r < m; ++r)
    row_of[test[r]] = r;

  // 3. This rank's targets: a block of voxels, or of sensors with all their times.
  const bool meg = bi.modality == "meg";
  const std::int64_t units = meg ? bi.sensors : bi.targets, per_unit = meg ? bi.times : 1;
  const mpi::Block ub = mpi::block_of(units, p, me);
  const std::int64_t t0 = ub.begin * per_unit, t = ub.size() * per_unit;
  auto resp = bf.dataset("/brain/responses");
  const auto raw = meg ? resp.read<double>({0, ub.begin, 0}, {bi.trials, ub.size(), bi.times})
                       : resp.read<double>({0, ub.begin}, {bi.trials, ub.size()});
  std::vector<double> ytr(size_t(n * t), 0.0), yte(size_t(m * t), 0.0);
  for (std::int64_t k = 0; k < bi.trials; ++k) {
    const std::int64_t img = trial_stim[k];
    double* dst = test_set.count(img) ? &yte[row_of[img] * t] : &ytr[row_of[img] * t];
    const double w = 1.0 / double(count[img]);
    for (std::int64_t c = 0; c < t; ++c)
      dst[c] += w * raw[k * t + c];
  }
  std::vector<double> nc, split_half;
  noise_ceiling(raw, t, trial_stim, test, nc, split_half);
  std::int64_t constant = 0;
  for (std::int64_t c = 0; c < t; ++c) {
    double mean = 0, var = 0;
    for (std::int64_t i = 0; i < n; ++i)
      mean += ytr[i * t + c];
    mean /= double(n);
    for (std::int64_t i = 0; i < n; ++i) {
      ytr[i * t + c] -= mean;
      var += ytr[i * t + c] * ytr[i * t + c];
    }
    for (std::int64_t i = 0; i < m; ++i)
      yte[i * t + c] -= mean;
    constant += var == 0 ? 1 : 0;
  }
  constant = mpi::sum(comm, constant);
  if (constant > 0)
    GM_WARN("encode: " << constant << " targets are constant over the training images; their "
                       << "scores are NaN");
  GM_INFO("encode: " << fi.kinds.size() << " kinds x " << fi.layers.size() << " layers, "
                     << bi.targets << " targets (" << bi.modality << "), " << n << " training / "
                     << m << " test images, " << alphas.size() << " alphas, " << p << " ranks");

  // 4-5. Fit every (kind, layer); write the rank's columns.
  const std::int64_t L = std::int64_t(fi.layers.size());
  io::OutputFile out(opt.out, comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "modality", bi.modality);
  f.set_attr("/", "features", opt.features);
  f.set_attr("/", "brain", opt.brain);
  f.set_attr("/", "layers", fi.layers);
  f.set_attr("/", "alphas", alphas);
  f.set_attr("/", "alpha_cv", opt.alpha_cv);
  f.set_attr("/", "n_train", n);
  f.set_attr("/", "n_test", m);
  if (meg)
    f.set_attr("/", "target_shape", std::vector<std::int64_t>{bi.sensors, bi.times});
  Progress progress("encode", std::int64_t(fi.kinds.size()) * L, "feature sets");
  for (const auto& kind : fi.kinds) {
    std::vector<float> r_out(size_t(L * t)), r2_out(size_t(L * t)), a_out(size_t(L * t));
    for (std::int64_t l = 0; l < L; ++l) {
      auto ds = ff.dataset("/features/" + kind + "/" + fi.layers[l]);
      const std::int64_t dim = ds.shape()[1];
      const auto x = ds.read_all<float>();
      std::vector<double> xtr, xte;
      standardise(x, dim, train, test, xtr, xte);
      const RidgeBasis basis = make_basis(xtr, n, dim, xte, m);
      const RidgeScores sc = opt.alpha_cv == "kfold"
                                 ? fit_kfold(basis, xtr, dim, ytr, yte, t, alphas, fold, opt.folds)
                                 : fit_loo(basis, ytr, yte, t, alphas);
      for (std::int64_t c = 0; c < t; ++c) {
        r_out[l * t + c] = float(sc.r[c]);
        r2_out[l * t + c] = float(sc.r2[c]);
        a_out[l * t + c] = float(sc.alpha[c]);
      }
      if (opt.store_predictions)
        f.create_dataset("/" + kind + "/prediction/" + fi.layers[l], io::DType::f32,
                         {m, bi.targets})
            .write(std::vector<float>(sc.prediction.begin(), sc.prediction.end()).data(), {0, t0},
                   {t ? m : 0, t});
      progress.advance();
    }
    f.create_dataset("/" + kind + "/r", io::DType::f32, {L, bi.targets})
        .write(r_out.data(), {0, t0}, {t ? L : 0, t});
    // r normalised by sqrt(NC), the ceiling of r for the averaged test responses.
    std::vector<float> rn(r_out.size());
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t c = 0; c < t; ++c)
        rn[l * t + c] = nc[c] > 0 ? float(r_out[l * t + c] / std::sqrt(nc[c])) : NAN;
    f.create_dataset("/" + kind + "/r_normalised", io::DType::f32, {L, bi.targets})
        .write(rn.data(), {0, t0}, {t ? L : 0, t});
    f.create_dataset("/" + kind + "/r2", io::DType::f32, {L, bi.targets})
        .write(r2_out.data(), {0, t0}, {t ? L : 0, t});
    f.create_dataset("/" + kind + "/alpha", io::DType::f32, {L, bi.targets})
        .write(a_out.data(), {0, t0}, {t ? L : 0, t});
  }
  auto write_targets = [&](const std::string& name, const std::vector<double>& v) {
    std::vector<float> buf(v.begin(), v.end());
    f.create_dataset(name, io::DType::f32, {bi.targets}).write(buf.data(), {t0}, {t});
  };
  write_targets("/noise_ceiling/nc", nc);
  write_targets("/noise_ceiling/split_half", split_half);
  f.write_small("/split/train_stimuli", train, {n});
  f.write_small("/split/test_stimuli", test, {m});
  if (opt.alpha_cv == "kfold") {
    f.write_small("/split/fold", fold, {n}); // fold of each training image (order of train_stimuli)
    f.set_attr("/", "folds", std::int64_t{opt.folds});
  }
  progress.finish();
  out.commit();
  GM_INFO("encode: wrote " << opt.out);
}

} // namespace gradmap::encoding
