#include "gradmap/encoding/ridge.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "gradmap/core/error.hpp"
#include "gradmap/core/mpi_check.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/linalg/dense.hpp"
#include "gradmap/linalg/kernel_eig.hpp"
#include "gradmap/mpi/comm.hpp"

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

namespace {

// Rows [begin, end) of rank `me` of `size` in a balanced split of n rows.
std::pair<std::int64_t, std::int64_t> row_block(std::int64_t n, int me, int size) {
  return {n * me / size, n * (me + 1) / size};
}

// Sums `v` over comm onto rank 0 (in place there; the other ranks' v is left as it was).
void reduce_to_root(std::vector<double>& v, MPI_Comm comm, int me) {
  constexpr size_t piece = size_t(1) << 27;
  for (size_t o = 0; o < v.size(); o += piece) {
    const int c = int(std::min(piece, v.size() - o));
    GM_CHECK_MPI(MPI_Reduce(me == 0 ? MPI_IN_PLACE : v.data() + o, v.data() + o, c, MPI_DOUBLE,
                            MPI_SUM, 0, comm));
  }
}

void broadcast(std::vector<double>& v, MPI_Comm comm) {
  constexpr size_t piece = size_t(1) << 27;
  for (size_t o = 0; o < v.size(); o += piece)
    GM_CHECK_MPI(MPI_Bcast(v.data() + o, int(std::min(piece, v.size() - o)), MPI_DOUBLE, 0, comm));
}

// Gathers every rank's row block (rows [n me / size, n (me + 1) / size) of width w, this rank's
// in `mine`) into all [n, w] on every rank: counts in doubles while they fit an int, else in
// rows (one MPI type of w doubles).
void gather_rows(const std::vector<double>& mine, std::int64_t n, std::int64_t w,
                 std::vector<double>& all, MPI_Comm comm, int size) {
  all.resize(static_cast<size_t>(n * w));
  if (w == 0 || n == 0)
    return;
  const bool by_double = n * w <= std::int64_t(std::numeric_limits<int>::max());
  const std::int64_t unit = by_double ? w : 1;
  MPI_Datatype type = MPI_DOUBLE;
  if (!by_double) {
    GM_CHECK_MPI(MPI_Type_contiguous(int(w), MPI_DOUBLE, &type));
    GM_CHECK_MPI(MPI_Type_commit(&type));
  }
  std::vector<int> counts(static_cast<size_t>(size)), offs(counts);
  for (int q = 0; q < size; ++q) {
    const auto [b, e] = row_block(n, q, size);
    counts[size_t(q)] = int((e - b) * unit);
    offs[size_t(q)] = int(b * unit);
  }
  const int rc = MPI_Allgatherv(mine.data(), counts[size_t(mpi::rank(comm))], type, all.data(),
                                counts.data(), offs.data(), type, comm);
  if (!by_double)
    MPI_Type_free(&type);
  GM_CHECK_MPI(rc);
}

// make_basis on rank 0, broadcast.
RidgeBasis basis_of_root(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                         const std::vector<double>& x_test, std::int64_t m, MPI_Comm comm, int me) {
  RidgeBasis b;
  if (me == 0)
    b = make_basis(x_train, n, p, x_test, m);
  std::int64_t dims[4] = {b.n, b.p, b.r, b.m};
  GM_CHECK_MPI(MPI_Bcast(dims, 4, MPI_INT64_T, 0, comm));
  b.n = dims[0], b.p = dims[1], b.r = dims[2], b.m = dims[3];
  b.u.resize(size_t(b.n * b.r));
  b.s.resize(size_t(b.r));
  b.test_v.resize(size_t(b.m * b.r));
  broadcast(b.u, comm);
  broadcast(b.s, comm);
  broadcast(b.test_v, comm);
  b.u32.assign(b.u.begin(), b.u.end());
  return b;
}

} // namespace

