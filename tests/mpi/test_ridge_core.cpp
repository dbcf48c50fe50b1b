// The numerical cores of `gradmap encode` against brute force in the test (run at 1, 2 and 4 ranks
// with the other MPI tests): efficient leave-one-out ridge (fit_loo) against refitting without
// each row, K-fold (fit_kfold and the Gram form fit_kfold_gram) against refitting on each fold's
// training rows, the dual (kernel) basis against the primal one (collective over the ranks),
// and the float32 permutation/bootstrap kernel (accumulate_nulls) against double-precision sums.
// The brute force solves (X^T X + a I) beta = X^T y by Gaussian elimination with each fit
// centred with its own training means (the unpenalised intercept).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <set>

#include "gradmap/encoding/nulls.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/environment.hpp"

using namespace gradmap::encoding;

namespace {
using Mat = std::vector<double>; // row-major

// beta of ridge on centred rows (x [n, p], y [n]) with penalty a (per feature: pen[j] x a when
// pen is given).
std::vector<double> ridge_beta(const Mat& x, std::int64_t n, std::int64_t p,
                               const std::vector<double>& y, double a,
                               const std::vector<double>& pen = {}) {
  Mat g(static_cast<size_t>(p * (p + 1)), 0.0); // [A | b]
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < p; ++j) {
      for (std::int64_t k = 0; k < p; ++k)
        g[j * (p + 1) + k] += x[i * p + j] * x[i * p + k];
      g[j * (p + 1) + p] += x[i * p + j] * y[i];
    }
  for (std::int64_t j = 0; j < p; ++j)
    g[j * (p + 1) + j] += a * (pen.empty() ? 1.0 : pen[j]);
  for (std::int64_t c = 0; c < p; ++c) { // Gauss-Jordan, partial pivoting
    std::int64_t piv = c;
    for (std::int64_t r = c + 1; r < p; ++r)
      if (std::abs(g[r * (p + 1) + c]) > std::abs(g[piv * (p + 1) + c]))
        piv = r;
    for (std::int64_t k = 0; k <= p; ++k)
      std::swap(g[c * (p + 1) + k], g[piv * (p + 1) + k]);
    for (std::int64_t r = 0; r < p; ++r) {
      if (r == c)
        continue;
      const double f = g[r * (p + 1) + c] / g[c * (p + 1) + c];
      for (std::int64_t k = c; k <= p; ++k)
        g[r * (p + 1) + k] -= f * g[c * (p + 1) + k];
    }
  }
  std::vector<double> beta(static_cast<size_t>(p));
  for (std::int64_t j = 0; j < p; ++j)
    beta[j] = g[j * (p + 1) + p] / g[j * (p + 1) + j];
  return beta;
}

// Prediction of y at the rows `at` from ridge on the rows `fit` (each centred with the fit rows'
// means: the intercept).
std::vector<double> refit_predict(const Mat& x, std::int64_t p, const std::vector<double>& y,
                                  const std::vector<std::int64_t>& fit,
                                  const std::vector<std::int64_t>& at, double a,
                                  const std::vector<double>& pen = {}) {
  const std::int64_t k = std::int64_t(fit.size());
  std::vector<double> mx(static_cast<size_t>(p), 0.0);
  double my = 0;
  for (auto i : fit) {
    for (std::int64_t j = 0; j < p; ++j)
      mx[j] += x[i * p + j] / double(k);
    my += y[i] / double(k);
  }
  Mat xc(static_cast<size_t>(k * p));
  std::vector<double> yc(static_cast<size_t>(k));
  for (std::int64_t r = 0; r < k; ++r) {
    for (std::int64_t j = 0; j < p; ++j)
      xc[r * p + j] = x[fit[r] * p + j] - mx[j];
    yc[r] = y[fit[r]] - my;
  }
  const auto beta = ridge_beta(xc, k, p, yc, a, pen);
  std::vector<double> out;
  for (auto i : at) {
    double v = my;
    for (std::int64_t j = 0; j < p; ++j)
      v += (x[i * p + j] - mx[j]) * beta[j];
    out.push_back(v);
  }
  return out;
}

