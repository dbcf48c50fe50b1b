#include "gradmap/linalg/pca.hpp"

#include <algorithm>
#include <cmath>

#include "gradmap/core/error.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/linalg/dense.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::linalg {
namespace {

// Sum over ranks, computed on rank 0 and broadcast: identical bits on every rank. In pieces of
// 2^27 values (MPI counts are int).
void sum_to_all(MPI_Comm comm, std::vector<double>& v) {
  const int me = mpi::rank(comm);
  constexpr size_t piece = size_t(1) << 27;
  std::vector<double> out(me == 0 ? std::min(v.size(), piece) : 0);
  for (size_t o = 0; o < v.size(); o += piece) {
    const int n = int(std::min(piece, v.size() - o));
    GM_CHECK_MPI(
        MPI_Reduce(v.data() + o, me == 0 ? out.data() : nullptr, n, MPI_DOUBLE, MPI_SUM, 0, comm));
    if (me == 0)
      std::copy(out.begin(), out.begin() + n, v.begin() + std::ptrdiff_t(o));
    GM_CHECK_MPI(MPI_Bcast(v.data() + o, n, MPI_DOUBLE, 0, comm));
  }
}

// Orthonormalises the columns of the tall matrix Y (n_local x l rows distributed over comm) by
// CholeskyQR2 (Yamamoto et al. 2015): two passes of G = Y^T Y, R = chol(G), Y := Y R^{-1}.
// A tiny diagonal shift rescues a numerically rank-deficient first pass.
void orthonormalise(MPI_Comm comm, std::int64_t n, std::int64_t l, std::vector<double>& y) {
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<double> g(size_t(l * l), 0.0);
    gemm(true, false, l, l, n, 1.0, y.data(), y.data(), 0.0, g.data());
    sum_to_all(comm, g);
    std::vector<double> r = g;
    if (!cholesky_upper(l, r.data())) {
      double trace = 0;
      for (std::int64_t i = 0; i < l; ++i)
        trace += g[i * l + i];
      r = g;
      for (std::int64_t i = 0; i < l; ++i)
        r[i * l + i] += 1e-10 * trace / double(l) + 1e-300;
      if (!cholesky_upper(l, r.data()))
        throw Error("PCA: the sketch is numerically singular (too many components for the data?)");
    }
    solve_right_upper(n, l, r.data(), y.data());
  }
}

} // namespace

std::vector<float> Pca::transform(const float* x, std::int64_t n) const {
  std::vector<double> xc(size_t(n * d));
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < d; ++j)
      xc[i * d + j] = double(x[i * d + j]) - mean[j];
  std::vector<double> s(size_t(n * k), 0.0);
  gemm(false, true, n, k, d, 1.0, xc.data(), components.data(), 0.0, s.data());
  return std::vector<float>(s.begin(), s.end());
}

Pca fit_pca(MPI_Comm comm, const float* x, std::int64_t n_local, std::int64_t d,
            const std::vector<std::uint8_t>& fit, const PcaOptions& opt) {
  ProfileEvent ev("gm.pca.fit");
  Pca p;
  p.d = d;
  p.k = opt.k;
  // 1. Mean of the fitted rows.
  std::vector<double> acc(size_t(d + 1), 0.0);
  std::int64_t rows = 0;
  for (std::int64_t i = 0; i < n_local; ++i)
    if (fit[i]) {
      ++rows;
      for (std::int64_t j = 0; j < d; ++j)
        acc[j] += x[i * d + j];
    }
  acc[d] = double(rows);
  sum_to_all(comm, acc);
  p.n_fit = std::int64_t(acc[d]);
  if (opt.k < 1 || opt.k > std::min(p.n_fit, d))
    throw Error("PCA: " + std::to_string(opt.k) + " components requested, but the data have " +
                std::to_string(p.n_fit) + " fitted rows of dimension " + std::to_string(d));
  p.mean.assign(acc.begin(), acc.begin() + d);
  for (auto& m : p.mean)
    m /= double(p.n_fit);
  // Centred fitted rows, A (n_fit_local x d).
  std::vector<double> a(size_t(rows * d));
  for (std::int64_t i = 0, r = 0; i < n_local; ++i)
    if (fit[i]) {
      for (std::int64_t j = 0; j < d; ++j)
        a[r * d + j] = double(x[i * d + j]) - p.mean[j];
      ++r;
    }
  // 2. Sketch Y = A Omega, Omega (d x l) Gaussian, identical on every rank.
  const std::int64_t l = std::min(opt.k + opt.oversample, std::min(p.n_fit, d));
  std::vector<double> omega(size_t(d * l));
  for (std::int64_t j = 0; j < d; ++j) {
    sim::Philox rng(opt.seed, sim::Stream::projection, opt.stream, std::uint32_t(j));
    for (std::int64_t c = 0; c < l; ++c)
      omega[j * l + c] = rng.normal();
  }
  std::vector<double> y(size_t(rows * l), 0.0);
  gemm(false, false, rows, l, d, 1.0, a.data(), omega.data(), 0.0, y.data());
  orthonormalise(comm, rows, l, y);
  // 3. Subspace iterations: Z = orth(A^T Q), Q = orth(A Z) (Alg. 4.4).
  for (int it = 0; it < opt.power_iterations; ++it) {
    std::vector<double> z(size_t(d * l), 0.0);
    gemm(true, false, d, l, rows, 1.0, a.data(), y.data(), 0.0, z.data());
    sum_to_all(comm, z);
    orthonormalise(MPI_COMM_SELF, d, l, z); // replicated: identical on every rank
    gemm(false, false, rows, l, d, 1.0, a.data(), z.data(), 0.0, y.data());
    orthonormalise(comm, rows, l, y);
  }
  // 4. B = Q^T A (l x d); its SVD gives the right singular vectors (Alg. 5.1).
  std::vector<double> b(size_t(l * d), 0.0);
  gemm(true, false, l, d, rows, 1.0, y.data(), a.data(), 0.0, b.data());
  sum_to_all(comm, b);
  std::vector<double> s, vt;
  svd(l, d, b, s, vt);
  p.singular_values.assign(s.begin(), s.begin() + opt.k);
  p.components.assign(vt.begin(), vt.begin() + opt.k * d);
  // 5. Signs: the largest-magnitude entry of each component is positive.
  for (std::int64_t c = 0; c < opt.k; ++c) {
    double* v = &p.components[c * d];
    const auto big =
        std::max_element(v, v + d, [](double u, double w) { return std::abs(u) < std::abs(w); });
    if (*big < 0)
      for (std::int64_t j = 0; j < d; ++j)
        v[j] = -v[j];
  }
  return p;
}

} // namespace gradmap::linalg