RidgeBasis make_basis_gram(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                           const std::vector<double>& x_test, std::int64_t m, MPI_Comm comm) {
  const int me = mpi::rank(comm), size = mpi::size(comm);
  if (p > n)
    return basis_of_root(x_train, n, p, x_test, m, comm, me);
  ProfileEvent ev("gm.ridge.svd");
  const auto [b0, b1] = row_block(n, me, size);
  const auto [t0, t1] = row_block(m, me, size);
  const std::int64_t nb = b1 - b0, mb = t1 - t0;
  ProfileEvent::add_flops(
      (6.0 * double(nb) * double(p) * double(p) + 2.0 * double(mb) * double(p) * double(p)) +
      (me == 0 ? 30.0 * double(p) * double(p) * double(p) : 0.0));
  // Pass 1: G = X^T X summed over the ranks' row blocks; its eigenvectors V_k with
  // lambda_k > 1e-14 lambda_0 (rank 0 decomposes and broadcasts, so every rank holds the same).
  std::vector<double> g(static_cast<size_t>(p * p), 0.0);
  linalg::gram(nb, p, x_train.data() + b0 * p, 0.0, g.data());
  if (size > 1)
    reduce_to_root(g, comm, me);
  std::vector<double> w, z;
  std::int64_t k = 0;
  if (me == 0) {
    ProfileEvent root("gm.ridge.svd.root"); // the O(p^3) steps on rank 0
    linalg::sym_eig(p, g, w, z);
    while (k < p && w[size_t(k)] > 1e-14 * w[0])
      ++k;
  }
  g = {};
  GM_CHECK_MPI(MPI_Bcast(&k, 1, MPI_INT64_T, 0, comm));
  std::vector<double> vk(static_cast<size_t>(p * k)), lam(static_cast<size_t>(k));
  if (me == 0)
    for (std::int64_t j = 0; j < p; ++j)
      for (std::int64_t c = 0; c < k; ++c)
        vk[size_t(j * k + c)] = z[size_t(j * p + c)];
  if (me == 0)
    std::copy(w.begin(), w.begin() + k, lam.begin());
  z = {};
  if (size > 1) {
    broadcast(vk, comm);
    broadcast(lam, comm);
  }
  // Pass 2, CholeskyQR: Q1 = X V_k diag(lambda)^-1/2 has columns orthonormal up to the
  // eigenvalues' rounding (~1e-16 lambda_0 / lambda_k), so Q1^T Q1 = R^T R is well conditioned
  // and Q = Q1 R^-1 is orthonormal to rounding. With B = R diag(lambda)^1/2, X V_k = Q B and
  // B B^T = W diag(s^2) W^T (k x k): U = Q W (orthonormal because Q and W are, however small
  // s_k), V = V_k B^T W diag(1/s).
  std::vector<double> y(static_cast<size_t>(nb * k));
  linalg::gemm(false, false, nb, k, p, 1.0, x_train.data() + b0 * p, vk.data(), 0.0, y.data());
  std::vector<double> g2(static_cast<size_t>(k * k), 0.0);
  linalg::gram(nb, k, y.data(), 0.0, g2.data());
  if (size > 1)
    reduce_to_root(g2, comm, me);
  std::int64_t r = 0, ok = 1;
  std::vector<double> s, t, v; // t [k, r]: U = Y t; v [p, r]
  if (me == 0 && k > 0) {
    ProfileEvent root("gm.ridge.svd.root");
    for (std::int64_t i = 0; i < k; ++i)
      for (std::int64_t c = 0; c < k; ++c)
        g2[size_t(i * k + c)] /= std::sqrt(lam[size_t(i)] * lam[size_t(c)]);
    ok = linalg::cholesky_upper(k, g2.data()) ? 1 : 0; // g2 := R
    if (ok) {
      std::vector<double> rl(g2), bbt(static_cast<size_t>(k * k)), e2, wl;
      for (std::int64_t i = 0; i < k; ++i)
        for (std::int64_t c = i; c < k; ++c)
          rl[size_t(i * k + c)] *= lam[size_t(c)];
      linalg::gemm(false, true, k, k, k, 1.0, rl.data(), g2.data(), 0.0, bbt.data());
      linalg::sym_eig(k, bbt, e2, wl);
      while (r < k && e2[size_t(r)] > 1e-20 * e2[0])
        ++r;
      s.resize(size_t(r));
      for (std::int64_t c = 0; c < r; ++c)
        s[size_t(c)] = std::sqrt(e2[size_t(c)]);
      std::vector<double> wr(static_cast<size_t>(k * r)), rinv(static_cast<size_t>(k * k), 0.0);
      for (std::int64_t i = 0; i < k; ++i)
        for (std::int64_t c = 0; c < r; ++c)
          wr[size_t(i * r + c)] = wl[size_t(i * k + c)];
      // t = diag(lambda)^-1/2 R^-1 W_r (R^-1 as I R^-1).
      for (std::int64_t i = 0; i < k; ++i)
        rinv[size_t(i * k + i)] = 1.0;
      linalg::solve_right_upper(k, k, g2.data(), rinv.data());
      t.assign(static_cast<size_t>(k * r), 0.0);
      linalg::gemm(false, false, k, r, k, 1.0, rinv.data(), wr.data(), 0.0, t.data());
      // bw = B^T W_r diag(1/s) = diag(lambda)^1/2 R^T W_r diag(1/s); V = V_k bw.
      std::vector<double> bw(static_cast<size_t>(k * r), 0.0);
      linalg::gemm(true, false, k, r, k, 1.0, g2.data(), wr.data(), 0.0, bw.data());
      for (std::int64_t i = 0; i < k; ++i)
        for (std::int64_t c = 0; c < r; ++c) {
          t[size_t(i * r + c)] /= std::sqrt(lam[size_t(i)]);
          bw[size_t(i * r + c)] *= std::sqrt(lam[size_t(i)]) / s[size_t(c)];
        }
      v.assign(static_cast<size_t>(p * r), 0.0);
      linalg::gemm(false, false, p, r, k, 1.0, vk.data(), bw.data(), 0.0, v.data());
    }
  }
  GM_CHECK_MPI(MPI_Bcast(&ok, 1, MPI_INT64_T, 0, comm));
  if (!ok) // not reached for a k chosen as above
    return basis_of_root(x_train, n, p, x_test, m, comm, me);
  GM_CHECK_MPI(MPI_Bcast(&r, 1, MPI_INT64_T, 0, comm));
  s.resize(size_t(r));
  t.resize(size_t(k * r));
  v.resize(size_t(p * r));
  if (size > 1) {
    broadcast(s, comm);
    broadcast(t, comm);
    broadcast(v, comm);
  }
  // Each rank's rows of U = Y t and of X_test V, gathered everywhere.
  std::vector<double> ub(static_cast<size_t>(nb * r), 0.0), tv(static_cast<size_t>(mb * r), 0.0);
  linalg::gemm(false, false, nb, r, k, 1.0, y.data(), t.data(), 0.0, ub.data());
  y = {};
  linalg::gemm(false, false, mb, r, p, 1.0, x_test.data() + t0 * p, v.data(), 0.0, tv.data());
  RidgeBasis b;
  b.n = n;
  b.p = p;
  b.m = m;
  b.r = r;
  b.s = std::move(s);
  if (size > 1) {
    gather_rows(ub, n, r, b.u, comm, size);
    gather_rows(tv, m, r, b.test_v, comm, size);
  } else {
    b.u = std::move(ub);
    b.test_v = std::move(tv);
  }
  b.u32.assign(b.u.begin(), b.u.end());
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
// on the test images: coefficients B[k, c] = scale(k, alpha_c) proj[k, c] in a basis of r
// directions whose test rows are test_v [m, r]; predictions test_v B. Constant targets (zero
// training variance) get NaN.
template <class Scale>
RidgeScores refit_with(std::int64_t r, std::int64_t m, const std::vector<double>& test_v,
                       const std::vector<double>& proj, Scale&& scale,
                       const std::vector<double>& y_train, std::int64_t n,
                       const std::vector<double>& y_test, std::int64_t t,
                       const std::vector<double>& alphas, const std::vector<std::int64_t>& which) {
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
      coef[k * t + c] = scale(k, a) * proj[k * t + c];
  }
  out.prediction.assign(static_cast<size_t>(m * t), 0.0);
  linalg::gemm(false, false, m, t, r, 1.0, test_v.data(), coef.data(), 0.0, out.prediction.data());
  score_columns(out.prediction, y_test, m, t, out.r, out.r2);
  for (std::int64_t c = 0; c < t; ++c)
    if (std::isnan(out.alpha[c]))
      out.r[c] = out.r2[c] = nan;
  return out;
}

// The SVD-basis refit: B[:, c] = g(alpha_c) U^T y_c, g_k = s_k / (s_k^2 + a).
// proj = U^T y_train when the caller has it already (else it is computed here).
RidgeScores refit(const RidgeBasis& b, const std::vector<double>& y_train,
                  const std::vector<double>& y_test, std::int64_t t,
                  const std::vector<double>& alphas, const std::vector<std::int64_t>& which,
                  const std::vector<double>* proj = nullptr) {
  ProfileEvent ev("gm.ridge.refit");
  ProfileEvent::add_flops(2.0 * double(b.r) * double(t) * double((proj ? 0 : b.n) + b.m));
  return refit_with(
      b.r, b.m, b.test_v, proj ? *proj : project_targets(b, y_train, t),
      [&](std::int64_t k, double a) { return b.s[k] / (b.s[k] * b.s[k] + a); }, y_train, b.n,
      y_test, t, alphas, which);
}