// Mean squared leave-one-out residual of ridge on the n training rows of x (refitting without each
// row; per-feature penalty factors pen when given).
double loo_mse(const Mat& x, std::int64_t n, std::int64_t p, const std::vector<double>& y, double a,
               const std::vector<double>& pen = {}) {
  double sse = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<std::int64_t> fit;
    for (std::int64_t k = 0; k < n; ++k)
      if (k != i)
        fit.push_back(k);
    const double e = y[i] - refit_predict(x, p, y, fit, {i}, a, pen)[0];
    sse += e * e;
  }
  return sse / double(n);
}

struct Data {
  std::int64_t n = 48, p = 7, m = 12, t = 4;
  Mat x, xt;                 // standardised training / test features
  std::vector<double> y, yt; // [n, t], [m, t], centred with the training means
  std::vector<double> alphas = {0.01, 0.3, 3, 30, 300};
};

Data make_data(unsigned seed) {
  Data d;
  std::mt19937 rng(seed);
  std::normal_distribution<double> z(0, 1);
  Mat raw(static_cast<size_t>((d.n + d.m) * d.p));
  for (auto& v : raw)
    v = z(rng);
  for (std::int64_t j = 0; j < d.p; ++j) { // standardise with training statistics
    double mu = 0, ss = 0;
    for (std::int64_t i = 0; i < d.n; ++i)
      mu += raw[i * d.p + j] / double(d.n);
    for (std::int64_t i = 0; i < d.n; ++i)
      ss += (raw[i * d.p + j] - mu) * (raw[i * d.p + j] - mu);
    const double sd = std::sqrt(ss / double(d.n));
    for (std::int64_t i = 0; i < d.n + d.m; ++i)
      raw[i * d.p + j] = (raw[i * d.p + j] - mu) / sd;
  }
  d.x.assign(raw.begin(), raw.begin() + d.n * d.p);
  d.xt.assign(raw.begin() + d.n * d.p, raw.end());
  // Targets of different signal-to-noise, so that different alphas win.
  d.y.assign(static_cast<size_t>(d.n * d.t), 0.0);
  d.yt.assign(static_cast<size_t>(d.m * d.t), 0.0);
  for (std::int64_t c = 0; c < d.t; ++c) {
    std::vector<double> w(static_cast<size_t>(d.p));
    for (auto& v : w)
      v = z(rng);
    const double noise = 0.3 * std::pow(4.0, double(c));
    for (std::int64_t i = 0; i < d.n + d.m; ++i) {
      double v = noise * z(rng);
      for (std::int64_t j = 0; j < d.p; ++j)
        v += raw[i * d.p + j] * w[j];
      (i < d.n ? d.y[i * d.t + c] : d.yt[(i - d.n) * d.t + c]) = v;
    }
  }
  for (std::int64_t c = 0; c < d.t; ++c) {
    double mu = 0;
    for (std::int64_t i = 0; i < d.n; ++i)
      mu += d.y[i * d.t + c] / double(d.n);
    for (std::int64_t i = 0; i < d.n; ++i)
      d.y[i * d.t + c] -= mu;
    for (std::int64_t i = 0; i < d.m; ++i)
      d.yt[i * d.t + c] -= mu;
  }
  return d;
}

std::vector<double> column(const std::vector<double>& y, std::int64_t rows, std::int64_t t,
                           std::int64_t c) {
  std::vector<double> out(static_cast<size_t>(rows));
  for (std::int64_t i = 0; i < rows; ++i)
    out[i] = y[i * t + c];
  return out;
}

// The brute-force choice: the first alpha with the smallest criterion, then the test prediction
// of the refit on all training rows.
void expect_choice_and_prediction(const Data& d, const RidgeScores& sc,
                                  const std::vector<std::vector<double>>& crit /* [t][a] */) {
  std::vector<std::int64_t> all(static_cast<size_t>(d.n)), none;
  for (std::int64_t i = 0; i < d.n; ++i)
    all[i] = i;
  Mat xall = d.x;
  xall.insert(xall.end(), d.xt.begin(), d.xt.end());
  std::vector<std::int64_t> test;
  for (std::int64_t i = 0; i < d.m; ++i)
    test.push_back(d.n + i);
  for (std::int64_t c = 0; c < d.t; ++c) {
    size_t best = 0;
    for (size_t a = 1; a < d.alphas.size(); ++a)
      if (crit[c][a] < crit[c][best])
        best = a;
    EXPECT_EQ(sc.alpha[c], d.alphas[best]) << "target " << c;
    auto yall = column(d.y, d.n, d.t, c);
    yall.resize(static_cast<size_t>(d.n + d.m), 0.0);
    const auto pred = refit_predict(xall, d.p, yall, all, test, d.alphas[best]);
    for (std::int64_t i = 0; i < d.m; ++i)
      EXPECT_NEAR(sc.prediction[i * d.t + c], pred[i], 1e-9) << "target " << c << " row " << i;
  }
}
} // namespace

