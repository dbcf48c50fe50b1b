#include "gradmap/encoding/ridge.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "gradmap/core/profile.hpp"
#include "gradmap/linalg/dense.hpp"

namespace gradmap::encoding {

RidgeBasis make_basis(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                      const std::vector<double>& x_test, std::int64_t m) {
  ProfileEvent ev("gm.ridge.svd");
  ProfileEvent::add_flops(4.0 * double(n) * double(p) * double(std::min(n, p)) +
                          2.0 * double(m) * double(p) * double(std::min(n, p)));
  RidgeBasis b;
  b.n = n;
  b.p = p;
  b.m = m;
  std::vector<double> u, s, vt;
  linalg::svd_thin(n, p, x_train, u, s, vt);
  // Drop numerically null directions (they carry no fit; their residual stays in y - yhat).
  const std::int64_t k = std::int64_t(s.size());
  std::int64_t r = 0;
  while (r < k && s[r] > 1e-10 * s[0])
    ++r;
  b.r = r;
  b.s.assign(s.begin(), s.begin() + r);
  b.u.resize(size_t(n * r));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < r; ++j)
      b.u[i * r + j] = u[i * k + j];
  // X_test V = X_test (V^T)^T: [m, p] x [p, r].
  b.test_v.assign(size_t(m * r), 0.0);
  linalg::gemm(false, true, m, r, p, 1.0, x_test.data(), vt.data(), 0.0, b.test_v.data());
  return b;
}

void score_columns(const std::vector<double>& pred, const std::vector<double>& y, std::int64_t m,
                   std::int64_t t, std::vector<double>& r, std::vector<double>& r2) {
  // Row-major passes with per-column accumulators (per column, the sums run in row order).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  r.assign(static_cast<size_t>(t), nan);
  r2.assign(static_cast<size_t>(t), nan);
  std::vector<double> mp(static_cast<size_t>(t), 0.0), my(static_cast<size_t>(t), 0.0);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < t; ++c) {
      mp[c] += pred[i * t + c];
      my[c] += y[i * t + c];
    }
  for (std::int64_t c = 0; c < t; ++c) {
    mp[c] /= double(m);
    my[c] /= double(m);
  }
  std::vector<double> spp(static_cast<size_t>(t), 0.0), syy(spp), spy(spp), sse(spp);
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t c = 0; c < t; ++c) {
      const double a = pred[i * t + c] - mp[c], b = y[i * t + c] - my[c];
      spp[c] += a * a;
      syy[c] += b * b;
      spy[c] += a * b;
      const double e = y[i * t + c] - pred[i * t + c];
      sse[c] += e * e;
    }
  for (std::int64_t c = 0; c < t; ++c) {
    if (spp[c] > 0 && syy[c] > 0)
      r[c] = spy[c] / std::sqrt(spp[c] * syy[c]);
    if (syy[c] > 0)
      r2[c] = 1.0 - sse[c] / syy[c];
  }
}

namespace {

// U^T Y, [r, t].
std::vector<double> project_targets(const RidgeBasis& b, const std::vector<double>& y,
                                    std::int64_t t) {
  std::vector<double> uty(static_cast<size_t>(b.r * t), 0.0);
  linalg::gemm(true, false, b.r, t, b.n, 1.0, b.u.data(), y.data(), 0.0, uty.data());
  return uty;
}

// Refit on all training images with each target's alpha (index into alphas; -1: none) and score
// on the test images: coefficients in the V basis B[:, c] = g(alpha_c) * U^T y_c, predictions
// X_test V B.
RidgeScores refit(const RidgeBasis& b, const std::vector<double>& y_train,
                  const std::vector<double>& y_test, std::int64_t t,
                  const std::vector<double>& alphas, const std::vector<std::int64_t>& which) {
  ProfileEvent ev("gm.ridge.refit");
  const std::int64_t n = b.n, r = b.r, m = b.m;
  ProfileEvent::add_flops(2.0 * double(r) * double(t) * double(n + m));
  const auto uty = project_targets(b, y_train, t);
  RidgeScores out;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  out.alpha.assign(static_cast<size_t>(t), nan);
  std::vector<double> coef(static_cast<size_t>(r * t), 0.0);
  std::vector<double> var(static_cast<size_t>(t), 0.0); // row-major pass, row order per column
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t c = 0; c < t; ++c)
      var[c] += y_train[i * t + c] * y_train[i * t + c];
  for (std::int64_t c = 0; c < t; ++c) {
    if (which[c] < 0 || var[c] == 0)
      continue; // constant target: no fit (reported as NaN)
    const double a = alphas[which[c]];
    out.alpha[c] = a;
    for (std::int64_t k = 0; k < r; ++k)
      coef[k * t + c] = b.s[k] / (b.s[k] * b.s[k] + a) * uty[k * t + c];
  }
  out.prediction.assign(static_cast<size_t>(m * t), 0.0);
  linalg::gemm(false, false, m, t, r, 1.0, b.test_v.data(), coef.data(), 0.0,
               out.prediction.data());
  score_columns(out.prediction, y_test, m, t, out.r, out.r2);
  for (std::int64_t c = 0; c < t; ++c)
    if (std::isnan(out.alpha[c]))
      out.r[c] = out.r2[c] = nan;
  return out;
}