// The criterion of each target's chosen alpha (err [alphas, t]; NaN where none was chosen).
std::vector<double> chosen_error(const std::vector<double>& err,
                                 const std::vector<std::int64_t>& which, std::int64_t t) {
  std::vector<double> out(static_cast<size_t>(t), std::numeric_limits<double>::quiet_NaN());
  for (std::int64_t c = 0; c < t; ++c)
    if (which[c] >= 0)
      out[c] = err[which[c] * t + c];
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

// The LOO weights w_ai = 1 / (1 - h_i(alpha_a)) [alphas, n], from
//   1 - h_i = sum_k U_ik^2 (1 - f_k) + (1 - sum_k U_ik^2 - 1/n)   (see loo_errors),
// and lev_i = sum_k U_ik^2 [n]: one GEMM of U o U (in row blocks) with [1 - f(alpha_a); 1].
struct LooWeights {
  std::vector<double> w, lev;
};

LooWeights loo_weights(const RidgeBasis& b, const std::vector<double>& alphas) {
  const std::int64_t n = b.n, r = b.r, na = std::int64_t(alphas.size()), cols = na + 1;
  std::vector<double> g(static_cast<size_t>(cols * r), 1.0); // [1 - f_k(alpha_a); 1]
  for (std::int64_t a = 0; a < na; ++a)
    for (std::int64_t k = 0; k < r; ++k)
      g[a * r + k] = alphas[a] / (b.s[k] * b.s[k] + alphas[a]);
  LooWeights lw;
  lw.w.resize(static_cast<size_t>(na * n));
  lw.lev.resize(static_cast<size_t>(n));
  constexpr std::int64_t RB = 512;
  std::vector<double> u2(static_cast<size_t>(std::min(n, RB) * r)),
      out(static_cast<size_t>(std::min(n, RB) * cols));
  for (std::int64_t i0 = 0; i0 < n; i0 += RB) {
    const std::int64_t rows = std::min(RB, n - i0);
    for (std::int64_t i = 0; i < rows * r; ++i)
      u2[i] = b.u[i0 * r + i] * b.u[i0 * r + i];
    linalg::gemm(false, true, rows, cols, r, 1.0, u2.data(), g.data(), 0.0, out.data());
    for (std::int64_t i = 0; i < rows; ++i) {
      const double lev = out[i * cols + na];
      const double outside = std::max(0.0, 1.0 - lev - 1.0 / double(n));
      lw.lev[i0 + i] = lev;
      for (std::int64_t a = 0; a < na; ++a)
        lw.w[a * n + i0 + i] = 1.0 / (out[i * cols + a] + outside);
    }
  }
  return lw;
}

// The float64 or the float32 copy of an array, by the precision T of a pass.
template <class T>
const std::vector<T>& pick(const std::vector<double>& d, const std::vector<float>& f) {
  if constexpr (std::is_same_v<T, double>)
    return d;
  else
    return f;
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
                               const std::vector<double>& alphas, const LooWeights& lw) {
  const std::int64_t n = b.n, r = b.r;
  const std::vector<T>& u = pick<T>(b.u, b.u32);
  std::vector<T> yperp(y.begin(), y.end()), c(static_cast<size_t>(r * t));
  linalg::gemm(true, false, r, t, n, T(1), u.data(), yperp.data(), T(0), c.data()); // U^T y
  linalg::gemm(false, false, n, t, r, T(-1), u.data(), c.data(), T(1), yperp.data());
  std::vector<double> err(alphas.size() * static_cast<size_t>(t), 0.0);
  std::vector<T> d(static_cast<size_t>(r * t)), resid(static_cast<size_t>(n * t));
  std::vector<double> g(static_cast<size_t>(r));
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
    double* sse = &err[a * size_t(t)];
    add_weighted_squares(resid.data(), yperp.data(), &lw.w[a * size_t(n)], n, t, sse);
    for (std::int64_t j = 0; j < t; ++j)
      sse[j] /= double(n);
  }
  return err;
}