TEST(RidgeCore, EfficientLeaveOneOutEqualsRefitting) {
  const Data d = make_data(11);
  const RidgeBasis b = make_basis(d.x, d.n, d.p, d.xt, d.m);
  const RidgeScores sc = fit_loo(b, d.y, d.yt, d.t, d.alphas);
  std::vector<std::vector<double>> crit(static_cast<size_t>(d.t));
  for (std::int64_t c = 0; c < d.t; ++c) {
    const auto y = column(d.y, d.n, d.t, c);
    for (double a : d.alphas)
      crit[c].push_back(loo_mse(d.x, d.n, d.p, y, a));
  }
  expect_choice_and_prediction(d, sc, crit);
  // The chosen alphas differ across targets (the test would not see a per-target mix-up).
  EXPECT_NE(sc.alpha.front(), sc.alpha.back());
  // Scores: Pearson r and R^2 of the predictions.
  std::vector<double> r, r2;
  score_columns(sc.prediction, d.yt, d.m, d.t, r, r2);
  for (std::int64_t c = 0; c < d.t; ++c) {
    EXPECT_NEAR(sc.r[c], r[c], 1e-12);
    double sse = 0, sst = 0, mu = 0;
    for (std::int64_t i = 0; i < d.m; ++i)
      mu += d.yt[i * d.t + c] / double(d.m);
    for (std::int64_t i = 0; i < d.m; ++i) {
      sse += std::pow(d.yt[i * d.t + c] - sc.prediction[i * d.t + c], 2);
      sst += std::pow(d.yt[i * d.t + c] - mu, 2);
    }
    EXPECT_NEAR(sc.r2[c], 1 - sse / sst, 1e-10);
  }
  // float32 selection picks the same alphas (the near-ties are rechecked in float64).
  const RidgeScores s32 = fit_loo(b, d.y, d.yt, d.t, d.alphas, Precision::float32);
  EXPECT_EQ(s32.alpha, sc.alpha);
}

