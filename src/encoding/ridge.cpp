#include "gradmap/encoding/ridge.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "gradmap/core/profile.hpp"
#include "gradmap/linalg/dense.hpp"
#include "gradmap/linalg/kernel_eig.hpp"

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
  b.u32.assign(b.u.begin(), b.u.end());
  // X_test V = X_test (V^T)^T: [m, p] x [p, r].
  b.test_v.assign(size_t(m * r), 0.0);
  linalg::gemm(false, true, m, r, p, 1.0, x_test.data(), vt.data(), 0.0, b.test_v.data());
  return b;
}

RidgeBasis make_basis_dual(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                           const std::vector<double>& x_test, std::int64_t m, MPI_Comm comm) {
  std::vector<double> w, z;
  linalg::kernel_eig(x_train, n, p, comm, w, z);
  ProfileEvent ev("gm.ridge.dual");
  RidgeBasis b;
  b.n = n;
  b.p = p;
  b.m = m;
  std::int64_t r = 0;
  while (r < n && w[size_t(r)] > 1e-12 * w[0])
    ++r;
  b.r = r;
  b.s.resize(size_t(r));
  for (std::int64_t k = 0; k < r; ++k)
    b.s[size_t(k)] = std::sqrt(w[size_t(k)]);
  b.u.resize(size_t(n * r));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t k = 0; k < r; ++k)
      b.u[size_t(i * r + k)] = z[size_t(i * n + k)];
  b.u32.assign(b.u.begin(), b.u.end());
  // X_test V = (X_test X_train^T) U diag(1/s).
  ProfileEvent::add_flops(2.0 * double(m) * double(n) * (double(p) + double(r)));
  std::vector<double> kt(size_t(m * n));
  linalg::gemm(false, true, m, n, p, 1.0, x_test.data(), x_train.data(), 0.0, kt.data());
  b.test_v.assign(size_t(m * r), 0.0);
  linalg::gemm(false, false, m, r, n, 1.0, kt.data(), b.u.data(), 0.0, b.test_v.data());
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t k = 0; k < r; ++k)
      b.test_v[size_t(i * r + k)] /= b.s[size_t(k)];
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

namespace {

// 1 - sum_k U_ik^2 - 1/n per training row (see loo_errors).
std::vector<double> outside_leverage(const RidgeBasis& b) {
  std::vector<double> outside(static_cast<size_t>(b.n));
  for (std::int64_t i = 0; i < b.n; ++i) {
    double acc = 0;
    for (std::int64_t k = 0; k < b.r; ++k)
      acc += b.u[i * b.r + k] * b.u[i * b.r + k];
    outside[i] = std::max(0.0, 1.0 - acc - 1.0 / double(b.n));
  }
  return outside;
}

template <class T> const std::vector<T>& u_of(const RidgeBasis& b);
template <> const std::vector<double>& u_of<double>(const RidgeBasis& b) {
  return b.u;
}
template <> const std::vector<float>& u_of<float>(const RidgeBasis& b) {
  return b.u32;
}

// sse[c] += sum_i ((resid[i, c] + base[i, c]) w_i)^2 for the t columns; threads over blocks of
// columns, rows in order within each column (the sums do not depend on the thread count).
template <class T>
void add_weighted_squares(const T* resid, const T* base, const double* w, std::int64_t n,
                          std::int64_t t, double* sse) {
  constexpr std::int64_t CB = 256;
#pragma omp parallel for schedule(static)
  for (std::int64_t c0 = 0; c0 < t; c0 += CB) {
    const std::int64_t c1 = std::min(t, c0 + CB);
    for (std::int64_t i = 0; i < n; ++i) {
      const T* rr = resid + i * t;
      const T* bb = base ? base + i * t : nullptr;
      const double wi = w ? w[i] : 1.0;
      for (std::int64_t c = c0; c < c1; ++c) {
        const double e = (double(rr[c]) + (bb ? double(bb[c]) : 0.0)) * wi;
        sse[c] += e * e;
      }
    }
  }
}

// Mean squared LOO residual [alphas, t] of the columns of y (n x t), GEMMs in precision T.
// Residuals and 1 - h are formed from their complements, without cancellation when f -> 1
// (small alpha, p >= n):  y - yhat = U diag(1 - f) U^T y + (y - U U^T y),
//                         1 - h_i  = sum_k U_ik^2 (1 - f_k) + (1 - sum_k U_ik^2 - 1/n).
// The -1/n: the data were centred with the training means, i.e. an unpenalised intercept was
// fitted, whose direction 1/sqrt(n) has leverage 1/n. Leaving it out would make the "LOO"
// leak the left-out row through the centring (and, for p >= n, always pick the smallest
// alpha). This is scikit-learn's RidgeCV(fit_intercept=True) on standardised features.
template <class T>
std::vector<double> loo_errors(const RidgeBasis& b, const std::vector<double>& y, std::int64_t t,
                               const std::vector<double>& alphas,
                               const std::vector<double>& outside) {
  const std::int64_t n = b.n, r = b.r;
  const std::vector<T>& u = u_of<T>(b);
  std::vector<T> yperp(y.begin(), y.end()), c(static_cast<size_t>(r * t));
  linalg::gemm(true, false, r, t, n, T(1), u.data(), yperp.data(), T(0), c.data()); // U^T y
  linalg::gemm(false, false, n, t, r, T(-1), u.data(), c.data(), T(1), yperp.data());
  std::vector<double> err(alphas.size() * static_cast<size_t>(t), 0.0);
  std::vector<T> d(static_cast<size_t>(r * t)), resid(static_cast<size_t>(n * t));
  std::vector<double> g(static_cast<size_t>(r)), w(static_cast<size_t>(n));
  for (size_t a = 0; a < alphas.size(); ++a) {
    for (std::int64_t k = 0; k < r; ++k)
      g[k] = alphas[a] / (b.s[k] * b.s[k] + alphas[a]); // 1 - f_k
#pragma omp parallel for schedule(static)
    for (std::int64_t k = 0; k < r; ++k)
      for (std::int64_t j = 0; j < t; ++j)
        d[k * t + j] = T(g[k] * double(c[k * t + j]));
    {
      ProfileEvent gev("gm.ridge.loo.gemm");
      linalg::gemm(false, false, n, t, r, T(1), u.data(), d.data(), T(0), resid.data());
    }
    ProfileEvent eev("gm.ridge.loo.errors");
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      double acc = outside[i];
      for (std::int64_t k = 0; k < r; ++k)
        acc += b.u[i * r + k] * b.u[i * r + k] * g[k];
      w[i] = 1.0 / acc;
    }
    double* sse = &err[a * size_t(t)];
    add_weighted_squares(resid.data(), yperp.data(), w.data(), n, t, sse);
    for (std::int64_t j = 0; j < t; ++j)
      sse[j] /= double(n);
  }
  return err;
}