// The float32 LOO criterion of a primal basis (r < n) in the fitted form, with a bound on its
// rounding error. The residual is e = y - U d, d = f o c, c = U^T y in float64 (proj, which the
// refit reuses) and y exact: only the fitted part U d goes through the float32 GEMM. With
// weights w_i = 1 / (1 - h_i), the criterion is S / n, S = sum_i (w_i e_i)^2, and the computed
// S' = S + 2 <W e, W delta> + ||W delta||^2 for the error delta of the fitted part, which has
// three sources (u = 2^-24, lev_i = ||U_i||^2):
//  - d rounded to float32 (shared by all rows): delta = U (d o eps), |<W e, W delta>| <=
//    u ||W e|| w_max ||d|| (U has orthonormal columns);
//  - U rounded to float32: |delta_i| <= u ||U_i|| ||d||, so |<W e, W delta>| <=
//    u ||W e|| ||d|| sqrt(sum_i w_i^2 lev_i);
//  - the GEMM's accumulation over the r terms: |delta_i| <= lambda sqrt(r) u ||U_i|| ||d||
//    except with probability about 2 r exp(-lambda^2 / 2) (Higham & Mary 2019, SIAM J. Sci.
//    Comput. 41(5), probabilistic rounding error analysis: independent, mean-zero rounding
//    errors), and, independent across rows, |<W e, W delta>| <= lambda^2 sqrt(r) u ||d||
//    sqrt(Q), Q = sum_i w_i^4 e_i^2 lev_i (Hoeffding); lambda = 10 (failure probabilities
//    below 1e-18 per row and 4e-22 per sum).
// ||W delta||^2 is bounded deterministically, D^2 with D = gamma_{r+2} ||d|| sqrt(sum w^2 lev),
// and the computed e stands for the exact one up to D. bound [alphas, t] is the bound on
// |S' - S| / n, in the units of the returned criterion [alphas, t]. The complement form
// (loo_errors) keeps a float32 U^T y and y - U U^T y, whose errors are relative to ||y||: for
// noise-level targets, whose criterion is nearly flat in alpha, its 1e-4 rule rechecked most.
// Few targets (t small): the GEMMs of several alphas go in one, so U is read once for them.
std::vector<double> loo_errors_fitted(const RidgeBasis& b, const std::vector<double>& y,
                                      const std::vector<double>& proj, std::int64_t t,
                                      const std::vector<double>& alphas, const LooWeights& lw,
                                      std::vector<double>& bound) {
  const std::int64_t n = b.n, r = b.r, na = std::int64_t(alphas.size());
  const double u = std::ldexp(1.0, -24), lambda = 10.0;
  const double gamma = double(r + 2) * u / (1.0 - double(r + 2) * u);
  const double acc_factor = lambda * lambda * std::sqrt(double(r)) * u;
  const std::vector<double>& lev = lw.lev;
  std::vector<double> err(static_cast<size_t>(na * t), 0.0);
  bound.assign(err.size(), 0.0);
  // alphas per GEMM: all of them while the batch stays within 1024 columns
  const std::int64_t ab =
      std::max<std::int64_t>(1, std::min(na, 1024 / std::max<std::int64_t>(t, 1)));
  const std::int64_t ld = ab * t;
  std::vector<float> d(static_cast<size_t>(r * ld)), fit(static_cast<size_t>(n * ld));
  std::vector<double> f(static_cast<size_t>(r * ab)), dn2(static_cast<size_t>(ld)),
      q(static_cast<size_t>(t));
  constexpr std::int64_t CB = 256;
  for (std::int64_t a0 = 0; a0 < na; a0 += ab) {
    const std::int64_t nb = std::min(ab, na - a0), cols = nb * t;
    for (std::int64_t j = 0; j < nb; ++j)
      for (std::int64_t k = 0; k < r; ++k)
        f[j * r + k] = b.s[k] * b.s[k] / (b.s[k] * b.s[k] + alphas[a0 + j]);
#pragma omp parallel for schedule(static)
    for (std::int64_t c0 = 0; c0 < cols; c0 += CB) { // column c of the batch: alpha c / t
      const std::int64_t c1 = std::min(cols, c0 + CB);
      for (std::int64_t c = c0; c < c1; ++c)
        dn2[c] = 0;
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t c = c0; c < c1; ++c) {
          const double v = f[(c / t) * r + k] * proj[k * t + c % t];
          d[k * cols + c] = float(v);
          dn2[c] += v * v;
        }
    }
    {
      ProfileEvent gev("gm.ridge.loo.gemm");
      linalg::gemm(false, false, n, cols, r, -1.0f, b.u32.data(), d.data(), 0.0f, fit.data());
    }
    ProfileEvent eev("gm.ridge.loo.errors");
    for (std::int64_t j = 0; j < nb; ++j) {
      const std::int64_t a = a0 + j;
      const double* w = &lw.w[a * n];
      double wl = 0, wmax = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        wl += w[i] * w[i] * lev[i];
        wmax = std::max(wmax, w[i]);
      }
      double* sse = &err[a * t];
      std::fill(q.begin(), q.end(), 0.0);
#pragma omp parallel for schedule(static)
      for (std::int64_t c0 = 0; c0 < t; c0 += CB) {
        const std::int64_t c1 = std::min(t, c0 + CB);
        for (std::int64_t i = 0; i < n; ++i) {
          const float* fi = &fit[i * cols + j * t]; // -(U d)
          const double* yi = &y[i * t];
          const double wi = w[i], wq = wi * wi * wi * wi * lev[i];
          for (std::int64_t c = c0; c < c1; ++c) {
            const double e = double(fi[c]) + yi[c];
            sse[c] += e * e * wi * wi;
            q[c] += e * e * wq;
          }
        }
      }
      double* bd = &bound[a * t];
      for (std::int64_t c = 0; c < t; ++c) {
        const double dn = std::sqrt(dn2[j * t + c]);
        const double dd = gamma * dn * std::sqrt(wl); // ||W delta|| <= dd
        const double we = std::sqrt(sse[c]) + dd;     // ||W e|| of the exact e
        const double cross =
            u * dn * (wmax + std::sqrt(wl)) * we + acc_factor * dn * (std::sqrt(q[c]) + wmax * dd);
        // + a relative 1e-12 for the float64 sums themselves
        bd[c] = (2.0 * cross + 3.0 * dd * dd + 1e-12 * sse[c]) / double(n);
        sse[c] /= double(n);
      }
    }
  }
  return err;
}

// Columns whose choice the float32 criterion cannot settle: some other alpha's criterion is
// within the two error bounds of the best one's.
std::vector<std::int64_t> uncertain_choices(const std::vector<double>& err,
                                            const std::vector<double>& bound, std::int64_t na,
                                            std::int64_t t) {
  std::vector<std::int64_t> cols;
  for (std::int64_t c = 0; c < t; ++c) {
    std::int64_t best = 0;
    for (std::int64_t a = 1; a < na; ++a)
      if (err[a * t + c] < err[best * t + c])
        best = a;
    if (err[best * t + c] == 0 && bound[best * t + c] == 0)
      continue; // y = 0 (an excluded target): every alpha gives 0, in float64 too
    bool open = !std::isfinite(err[best * t + c]);
    for (std::int64_t a = 0; a < na && !open; ++a)
      open =
          a != best && err[a * t + c] - bound[a * t + c] <= err[best * t + c] + bound[best * t + c];
    if (open)
      cols.push_back(c);
  }
  return cols;
}

// Columns whose best criterion is within a relative tol (times scale[c] when given) of another
// alpha's.
std::vector<std::int64_t> near_ties(const std::vector<double>& err, std::int64_t na, std::int64_t t,
                                    double tol, const std::vector<double>* scale = nullptr) {
  std::vector<std::int64_t> cols;
  for (std::int64_t c = 0; c < t; ++c) {
    double best = std::numeric_limits<double>::infinity();
    for (std::int64_t a = 0; a < na; ++a)
      best = std::min(best, err[a * t + c]);
    const double tc = tol * (scale ? (*scale)[c] : 1.0);
    int close = 0;
    for (std::int64_t a = 0; a < na; ++a)
      close += err[a * t + c] <= best * (1 + tc) + 1e-300 ? 1 : 0;
    if (close > 1)
      cols.push_back(c);
  }
  return cols;
}

// Gathers the columns `cols` of y (n x t) and hands them to exact(ys, tc), which recomputes them
// in float64 and writes its results back.
template <class F>
void recheck(const std::vector<std::int64_t>& cols, const std::vector<double>& y, std::int64_t n,
             std::int64_t t, F&& exact) {
  if (cols.empty())
    return;
  ProfileEvent ev("gm.ridge.recheck");
  const std::int64_t tc = std::int64_t(cols.size());
  std::vector<double> ys(static_cast<size_t>(n * tc));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < tc; ++j)
      ys[i * tc + j] = y[i * t + cols[j]];
  exact(ys, tc);
}

// Writes rows [na, tc] of src into the columns cols of dst [na, t].
void scatter_columns(const std::vector<double>& src, std::int64_t rows, std::int64_t tc,
                     const std::vector<std::int64_t>& cols, std::vector<double>& dst,
                     std::int64_t t) {
  for (std::int64_t a = 0; a < rows; ++a)
    for (std::int64_t j = 0; j < tc; ++j)
      dst[a * t + cols[j]] = src[a * tc + j];
}

} // namespace