// The float32 selection at realistic sizes with mostly noise targets (MEG sensors before the
// stimulus, voxels outside the visual cortex): their LOO criterion is nearly flat over the
// large alphas, within a relative 1e-4, so a tolerance rule sends them all to the float64
// recheck. The fitted form's error bound must settle nearly all of them, and the choice and
// criterion must still be float64's.
TEST(RidgeCore, Float32SelectionSettlesNoiseTargetsWithoutRecheck) {
  const std::int64_t n = 1500, p = 120, m = 40, t = 400;
  std::mt19937 rng(21);
  std::normal_distribution<double> z(0, 1);
  Mat x(static_cast<size_t>(n * p)), xt(static_cast<size_t>(m * p));
  for (auto& v : x)
    v = z(rng);
  for (auto& v : xt)
    v = z(rng);
  std::vector<double> y(static_cast<size_t>(n * t)), yt(static_cast<size_t>(m * t));
  for (std::int64_t c = 0; c < t; ++c) {
    const double gain = c % 4 == 0 ? 0.05 * double(c % 16) : 0.0; // 3/4 pure noise
    std::vector<double> w(static_cast<size_t>(p));
    for (auto& v : w)
      v = z(rng) * gain / std::sqrt(double(p));
    for (std::int64_t i = 0; i < n + m; ++i) {
      const double* xi = i < n ? &x[i * p] : &xt[(i - n) * p];
      double v = z(rng);
      for (std::int64_t j = 0; j < p; ++j)
        v += xi[j] * w[j];
      (i < n ? y[i * t + c] : yt[(i - n) * t + c]) = v;
    }
  }
  for (std::int64_t c = 0; c < t; ++c) { // centre with the training means
    double mu = 0;
    for (std::int64_t i = 0; i < n; ++i)
      mu += y[i * t + c] / double(n);
    for (std::int64_t i = 0; i < n; ++i)
      y[i * t + c] -= mu;
    for (std::int64_t i = 0; i < m; ++i)
      yt[i * t + c] -= mu;
  }
  std::vector<double> alphas;
  for (int k = 0; k < 10; ++k)
    alphas.push_back(std::pow(10.0, -1.0 + k)); // encode's default grid, 1e-1 ... 1e8
  const RidgeBasis b = make_basis(x, n, p, xt, m);
  const RidgeScores s64 = fit_loo(b, y, yt, t, alphas, Precision::float64);
  const RidgeScores s32 = fit_loo(b, y, yt, t, alphas, Precision::float32);
  EXPECT_EQ(s32.alpha, s64.alpha);
  std::set<double> chosen(s64.alpha.begin(), s64.alpha.end());
  EXPECT_GE(chosen.size(), 3U); // noise targets take the largest alphas, signal ones smaller
  EXPECT_EQ(s32.prediction, s64.prediction);
  EXPECT_LE(s32.rechecked, t / 20) << "float64 rechecks of the float32 selection";
  // The bound holds for every target and alpha (it is loose, up to ~1e-4 relative at the small
  // alphas, where f ~ 1, but it only has to separate the best alpha from the others).
  std::vector<double> bound;
  const auto e32 = loo_criterion(b, y, t, alphas, Precision::float32, &bound);
  const auto e64 = loo_criterion(b, y, t, alphas, Precision::float64);
  const std::int64_t na = std::int64_t(alphas.size());
  std::int64_t near_1e4 = 0;
  double worst = 0;
  for (std::int64_t c = 0; c < t; ++c) {
    double best = e64[c];
    for (std::int64_t a = 0; a < na; ++a)
      best = std::min(best, e64[a * t + c]);
    int close = 0;
    for (std::int64_t a = 0; a < na; ++a) {
      const size_t i = size_t(a * t + c);
      EXPECT_LE(std::abs(e32[i] - e64[i]), bound[i]) << "alpha " << a << " target " << c;
      worst = std::max(worst, std::abs(e32[i] - e64[i]) / e64[i]);
      close += e64[i] <= best * (1 + 1e-4) ? 1 : 0;
    }
    near_1e4 += close > 1 ? 1 : 0;
  }
  EXPECT_GT(near_1e4, t / 2) << "the data should hold many near-flat criteria";
  EXPECT_LT(worst, 1e-7);
  std::printf("float32 LOO: %lld of %lld targets within a relative 1e-4 of another alpha, %lld "
              "rechecked; worst relative error %.2e\n",
              (long long)near_1e4, (long long)t, (long long)s32.rechecked, worst);
}