// Columns whose best criterion is within a relative `tol` of another alpha's.
std::vector<std::int64_t> near_ties(const std::vector<double>& err, std::int64_t na, std::int64_t t,
                                    double tol) {
  std::vector<std::int64_t> cols;
  for (std::int64_t c = 0; c < t; ++c) {
    double best = std::numeric_limits<double>::infinity();
    for (std::int64_t a = 0; a < na; ++a)
      best = std::min(best, err[a * t + c]);
    int close = 0;
    for (std::int64_t a = 0; a < na; ++a)
      close += err[a * t + c] <= best * (1 + tol) + 1e-300 ? 1 : 0;
    if (close > 1)
      cols.push_back(c);
  }
  return cols;
}

// Recomputes the criterion of the near-tie columns of a float32 pass with `exact` (float64,
// on the gathered columns of y) and writes it back into err.
template <class F>
void recheck(std::vector<double>& err, const std::vector<double>& y, std::int64_t n, std::int64_t t,
             std::int64_t na, F&& exact) {
  const auto cols = near_ties(err, na, t, 1e-4);
  if (cols.empty())
    return;
  ProfileEvent ev("gm.ridge.recheck");
  const std::int64_t tc = std::int64_t(cols.size());
  std::vector<double> ys(static_cast<size_t>(n * tc));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < tc; ++j)
      ys[i * tc + j] = y[i * t + cols[j]];
  const std::vector<double> e = exact(ys, tc);
  for (std::int64_t a = 0; a < na; ++a)
    for (std::int64_t j = 0; j < tc; ++j)
      err[a * t + cols[j]] = e[a * tc + j];
}

} // namespace

RidgeScores fit_loo(const RidgeBasis& b, const std::vector<double>& y_train,
                    const std::vector<double>& y_test, std::int64_t t,
                    const std::vector<double>& alphas, Precision precision) {
  ProfileEvent ev("gm.ridge.loo");
  const std::int64_t n = b.n, r = b.r, na = std::int64_t(alphas.size());
  ProfileEvent::add_flops(2.0 * double(n) * double(r) * double(t) * double(na + 2));
  const auto outside = outside_leverage(b);
  std::vector<double> err;
  if (precision == Precision::float32) {
    err = loo_errors<float>(b, y_train, t, alphas, outside);
    recheck(err, y_train, n, t, na, [&](const std::vector<double>& ys, std::int64_t tc) {
      return loo_errors<double>(b, ys, tc, alphas, outside);
    });
  } else {
    err = loo_errors<double>(b, y_train, t, alphas, outside);
  }
  return refit(b, y_train, y_test, t, alphas, argmin_first(err, na, t));
}