std::vector<double> loo_criterion(const RidgeBasis& b, const std::vector<double>& y_train,
                                  std::int64_t t, const std::vector<double>& alphas,
                                  Precision precision, std::vector<double>* bound) {
  const LooWeights lw = loo_weights(b, alphas);
  if (precision == Precision::float64 || b.r >= b.n)
    return precision == Precision::float64 ? loo_errors<double>(b, y_train, t, alphas, lw)
                                           : loo_errors<float>(b, y_train, t, alphas, lw);
  std::vector<double> bd;
  auto err = loo_errors_fitted(b, y_train, project_targets(b, y_train, t), t, alphas, lw, bd);
  if (bound)
    *bound = std::move(bd);
  return err;
}

RidgeScores fit_loo(const RidgeBasis& b, const std::vector<double>& y_train,
                    const std::vector<double>& y_test, std::int64_t t,
                    const std::vector<double>& alphas, Precision precision) {
  ProfileEvent ev("gm.ridge.loo");
  const std::int64_t n = b.n, r = b.r, na = std::int64_t(alphas.size());
  ProfileEvent::add_flops(2.0 * double(n) * double(r) * double(t) * double(na + 2));
  const LooWeights lw = loo_weights(b, alphas);
  std::vector<double> err, proj;  // proj: U^T y in float64 when the fitted form computed it
  std::vector<std::int64_t> cols; // targets rechecked in float64
  if (precision == Precision::float32 && b.r < n) {
    // The fitted form, and float64 only where its error bound leaves the choice open.
    proj = project_targets(b, y_train, t);
    std::vector<double> bound;
    err = loo_errors_fitted(b, y_train, proj, t, alphas, lw, bound);
    cols = uncertain_choices(err, bound, na, t);
  } else if (precision == Precision::float32) { // dual bases (r = n): the complement form
    err = loo_errors<float>(b, y_train, t, alphas, lw);
    cols = near_ties(err, na, t, 1e-4);
  } else {
    err = loo_errors<double>(b, y_train, t, alphas, lw);
  }
  recheck(cols, y_train, n, t, [&](const std::vector<double>& ys, std::int64_t tc) {
    scatter_columns(loo_errors<double>(b, ys, tc, alphas, lw), na, tc, cols, err, t);
  });
  const auto which = argmin_first(err, na, t);
  RidgeScores sc = refit(b, y_train, y_test, t, alphas, which, proj.empty() ? nullptr : &proj);
  sc.cv_error = chosen_error(err, which, t);
  sc.rechecked = std::int64_t(cols.size());
  return sc;
}

namespace {

// Pearson r per column from the sums [sa, sb, saa, sbb, sab] of n rows (NaN when undefined).
double r_from_sums(const double* s5, std::int64_t n) {
  const double nn = double(n);
  const double cab = s5[4] - s5[0] * s5[1] / nn, caa = s5[2] - s5[0] * s5[0] / nn,
               cbb = s5[3] - s5[1] * s5[1] / nn;
  return caa > 0 && cbb > 0 ? cab / std::sqrt(caa * cbb) : std::numeric_limits<double>::quiet_NaN();
}

// sums[5 * c + .] += (a, b, a^2, b^2, a b) over the n rows of columns c of a, b (n x t); threads
// over blocks of columns, rows in order within a column.
template <class T>
void add_pair_sums(const T* a, const T* b, std::int64_t n, std::int64_t t, double* sums) {
  constexpr std::int64_t CB = 256;
#pragma omp parallel for schedule(static)
  for (std::int64_t c0 = 0; c0 < t; c0 += CB) {
    const std::int64_t c1 = std::min(t, c0 + CB);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = c0; c < c1; ++c) {
        const double x = double(a[i * t + c]), y = double(b[i * t + c]);
        double* s5 = sums + 5 * c;
        s5[0] += x;
        s5[1] += y;
        s5[2] += x * x;
        s5[3] += y * y;
        s5[4] += x * y;
      }
  }
}

// Summed squared validation error / n [alphas, t] over the folds, GEMMs in precision T; and the
// held-out Pearson r per fold and alpha, fold_r [folds, alphas, t].
template <class T>
std::vector<double> kfold_errors(const std::vector<FoldBasis>& folds, std::int64_t n,
                                 const std::vector<double>& y, std::int64_t t,
                                 const std::vector<double>& alphas, std::vector<double>& fold_r) {
  const std::int64_t na = std::int64_t(alphas.size());
  std::vector<double> err(static_cast<size_t>(na * t), 0.0);
  fold_r.assign(folds.size() * size_t(na * t), 0.0);
  for (size_t f = 0; f < folds.size(); ++f) {
    const FoldBasis& fd = folds[f];
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
    const std::vector<T>& u = pick<T>(fb.u, fb.u32);
    const T* tv = pick<T>(fb.test_v, fd.test_v32).data();
    std::vector<T> c(static_cast<size_t>(r * t)), coef(static_cast<size_t>(r * t)),
        pred(static_cast<size_t>(nva * t));
    linalg::gemm(true, false, r, t, ntr, T(1), u.data(), yf.data(), T(0), c.data());
    std::vector<double> sse(static_cast<size_t>(t)), sums(static_cast<size_t>(5 * t));
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
      std::fill(sums.begin(), sums.end(), 0.0);
      add_pair_sums(pred.data(), yv.data(), nva, t, sums.data());
      double* fr = &fold_r[(f * size_t(na) + size_t(a)) * size_t(t)];
      for (std::int64_t j = 0; j < t; ++j) {
        err[a * t + j] += sse[j] / double(n);
        fr[j] = -r_from_sums(&sums[5 * j], nva); // yv holds -y
      }
    }
  }
  return err;
}