TEST(RidgeCore, KFoldAndGramFormEqualRefittingOnEachFold) {
  const Data d = make_data(12);
  const int K = 4;
  std::vector<std::int32_t> fold(static_cast<size_t>(d.n));
  for (std::int64_t i = 0; i < d.n; ++i)
    fold[i] = std::int32_t(i * K / d.n); // contiguous: the rows are ordered by fold
  const RidgeBasis b = make_basis(d.x, d.n, d.p, d.xt, d.m);
  std::vector<FoldBasis> folds(static_cast<size_t>(K));
  for (int f = 0; f < K; ++f) {
    std::vector<double> xtr, xva;
    fold_rows(d.x, d.n, d.p, fold, f, folds[f], xtr, xva);
    folds[f].basis = make_basis(xtr, std::int64_t(folds[f].train.size()), d.p, xva,
                                std::int64_t(folds[f].valid.size()));
    finish_fold(folds[f]);
  }
  const RidgeScores sc = fit_kfold(b, folds, d.y, d.yt, d.t, d.alphas);
  std::vector<std::vector<double>> crit(static_cast<size_t>(d.t));
  for (std::int64_t c = 0; c < d.t; ++c) {
    const auto y = column(d.y, d.n, d.t, c);
    for (double a : d.alphas) {
      double sse = 0;
      for (int f = 0; f < K; ++f) {
        std::vector<std::int64_t> fit, held;
        for (std::int64_t i = 0; i < d.n; ++i)
          (fold[i] == f ? held : fit).push_back(i);
        const auto pred = refit_predict(d.x, d.p, y, fit, held, a);
        for (size_t k = 0; k < held.size(); ++k)
          sse += std::pow(y[held[k]] - pred[k], 2);
      }
      crit[c].push_back(sse);
    }
  }
  expect_choice_and_prediction(d, sc, crit);
  // The Gram (p x p) form: the same choice and predictions.
  GramBasis gb;
  gb.x = d.x;
  gb.n = d.n;
  gb.p = d.p;
  make_gram_full(gb, d.xt, d.m);
  for (int f = 0; f < K; ++f)
    gb.folds.push_back(
        make_gram_fold(gb, std::int64_t(f) * d.n / K, std::int64_t(f + 1) * d.n / K));
  const RidgeScores sg = fit_kfold_gram(gb, d.y, d.yt, d.t, d.alphas);
  EXPECT_EQ(sg.alpha, sc.alpha);
  for (size_t i = 0; i < sc.prediction.size(); ++i)
    EXPECT_NEAR(sg.prediction[i], sc.prediction[i], 1e-9);
  const RidgeScores sg32 = fit_kfold_gram(gb, d.y, d.yt, d.t, d.alphas, Precision::float32);
  EXPECT_EQ(sg32.alpha, sc.alpha);
}

TEST(RidgeCore, DualBasisOverTheRanksEqualsThePrimal) {
  // p > n: the kernel form, its eigendecomposition collective over all ranks.
  Data d = make_data(13);
  const std::int64_t p2 = 60; // widen the features with random columns (standardised)
  std::mt19937 rng(5);
  std::normal_distribution<double> z(0, 1);
  auto widen = [&](const Mat& x, std::int64_t rows) {
    Mat out(static_cast<size_t>(rows * p2));
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < p2; ++j)
        out[i * p2 + j] = j < d.p ? x[i * d.p + j] : 0.2 * z(rng);
    return out;
  };
  const Mat x = widen(d.x, d.n), xt = widen(d.xt, d.m);
  const RidgeBasis primal = make_basis(x, d.n, p2, xt, d.m);
  const RidgeBasis dual = make_basis_dual(x, d.n, p2, xt, d.m, MPI_COMM_WORLD);
  const RidgeScores a = fit_loo(primal, d.y, d.yt, d.t, d.alphas);
  const RidgeScores b = fit_loo(dual, d.y, d.yt, d.t, d.alphas);
  EXPECT_EQ(a.alpha, b.alpha);
  for (size_t i = 0; i < a.prediction.size(); ++i)
    EXPECT_NEAR(a.prediction[i], b.prediction[i], 1e-8);
}