namespace {

// Summed squared validation error / n [alphas, t] over the folds, GEMMs in precision T.
template <class T>
std::vector<double> kfold_errors(const std::vector<FoldBasis>& folds, std::int64_t n,
                                 const std::vector<double>& y, std::int64_t t,
                                 const std::vector<double>& alphas) {
  const std::int64_t na = std::int64_t(alphas.size());
  std::vector<double> err(static_cast<size_t>(na * t), 0.0);
  for (const FoldBasis& fd : folds) {
    const RidgeBasis& fb = fd.basis;
    const std::int64_t ntr = fb.n, nva = fb.m, r = fb.r;
    std::vector<double> my(static_cast<size_t>(t), 0.0);
    for (auto i : fd.train)
      for (std::int64_t c = 0; c < t; ++c)
        my[c] += y[i * t + c];
    for (auto& v : my)
      v /= double(ntr);
    std::vector<T> yf(static_cast<size_t>(ntr * t)), yv(static_cast<size_t>(nva * t));
    for (std::int64_t k = 0; k < ntr; ++k)
      for (std::int64_t c = 0; c < t; ++c)
        yf[k * t + c] = T(y[fd.train[k] * t + c] - my[c]);
    for (std::int64_t k = 0; k < nva; ++k)
      for (std::int64_t c = 0; c < t; ++c)
        yv[k * t + c] = T(-(y[fd.valid[k] * t + c] - my[c])); // -y: resid = pred - y
    const std::vector<T>& u = u_of<T>(fb);
    const T* tv;
    if constexpr (std::is_same_v<T, float>)
      tv = fd.test_v32.data();
    else
      tv = fb.test_v.data();
    std::vector<T> c(static_cast<size_t>(r * t)), coef(static_cast<size_t>(r * t)),
        pred(static_cast<size_t>(nva * t));
    linalg::gemm(true, false, r, t, ntr, T(1), u.data(), yf.data(), T(0), c.data());
    std::vector<double> sse(static_cast<size_t>(t));
    for (std::int64_t a = 0; a < na; ++a) {
#pragma omp parallel for schedule(static)
      for (std::int64_t k = 0; k < r; ++k) {
        const double g = fb.s[k] / (fb.s[k] * fb.s[k] + alphas[a]);
        for (std::int64_t j = 0; j < t; ++j)
          coef[k * t + j] = T(g * double(c[k * t + j]));
      }
      linalg::gemm(false, false, nva, t, r, T(1), tv, coef.data(), T(0), pred.data());
      std::fill(sse.begin(), sse.end(), 0.0);
      add_weighted_squares(pred.data(), yv.data(), static_cast<const double*>(nullptr), nva, t,
                           sse.data());
      for (std::int64_t j = 0; j < t; ++j)
        err[a * t + j] += sse[j] / double(n);
    }
  }
  return err;
}

} // namespace

void fold_rows(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
               const std::vector<std::int32_t>& fold, int f, FoldBasis& fb,
               std::vector<double>& xtr, std::vector<double>& xva) {
  fb.train.clear();
  fb.valid.clear();
  for (std::int64_t i = 0; i < n; ++i)
    (fold[i] == f ? fb.valid : fb.train).push_back(i);
  const std::int64_t ntr = std::int64_t(fb.train.size());
  std::vector<double> mx(static_cast<size_t>(p), 0.0);
  for (auto i : fb.train)
    for (std::int64_t j = 0; j < p; ++j)
      mx[j] += x_train[i * p + j] / double(ntr);
  auto take = [&](const std::vector<std::int64_t>& rows, std::vector<double>& o) {
    o.resize(static_cast<size_t>(std::int64_t(rows.size()) * p));
    for (size_t r = 0; r < rows.size(); ++r)
      for (std::int64_t j = 0; j < p; ++j)
        o[r * p + j] = x_train[rows[r] * p + j] - mx[j];
  };
  take(fb.train, xtr);
  take(fb.valid, xva);
}

void finish_fold(FoldBasis& fb) {
  fb.test_v32.assign(fb.basis.test_v.begin(), fb.basis.test_v.end());
}

RidgeScores fit_kfold(const RidgeBasis& b, const std::vector<FoldBasis>& fds,
                      const std::vector<double>& y_train, const std::vector<double>& y_test,
                      std::int64_t t, const std::vector<double>& alphas, Precision precision) {
  ProfileEvent ev("gm.ridge.kfold");
  const std::int64_t n = b.n, na = std::int64_t(alphas.size());
  double flops = 0;
  for (const auto& fd : fds)
    flops += 2.0 * double(fd.basis.r) * double(t) * double(fd.basis.n + na * fd.basis.m);
  ProfileEvent::add_flops(flops);
  std::vector<double> err;
  if (precision == Precision::float32) {
    err = kfold_errors<float>(fds, n, y_train, t, alphas);
    recheck(err, y_train, n, t, na, [&](const std::vector<double>& ys, std::int64_t tc) {
      return kfold_errors<double>(fds, n, ys, tc, alphas);
    });
  } else {
    err = kfold_errors<double>(fds, n, y_train, t, alphas);
  }
  return refit(b, y_train, y_test, t, alphas, argmin_first(err, na, t));
}

} // namespace gradmap::encoding