// fold_r [folds, alphas, t] at each column's chosen alpha (which[c]; NaN where the refit left
// the column unfitted) -> [folds, t].
std::vector<double> pick_fold_r(const std::vector<double>& fold_r, std::int64_t folds,
                                std::int64_t na, std::int64_t t,
                                const std::vector<std::int64_t>& which, const RidgeScores& sc) {
  std::vector<double> out(static_cast<size_t>(folds * t), std::numeric_limits<double>::quiet_NaN());
  for (std::int64_t c = 0; c < t; ++c) {
    if (std::isnan(sc.alpha[c]))
      continue;
    for (std::int64_t f = 0; f < folds; ++f)
      out[f * t + c] = fold_r[(f * na + which[c]) * t + c];
  }
  return out;
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
  const std::int64_t n = b.n, na = std::int64_t(alphas.size()), nf = std::int64_t(fds.size());
  double flops = 0;
  for (const auto& fd : fds)
    flops += 2.0 * double(fd.basis.r) * double(t) * double(fd.basis.n + na * fd.basis.m);
  ProfileEvent::add_flops(flops);
  std::vector<double> err, fold_r;
  std::int64_t rechecked = 0;
  if (precision == Precision::float32) {
    err = kfold_errors<float>(fds, n, y_train, t, alphas, fold_r);
    const auto cols = near_ties(err, na, t, 1e-4);
    rechecked = std::int64_t(cols.size());
    recheck(cols, y_train, n, t, [&](const std::vector<double>& ys, std::int64_t tc) {
      std::vector<double> fr;
      scatter_columns(kfold_errors<double>(fds, n, ys, tc, alphas, fr), na, tc, cols, err, t);
      scatter_columns(fr, nf * na, tc, cols, fold_r, t);
    });
  } else {
    err = kfold_errors<double>(fds, n, y_train, t, alphas, fold_r);
  }
  const auto which = argmin_first(err, na, t);
  RidgeScores sc = refit(b, y_train, y_test, t, alphas, which);
  sc.fold_r = pick_fold_r(fold_r, nf, na, t, which, sc);
  sc.cv_error = chosen_error(err, which, t);
  sc.rechecked = rechecked;
  return sc;
}

void make_gram_full(GramBasis& b, const std::vector<double>& x_test, std::int64_t m) {
  ProfileEvent ev("gm.ridge.gram");
  const std::int64_t n = b.n, p = b.p;
  ProfileEvent::add_flops(double(n) * double(p) * double(p) +
                          4.0 * double(p) * double(p) * double(p));
  std::vector<double> g(static_cast<size_t>(p * p), 0.0), w, z;
  linalg::gram(n, p, b.x.data(), 0.0, g.data());
  linalg::sym_eig(p, g, w, z);
  std::int64_t r = 0;
  while (r < p && w[size_t(r)] > 1e-12 * w[0])
    ++r;
  b.r = r;
  b.m = m;
  b.s2.assign(w.begin(), w.begin() + r);
  b.v.resize(static_cast<size_t>(p * r));
  for (std::int64_t j = 0; j < p; ++j)
    for (std::int64_t k = 0; k < r; ++k)
      b.v[size_t(j * r + k)] = z[size_t(j * p + k)];
  b.test_v.assign(static_cast<size_t>(m * r), 0.0);
  linalg::gemm(false, false, m, r, p, 1.0, x_test.data(), b.v.data(), 0.0, b.test_v.data());
}

GramFold make_gram_fold(const GramBasis& b, std::int64_t begin, std::int64_t end) {
  ProfileEvent ev("gm.ridge.gram");
  const std::int64_t n = b.n, p = b.p, nv = end - begin, nt = n - nv;
  ProfileEvent::add_flops(double(n) * double(p) * double(p) +
                          8.0 * double(p) * double(p) * double(p));
  GramFold f;
  f.begin = begin;
  f.end = end;
  const double* x = b.x.data();
  std::vector<double> all(static_cast<size_t>(p), 0.0);
  f.sx.assign(static_cast<size_t>(p), 0.0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < p; ++j)
      (i >= begin && i < end ? f.sx : all)[size_t(j)] += x[i * p + j];
  f.mu.resize(static_cast<size_t>(p));
  for (std::int64_t j = 0; j < p; ++j)
    f.mu[size_t(j)] = all[size_t(j)] / double(nt);
  // Centred training Gram: X_tr^T X_tr - nt mu mu^T; held-out scatter about mu:
  // X_v^T X_v - mu sx^T - sx mu^T + nv mu mu^T.
  std::vector<double> g(static_cast<size_t>(p * p), 0.0), gv(g);
  linalg::gram(begin, p, x, 0.0, g.data());
  linalg::gram(n - end, p, x + end * p, 1.0, g.data());
  linalg::gram(nv, p, x + begin * p, 0.0, gv.data());
  for (std::int64_t i = 0; i < p; ++i)
    for (std::int64_t j = 0; j < p; ++j) {
      const double mi = f.mu[size_t(i)], mj = f.mu[size_t(j)];
      g[size_t(i * p + j)] -= double(nt) * mi * mj;
      gv[size_t(i * p + j)] += -mi * f.sx[size_t(j)] - f.sx[size_t(i)] * mj + double(nv) * mi * mj;
    }
  std::vector<double> w, z;
  linalg::sym_eig(p, g, w, z);
  std::int64_t r = 0;
  while (r < p && w[size_t(r)] > 1e-12 * w[0])
    ++r;
  f.r = r;
  f.s2.assign(w.begin(), w.begin() + r);
  f.v.resize(static_cast<size_t>(p * r));
  for (std::int64_t j = 0; j < p; ++j)
    for (std::int64_t k = 0; k < r; ++k)
      f.v[size_t(j * r + k)] = z[size_t(j * p + k)];
  // H = V^T Gv V, stored as triu(H) with a halved diagonal: c^T H c = 2 c^T tri c.
  std::vector<double> gvv(static_cast<size_t>(p * r)), h(static_cast<size_t>(r * r));
  linalg::gemm(false, false, p, r, p, 1.0, gv.data(), f.v.data(), 0.0, gvv.data());
  linalg::gemm(true, false, r, r, p, 1.0, f.v.data(), gvv.data(), 0.0, h.data());
  f.tri.assign(static_cast<size_t>(r * r), 0.0);
  for (std::int64_t k = 0; k < r; ++k) {
    f.tri[size_t(k * r + k)] = 0.5 * h[size_t(k * r + k)];
    for (std::int64_t l = k + 1; l < r; ++l)
      f.tri[size_t(k * r + l)] = 0.5 * (h[size_t(k * r + l)] + h[size_t(l * r + k)]);
  }
  // V^T delta, delta = mean of the held-out rows - mu (for the held-out r).
  f.vd.assign(static_cast<size_t>(r), 0.0);
  for (std::int64_t j = 0; j < p; ++j) {
    const double dj = f.sx[size_t(j)] / double(nv) - f.mu[size_t(j)];
    for (std::int64_t k = 0; k < r; ++k)
      f.vd[size_t(k)] += f.v[size_t(j * r + k)] * dj;
  }
  f.v32.assign(f.v.begin(), f.v.end());
  f.tri32.assign(f.tri.begin(), f.tri.end());
  return f;
}