TEST(RidgeCore, GramBasisOverTheRanksEqualsTheSvd) {
  // n >= p: make_basis_gram (Gram eigenvectors, a CholeskyQR pass, the eigendecomposition of
  // the small factor's B B^T; rows split over all ranks) against dgesdd, on features with
  // near-collinear columns (s down to ~1e-6 s_0), an exact duplicate and a zero column.
  Data d = make_data(15);
  const std::int64_t p2 = 24;
  std::mt19937 rng(9);
  std::normal_distribution<double> z(0, 1);
  auto widen = [&](const Mat& x, std::int64_t rows) {
    Mat out(static_cast<size_t>(rows * p2), 0.0);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < p2; ++j) {
        const double* xi = &x[size_t(i * d.p)];
        double v = 0;
        if (j < d.p)
          v = xi[j];
        else if (j < 2 * d.p) // near-collinear: column j - p plus 1e-6 noise
          v = xi[j - d.p] + 1e-6 * double(j) * z(rng);
        else if (j == 2 * d.p)
          v = xi[0]; // exact duplicate
        else if (j == 2 * d.p + 1)
          v = 0.0; // constant
        else
          v = 0.3 * z(rng);
        out[size_t(i * p2 + j)] = v;
      }
    return out;
  };
  const Mat x = widen(d.x, d.n), xt = widen(d.xt, d.m);
  const RidgeBasis svd = make_basis(x, d.n, p2, xt, d.m);
  const RidgeBasis gram = make_basis_gram(x, d.n, p2, xt, d.m, MPI_COMM_WORLD);
  ASSERT_EQ(gram.n, d.n);
  ASSERT_EQ(gram.m, d.m);
  ASSERT_LE(gram.r, svd.r);
  ASSERT_GE(gram.r, 2 * d.p);               // the near-collinear directions (s ~ 1e-6 s_0) are kept
  for (std::int64_t k = 0; k < gram.r; ++k) // s^2 to the eigenvalues' rounding
    EXPECT_NEAR(gram.s[k] * gram.s[k], svd.s[k] * svd.s[k], 1e-13 * svd.s[0] * svd.s[0]) << k;
  for (std::int64_t a = 0; a < gram.r; ++a) // U orthonormal
    for (std::int64_t b = 0; b < gram.r; ++b) {
      double dot = 0;
      for (std::int64_t i = 0; i < d.n; ++i)
        dot += gram.u[size_t(i * gram.r + a)] * gram.u[size_t(i * gram.r + b)];
      EXPECT_NEAR(dot, a == b ? 1.0 : 0.0, 1e-12);
    }
  const RidgeScores a = fit_loo(svd, d.y, d.yt, d.t, d.alphas);
  const RidgeScores b = fit_loo(gram, d.y, d.yt, d.t, d.alphas);
  EXPECT_EQ(a.alpha, b.alpha);
  for (size_t i = 0; i < a.prediction.size(); ++i)
    EXPECT_NEAR(a.prediction[i], b.prediction[i], 1e-8);
  // All-zero features: no directions, as make_basis.
  const RidgeBasis zero = make_basis_gram(Mat(x.size(), 0.0), d.n, p2, xt, d.m, MPI_COMM_WORLD);
  EXPECT_EQ(zero.r, 0);
}

TEST(RidgeCore, BandedRidgeEqualsPerBandPenaltiesAndTheBruteForceChoice) {
  // Two bands of the standardised features: columns 0-3 and 4-6. Candidate k is ridge on
  // [sqrt(w_k) X_1, sqrt(1 - w_k) X_2], i.e. penalties a / w_k and a / (1 - w_k) per band
  // (w = 1: the second band left out). The per-target choice over (w, a) by the LOO criterion
  // must equal brute force over the same grid with per-band penalties.
  const Data d = make_data(14);
  const std::int64_t p1 = 4;
  const std::vector<double> weights = {1.0, 0.8, 0.5, 0.2};
  std::vector<RidgeScores> cand;
  for (double w : weights) {
    auto scaled = [&](const Mat& x, std::int64_t rows) {
      Mat z = x;
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < d.p; ++j)
          z[i * d.p + j] *= std::sqrt(j < p1 ? w : 1 - w);
      return z;
    };
    const RidgeBasis b = make_basis(scaled(d.x, d.n), d.n, d.p, scaled(d.xt, d.m), d.m);
    cand.push_back(fit_loo(b, d.y, d.yt, d.t, d.alphas));
  }
  std::vector<std::int32_t> chosen;
  const RidgeScores sc = select_per_target(cand, d.m, d.t, chosen);
  Mat xall = d.x;
  xall.insert(xall.end(), d.xt.begin(), d.xt.end());
  std::vector<std::int64_t> all, test;
  for (std::int64_t i = 0; i < d.n; ++i)
    all.push_back(i);
  for (std::int64_t i = 0; i < d.m; ++i)
    test.push_back(d.n + i);
  // Per-feature penalty factors of band weight w; the left-out band (share 0): its columns zeroed
  // (a huge penalty would do the same up to rounding).
  auto band_design = [&](double w, std::vector<double>& pen) {
    pen.assign(static_cast<size_t>(d.p), 1.0);
    Mat xk = xall;
    for (std::int64_t j = 0; j < d.p; ++j) {
      const double share = j < p1 ? w : 1 - w;
      if (share > 0)
        pen[j] = 1 / share;
      else
        for (std::int64_t i = 0; i < d.n + d.m; ++i)
          xk[i * d.p + j] = 0;
    }
    return xk;
  };
  std::set<std::int32_t> seen;
  for (std::int64_t c = 0; c < d.t; ++c) {
    auto y = column(d.y, d.n, d.t, c);
    double best = INFINITY;
    size_t bw = 0, ba = 0;
    for (size_t k = 0; k < weights.size(); ++k) {
      std::vector<double> pen;
      const Mat xk = band_design(weights[k], pen);
      for (size_t a = 0; a < d.alphas.size(); ++a) {
        const double mse = loo_mse(xk, d.n, d.p, y, d.alphas[a], pen);
        if (mse < best) {
          best = mse;
          bw = k;
          ba = a;
        }
      }
    }
    EXPECT_EQ(chosen[c], std::int32_t(bw)) << "target " << c;
    EXPECT_EQ(sc.alpha[c], d.alphas[ba]) << "target " << c;
    EXPECT_NEAR(sc.cv_error[c], best, 1e-10 * best);
    seen.insert(chosen[c]);
    // The refit with the chosen per-band penalties on all training rows.
    std::vector<double> pen;
    const Mat xk = band_design(weights[bw], pen);
    y.resize(static_cast<size_t>(d.n + d.m), 0.0);
    const auto pred = refit_predict(xk, d.p, y, all, test, d.alphas[ba], pen);
    for (std::int64_t i = 0; i < d.m; ++i)
      EXPECT_NEAR(sc.prediction[i * d.t + c], pred[i], 1e-9) << "target " << c << " row " << i;
  }
  EXPECT_GE(seen.size(), 2U); // the targets do not all pick the same band weight
}