// Per target, the first alpha with the smallest criterion (err [alphas, t]).
std::vector<std::int64_t> argmin_first(const std::vector<double>& err, std::int64_t n_alphas,
                                       std::int64_t t) {
  std::vector<std::int64_t> which(static_cast<size_t>(t), -1);
  std::vector<double> best(static_cast<size_t>(t), std::numeric_limits<double>::infinity());
  for (std::int64_t a = 0; a < n_alphas; ++a)
    for (std::int64_t c = 0; c < t; ++c)
      if (err[a * t + c] < best[c]) { // strict: the first alpha wins ties
        best[c] = err[a * t + c];
        which[c] = a;
      }
  return which;
}

} // namespace

RidgeScores fit_loo(const RidgeBasis& b, const std::vector<double>& y_train,
                    const std::vector<double>& y_test, std::int64_t t,
                    const std::vector<double>& alphas) {
  ProfileEvent ev("gm.ridge.loo");
  const std::int64_t n = b.n, r = b.r;
  ProfileEvent::add_flops(2.0 * double(n) * double(r) * double(t) * double(alphas.size() + 2));
  const auto uty = project_targets(b, y_train, t);
  // Residuals and 1 - h are formed from their complements, without cancellation when f -> 1
  // (small alpha, p >= n):  y - yhat = U diag(1 - f) U^T y + (y - U U^T y),
  //                         1 - h_i  = sum_k U_ik^2 (1 - f_k) + (1 - sum_k U_ik^2 - 1/n).
  // The -1/n: the data were centred with the training means, i.e. an unpenalised intercept was
  // fitted, whose direction 1/sqrt(n) has leverage 1/n. Leaving it out would make the "LOO"
  // leak the left-out row through the centring (and, for p >= n, always pick the smallest
  // alpha). This is scikit-learn's RidgeCV(fit_intercept=True) on standardised features.
  std::vector<double> yperp = y_train; // y - U U^T y, [n, t]
  linalg::gemm(false, false, n, t, r, -1.0, b.u.data(), uty.data(), 1.0, yperp.data());
  std::vector<double> outside(static_cast<size_t>(n)); // 1 - sum_k U_ik^2
  for (std::int64_t i = 0; i < n; ++i) {
    double acc = 0;
    for (std::int64_t k = 0; k < r; ++k)
      acc += b.u[i * r + k] * b.u[i * r + k];
    outside[i] = std::max(0.0, 1.0 - acc - 1.0 / double(n));
  }
  std::vector<double> err(alphas.size() * static_cast<size_t>(t), 0.0); // mean squared LOO
  std::vector<double> d(static_cast<size_t>(r * t)), resid(static_cast<size_t>(n * t)),
      g(static_cast<size_t>(r)), one_minus_h(static_cast<size_t>(n));
  for (size_t a = 0; a < alphas.size(); ++a) {
    for (std::int64_t k = 0; k < r; ++k)
      g[k] = alphas[a] / (b.s[k] * b.s[k] + alphas[a]); // 1 - f_k
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t c = 0; c < t; ++c)
        d[k * t + c] = g[k] * uty[k * t + c];
    resid = yperp;
    linalg::gemm(false, false, n, t, r, 1.0, b.u.data(), d.data(), 1.0, resid.data());
    for (std::int64_t i = 0; i < n; ++i) {
      double acc = outside[i];
      for (std::int64_t k = 0; k < r; ++k)
        acc += b.u[i * r + k] * b.u[i * r + k] * g[k];
      one_minus_h[i] = acc;
    }
    std::vector<double> sse(static_cast<size_t>(t), 0.0);
    for (std::int64_t i = 0; i < n; ++i) {
      const double w = 1.0 / one_minus_h[i];
      for (std::int64_t c = 0; c < t; ++c) {
        const double e = resid[i * t + c] * w;
        sse[c] += e * e;
      }
    }
    for (std::int64_t c = 0; c < t; ++c)
      err[a * t + c] = sse[c] / double(n);
  }
  return refit(b, y_train, y_test, t, alphas, argmin_first(err, std::int64_t(alphas.size()), t));
}