namespace {

// The Gram-form K-fold criterion (see ridge.hpp): err [alphas, t] (summed held-out SSE / n),
// fold_r [folds, alphas, t], sst [t] (summed held-out sum of squares about the fold intercept,
// / n), and X^T Y [p, t] (float64, for the refit) when xty is given. The per-fold products
// B_f = X_f^T Y_f are float64 GEMMs; V^T [A | E] and the triangular products run in T.
// Longer than ~120 lines on purpose: a hot kernel whose fold loop reuses a dozen work buffers
// across folds and alphas; split into steps it would pass them all or reallocate them per fold.
template <class T>
std::vector<double> gram_errors(const GramBasis& b, const std::vector<double>& y, std::int64_t t,
                                const std::vector<double>& alphas, std::vector<double>& fold_r,
                                std::vector<double>& sst, std::vector<double>* xty) {
  const std::int64_t n = b.n, p = b.p, na = std::int64_t(alphas.size());
  const std::int64_t nfold = std::int64_t(b.folds.size());
  const size_t pt = size_t(p * t);
  std::vector<double> bf(size_t(nfold) * pt), s(pt, 0.0);
  std::vector<double> sy(static_cast<size_t>(nfold * t), 0.0), sy_all(static_cast<size_t>(t), 0.0);
  {
    ProfileEvent gev("gm.ridge.kfold.xty");
    ProfileEvent::add_flops(2.0 * double(n) * double(p) * double(t));
    for (std::int64_t f = 0; f < nfold; ++f) {
      const GramFold& fd = b.folds[size_t(f)];
      linalg::gemm(true, false, p, t, fd.end - fd.begin, 1.0, b.x.data() + fd.begin * p,
                   y.data() + fd.begin * t, 0.0, &bf[size_t(f) * pt]);
      for (std::int64_t i = fd.begin; i < fd.end; ++i)
        for (std::int64_t c = 0; c < t; ++c)
          sy[f * t + c] += y[i * t + c];
    }
    for (std::int64_t f = 0; f < nfold; ++f) {
      for (size_t e = 0; e < pt; ++e)
        s[e] += bf[size_t(f) * pt + e];
      for (std::int64_t c = 0; c < t; ++c)
        sy_all[c] += sy[f * t + c];
    }
  }
  std::vector<double> err(static_cast<size_t>(na * t), 0.0);
  fold_r.assign(size_t(nfold * na * t), 0.0);
  sst.assign(static_cast<size_t>(t), 0.0);
  std::vector<T> ae, cp, w;
  std::vector<double> mf(static_cast<size_t>(t)), dy(mf), yc2(mf), ytil2(mf), dall, cross, ucol;
  for (std::int64_t f = 0; f < nfold; ++f) {
    const GramFold& fd = b.folds[size_t(f)];
    const std::int64_t nv = fd.end - fd.begin, nt = n - nv, r = fd.r;
    const double* bff = &bf[size_t(f) * pt];
    // Fold means: mf of the training rows, ybar_v of the held-out ones; the held-out sums of
    // squares about ybar_v (yc2, for r) and about mf (ytil2 = yc2 + nv (ybar_v - mf)^2).
    for (std::int64_t c = 0; c < t; ++c) {
      mf[c] = (sy_all[c] - sy[f * t + c]) / double(nt);
      dy[c] = sy[f * t + c] / double(nv) - mf[c];
      yc2[c] = 0;
    }
    for (std::int64_t i = fd.begin; i < fd.end; ++i)
      for (std::int64_t c = 0; c < t; ++c) {
        const double e = y[i * t + c] - sy[f * t + c] / double(nv);
        yc2[c] += e * e;
      }
    for (std::int64_t c = 0; c < t; ++c) {
      ytil2[c] = yc2[c] + double(nv) * dy[c] * dy[c];
      sst[c] += ytil2[c] / double(n);
    }
    // [A | E] (p x 2t): A = X_tr^T Y_tr centred = S - B_f - nt mu mf^T,
    // E = X_v~^T Y_v~ = B_f - mu sy_f^T - sx mf^T + nv mu mf^T.
    ae.resize(size_t(2) * pt);
#pragma omp parallel for schedule(static)
    for (std::int64_t k = 0; k < p; ++k) {
      const double mu = fd.mu[size_t(k)], sx = fd.sx[size_t(k)];
      T* row = &ae[size_t(k * 2 * t)];
      for (std::int64_t c = 0; c < t; ++c) {
        const double bkc = bff[k * t + c];
        row[c] = T(s[size_t(k * t + c)] - bkc - double(nt) * mu * mf[c]);
        row[t + c] = T(bkc - mu * sy[f * t + c] - sx * mf[c] + double(nv) * mu * mf[c]);
      }
    }
    cp.resize(size_t(r * 2 * t));
    linalg::gemm(true, false, r, 2 * t, p, T(1), pick<T>(fd.v, fd.v32).data(), ae.data(), T(0),
                 cp.data());
    w.resize(size_t(r * t));
    // cross[a, c] = sum_k d_ak C_kc P_kc and u[a, c] = sum_k vd_k d_ak C_kc for every alpha in
    // one pass over C and P; rows in order within each column, threads over column blocks.
    constexpr std::int64_t CB = 256;
    dall.resize(size_t(na * r));
    for (std::int64_t a = 0; a < na; ++a)
      for (std::int64_t k = 0; k < r; ++k)
        dall[size_t(a * r + k)] = 1.0 / (fd.s2[size_t(k)] + alphas[size_t(a)]);
    cross.assign(size_t(na * t), 0.0);
    ucol.assign(size_t(na * t), 0.0);
#pragma omp parallel for schedule(static)
    for (std::int64_t c0 = 0; c0 < t; c0 += CB) {
      const std::int64_t c1 = std::min(t, c0 + CB);
      for (std::int64_t k = 0; k < r; ++k) {
        const T* ck = &cp[size_t(k * 2 * t)];
        const double vk = fd.vd[size_t(k)];
        for (std::int64_t a = 0; a < na; ++a) {
          const double dk = dall[size_t(a * r + k)];
          double* cr = &cross[size_t(a * t)];
          double* uc = &ucol[size_t(a * t)];
          for (std::int64_t c = c0; c < c1; ++c) {
            const double dc = dk * double(ck[c]);
            cr[c] += dc * double(ck[t + c]);
            uc[c] += vk * dc;
          }
        }
      }
    }
    for (std::int64_t a = 0; a < na; ++a) {
      const double* d = &dall[size_t(a * r)];
#pragma omp parallel for schedule(static)
      for (std::int64_t k = 0; k < r; ++k)
        for (std::int64_t c = 0; c < t; ++c)
          w[size_t(k * t + c)] = T(d[k] * double(cp[size_t(k * 2 * t + c)]));
      {
        ProfileEvent qev("gm.ridge.kfold.quad");
        ProfileEvent::add_flops(double(r) * double(r) * double(t));
        linalg::trmm_upper(r, t, pick<T>(fd.tri, fd.tri32).data(), w.data());
      }
      // Per column: quad = 2 sum_k d_k C_k (tri D C)_k.
      double* fr = &fold_r[size_t((f * na + a) * t)];
#pragma omp parallel for schedule(static)
      for (std::int64_t c0 = 0; c0 < t; c0 += CB) {
        const std::int64_t c1 = std::min(t, c0 + CB);
        double quad[CB] = {};
        for (std::int64_t k = 0; k < r; ++k) {
          const T* ck = &cp[size_t(k * 2 * t)];
          const T* wk = &w[size_t(k * t)];
          const double dk = d[k];
          for (std::int64_t c = c0; c < c1; ++c)
            quad[c - c0] += dk * double(ck[c]) * double(wk[c]);
        }
        for (std::int64_t c = c0; c < c1; ++c) {
          const double cr = cross[size_t(a * t + c)], q = 2 * quad[c - c0],
                       uu = ucol[size_t(a * t + c)];
          err[size_t(a * t + c)] += (ytil2[c] - 2 * cr + q) / double(n);
          // Held-out r: covariance and prediction variance about the held-out means.
          const double cov = cr - double(nv) * uu * dy[c], vp = q - double(nv) * uu * uu;
          fr[c] = vp > 0 && yc2[c] > 0 ? cov / std::sqrt(vp * yc2[c])
                                       : std::numeric_limits<double>::quiet_NaN();
        }
      }
    }
  }
  if (xty)
    *xty = std::move(s);
  return err;
}

} // namespace