TEST(RidgeCore, NullsKernelEqualsDoublePrecisionSums) {
  const std::int64_t m = 30, t = 70; // more targets than one block of SIMD lanes
  // replicate counts that leave a partial last group in both kernels (8 and 4 per call)
  const int P = 301, Bb = 99;
  std::mt19937 rng(9);
  std::normal_distribution<double> z(0, 1);
  std::vector<double> pred(static_cast<size_t>(m * t)), y(pred.size());
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < t; ++c) {
      pred[i * t + c] = z(rng);
      y[i * t + c] = (c % 3 == 0 ? 0.8 * pred[i * t + c] : 0.0) + z(rng);
    }
  for (std::int64_t i = 0; i < m; ++i) // target 5: constant prediction, undefined r
    pred[i * t + 5] = 1.0;
  const Resamples rs = make_resamples(m, P, Bb, 4);
  std::vector<std::int32_t> group(static_cast<size_t>(t));
  for (std::int64_t c = 0; c < t; ++c)
    group[c] = std::int32_t(c % 2);
  NullAccumulator acc(rs, 2);
  std::vector<std::int32_t> exceed(static_cast<size_t>(t));
  std::vector<float> boot_r(static_cast<size_t>(Bb * t));
  accumulate_nulls(rs, pred, y, t, group.data(), acc, exceed.data(), 0, boot_r.data());
  auto pearson = [&](std::int64_t c, const std::uint32_t* perm, const std::uint32_t* count) {
    double sw = 0, sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
    for (std::int64_t i = 0; i < m; ++i) {
      const double w = count ? double(count[i]) : 1.0;
      const double a = pred[(perm ? perm[i] : i) * t + c], b = y[i * t + c];
      sw += w;
      sx += w * a;
      sy += w * b;
      sxx += w * a * a;
      syy += w * b * b;
      sxy += w * a * b;
    }
    return (sw * sxy - sx * sy) / std::sqrt((sw * sxx - sx * sx) * (sw * syy - sy * sy));
  };
  std::vector<double> perm_sum(static_cast<size_t>(2 * P), 0.0),
      boot_sum(static_cast<size_t>(2 * Bb), 0.0);
  std::vector<double> null_max(static_cast<size_t>(P), -1e300);
  for (std::int64_t c = 0; c < t; ++c) {
    if (c == 5) {
      EXPECT_EQ(exceed[c], -1);
      EXPECT_TRUE(std::isnan(boot_r[c]));
      continue;
    }
    const double r = pearson(c, nullptr, nullptr);
    std::int64_t ge = 0;
    bool near_tie = false;
    for (int b = 0; b < P; ++b) {
      const double rb = pearson(c, &rs.perm[size_t(b) * size_t(m)], nullptr);
      ge += rb >= r ? 1 : 0;
      near_tie |= std::abs(rb - r) < 1e-5; // float32 kernel vs double: a tie may go either way
      perm_sum[size_t(group[c]) * size_t(P) + size_t(b)] += rb;
      null_max[size_t(b)] = std::max(null_max[size_t(b)], rb);
    }
    if (!near_tie) {
      EXPECT_EQ(exceed[c], ge) << "target " << c;
    }
    for (int b = 0; b < Bb; ++b) {
      const double rb = pearson(c, nullptr, &rs.count[size_t(b) * size_t(m)]);
      EXPECT_NEAR(boot_r[size_t(b) * size_t(t) + size_t(c)], rb, 1e-5);
      boot_sum[size_t(group[c]) * size_t(Bb) + size_t(b)] += rb;
    }
  }
  for (size_t i = 0; i < perm_sum.size(); ++i)
    EXPECT_NEAR(acc.perm_sum[i], perm_sum[i], 1e-4);
  for (size_t i = 0; i < boot_sum.size(); ++i)
    EXPECT_NEAR(acc.boot_sum[i], boot_sum[i], 1e-4);
  for (int b = 0; b < P; ++b)
    EXPECT_NEAR(acc.null_max[size_t(b)], null_max[size_t(b)], 1e-5);
  EXPECT_EQ(acc.n[0] + acc.n[1], t - 1); // the undefined target is in no group mean
  // Signal targets (every third) sit in the upper tail of their permutation nulls.
  int low = 0;
  for (std::int64_t c = 0; c < t; c += 3)
    low += exceed[c] < 15 ? 1 : 0;
  EXPECT_GE(low, 20);
}