RidgeScores fit_kfold(const RidgeBasis& b, const std::vector<double>& x_train, std::int64_t p,
                      const std::vector<double>& y_train, const std::vector<double>& y_test,
                      std::int64_t t, const std::vector<double>& alphas,
                      const std::vector<std::int32_t>& fold, int folds) {
  ProfileEvent ev("gm.ridge.kfold");
  const std::int64_t n = b.n, na = std::int64_t(alphas.size());
  std::vector<double> err(static_cast<size_t>(na * t), 0.0);
  for (int f = 0; f < folds; ++f) {
    std::vector<std::int64_t> tr, va;
    for (std::int64_t i = 0; i < n; ++i)
      (fold[i] == f ? va : tr).push_back(i);
    const std::int64_t ntr = std::int64_t(tr.size()), nva = std::int64_t(va.size());
    // Centre with this fold's training means: the intercept of the fold's fit.
    std::vector<double> mx(static_cast<size_t>(p), 0.0), my(static_cast<size_t>(t), 0.0);
    for (auto i : tr) {
      for (std::int64_t j = 0; j < p; ++j)
        mx[j] += x_train[i * p + j] / double(ntr);
      for (std::int64_t c = 0; c < t; ++c)
        my[c] += y_train[i * t + c] / double(ntr);
    }
    auto take = [&](const std::vector<std::int64_t>& rows, const std::vector<double>& src,
                    std::int64_t w, const std::vector<double>& mean) {
      std::vector<double> out(static_cast<size_t>(std::int64_t(rows.size()) * w));
      for (size_t r = 0; r < rows.size(); ++r)
        for (std::int64_t j = 0; j < w; ++j)
          out[r * w + j] = src[rows[r] * w + j] - mean[j];
      return out;
    };
    const RidgeBasis fb =
        make_basis(take(tr, x_train, p, mx), ntr, p, take(va, x_train, p, mx), nva);
    const auto yf = take(tr, y_train, t, my), yv = take(va, y_train, t, my);
    const auto uty = project_targets(fb, yf, t);
    std::vector<double> coef(static_cast<size_t>(fb.r * t)), pred(static_cast<size_t>(nva * t));
    for (std::int64_t a = 0; a < na; ++a) {
      for (std::int64_t k = 0; k < fb.r; ++k)
        for (std::int64_t c = 0; c < t; ++c)
          coef[k * t + c] = fb.s[k] / (fb.s[k] * fb.s[k] + alphas[a]) * uty[k * t + c];
      linalg::gemm(false, false, nva, t, fb.r, 1.0, fb.test_v.data(), coef.data(), 0.0,
                   pred.data());
      for (std::int64_t i = 0; i < nva; ++i)
        for (std::int64_t c = 0; c < t; ++c) {
          const double e = yv[i * t + c] - pred[i * t + c];
          err[a * t + c] += e * e / double(n);
        }
    }
  }
  return refit(b, y_train, y_test, t, alphas, argmin_first(err, na, t));
}

} // namespace gradmap::encoding