RidgeScores fit_kfold_gram(const GramBasis& b, const std::vector<double>& y_train,
                           const std::vector<double>& y_test, std::int64_t t,
                           const std::vector<double>& alphas, Precision precision) {
  ProfileEvent ev("gm.ridge.kfold");
  const std::int64_t n = b.n, p = b.p, na = std::int64_t(alphas.size());
  const std::int64_t nf = std::int64_t(b.folds.size());
  double flops = 0; // the V^T [A | E] products (xty and quad count their own)
  for (const auto& fd : b.folds)
    flops += 4.0 * double(p) * double(fd.r) * double(t);
  ProfileEvent::add_flops(flops);
  std::vector<double> fold_r, sst, xty;
  std::vector<double> err;
  std::int64_t rechecked = 0;
  if (precision == Precision::float32) {
    err = gram_errors<float>(b, y_train, t, alphas, fold_r, sst, &xty);
    // The float32 error of SSE = SST - 2 cross + quad is relative to SST, so the recheck band
    // widens where the fit is good (SSE << SST).
    std::vector<double> scale(static_cast<size_t>(t), 1.0);
    for (std::int64_t c = 0; c < t; ++c) {
      double best = std::numeric_limits<double>::infinity();
      for (std::int64_t a = 0; a < na; ++a)
        best = std::min(best, err[size_t(a * t + c)]);
      scale[c] = best > 0 ? std::max(1.0, sst[c] / best) : 1.0;
    }
    const auto cols = near_ties(err, na, t, 1e-4, &scale);
    rechecked = std::int64_t(cols.size());
    recheck(cols, y_train, n, t, [&](const std::vector<double>& ys, std::int64_t tc) {
      std::vector<double> fr, ss;
      scatter_columns(gram_errors<double>(b, ys, tc, alphas, fr, ss, nullptr), na, tc, cols, err,
                      t);
      scatter_columns(fr, nf * na, tc, cols, fold_r, t);
    });
  } else {
    err = gram_errors<double>(b, y_train, t, alphas, fold_r, sst, &xty);
  }
  // Refit on all training rows: coefficients V diag(1 / (s2 + a)) V^T X^T y in float64.
  ProfileEvent rev("gm.ridge.refit");
  ProfileEvent::add_flops(2.0 * double(b.r) * double(t) * double(p + b.m));
  std::vector<double> proj(static_cast<size_t>(b.r * t), 0.0);
  linalg::gemm(true, false, b.r, t, p, 1.0, b.v.data(), xty.data(), 0.0, proj.data());
  const auto which = argmin_first(err, na, t);
  RidgeScores sc = refit_with(
      b.r, b.m, b.test_v, proj, [&](std::int64_t k, double a) { return 1.0 / (b.s2[k] + a); },
      y_train, n, y_test, t, alphas, which);
  sc.fold_r = pick_fold_r(fold_r, nf, na, t, which, sc);
  sc.cv_error = chosen_error(err, which, t);
  sc.rechecked = rechecked;
  return sc;
}

RidgeScores select_per_target(const std::vector<RidgeScores>& candidates, std::int64_t m,
                              std::int64_t t, std::vector<std::int32_t>& chosen) {
  GM_REQUIRE(!candidates.empty(), "select_per_target: no candidates");
  const double nan = std::numeric_limits<double>::quiet_NaN();
  RidgeScores out;
  out.alpha.assign(static_cast<size_t>(t), nan);
  out.r = out.r2 = out.cv_error = out.alpha;
  out.prediction.assign(static_cast<size_t>(m * t), 0.0);
  const size_t nf = candidates[0].fold_r.size() / static_cast<size_t>(std::max<std::int64_t>(t, 1));
  out.fold_r.assign(nf * static_cast<size_t>(t), nan);
  chosen.assign(static_cast<size_t>(t), -1);
  for (std::int64_t c = 0; c < t; ++c) {
    double best = std::numeric_limits<double>::infinity();
    for (size_t k = 0; k < candidates.size(); ++k)
      if (candidates[k].cv_error[c] < best) { // strict: the first candidate wins ties
        best = candidates[k].cv_error[c];
        chosen[c] = std::int32_t(k);
      }
    if (chosen[c] < 0)
      continue; // no finite criterion (a constant target): NaN scores, zero prediction
    copy_target(candidates[size_t(chosen[c])], t, c, out, t, c, m);
  }
  return out;
}

void copy_target(const RidgeScores& from, std::int64_t from_t, std::int64_t j, RidgeScores& to,
                 std::int64_t to_t, std::int64_t c, std::int64_t m) {
  to.alpha[c] = from.alpha[j];
  to.r[c] = from.r[j];
  to.r2[c] = from.r2[j];
  to.cv_error[c] = from.cv_error[j];
  for (std::int64_t i = 0; i < m; ++i)
    to.prediction[i * to_t + c] = from.prediction[i * from_t + j];
  const std::int64_t nf = std::int64_t(from.fold_r.size()) / std::max<std::int64_t>(from_t, 1);
  for (std::int64_t f = 0; f < nf; ++f)
    to.fold_r[f * to_t + c] = from.fold_r[f * from_t + j];
}

} // namespace gradmap::encoding