// The replicates are dealt to threads in groups (8 permutations, 4 bootstraps per kernel call):
// every output must be bit-identical whatever the number of threads.
TEST(RidgeCore, NullsKernelIgnoresTheThreadCount) {
  const std::int64_t m = 41, t = 150;
  std::mt19937 rng(3);
  std::normal_distribution<double> z(0, 1);
  std::vector<double> pred(static_cast<size_t>(m * t)), y(pred.size());
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < t; ++c) {
      pred[i * t + c] = z(rng);
      y[i * t + c] = 0.3 * pred[i * t + c] + z(rng);
    }
  const Resamples rs = make_resamples(m, 203, 51, 8);
  std::vector<std::int32_t> group(static_cast<size_t>(t));
  for (std::int64_t c = 0; c < t; ++c)
    group[c] = std::int32_t(c % 3);
  struct Out {
    std::vector<std::int32_t> exceed;
    std::vector<float> boot;
    NullAccumulator acc;
  };
  const int before = omp_get_max_threads();
  auto run = [&](int threads) {
    gradmap::mpi::Environment::set_blas_threads(threads);
    Out o{std::vector<std::int32_t>(static_cast<size_t>(t)),
          std::vector<float>(static_cast<size_t>(51 * t)), NullAccumulator(rs, 3, t, 0.2f)};
    accumulate_nulls(rs, pred, y, t, group.data(), o.acc, o.exceed.data(), 0, o.boot.data());
    return o;
  };
  const Out one = run(1), three = run(3);
  gradmap::mpi::Environment::set_blas_threads(before);
  EXPECT_EQ(one.exceed, three.exceed);
  EXPECT_EQ(one.boot, three.boot);
  EXPECT_EQ(one.acc.perm_sum, three.acc.perm_sum);
  EXPECT_EQ(one.acc.boot_sum, three.acc.boot_sum);
  EXPECT_EQ(one.acc.null_max, three.acc.null_max);
  EXPECT_EQ(one.acc.above, three.acc.above);
  std::int64_t set = 0; // the cluster bits are exercised: some targets above, most not
  for (auto word : one.acc.above)
    set += __builtin_popcountll(word);
  EXPECT_GT(set, 0);
  EXPECT_LT(set, 203 * t / 2);
}
