#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gradmap/linalg/kernel_eig.hpp"
#include "gradmap/mpi/comm.hpp"

using namespace gradmap;

namespace {
// Checks K z_k = w_k z_k (K = X X^T), orthonormal z, decreasing w, for x [n, p].
void expect_eigendecomposition(const std::vector<double>& x, int n, int p, MPI_Comm comm) {
  std::vector<double> w, z;
  linalg::kernel_eig(x, n, p, comm, w, z);
  ASSERT_EQ(w.size(), size_t(n));
  ASSERT_EQ(z.size(), size_t(n) * size_t(n));
  std::vector<double> k(size_t(n) * size_t(n), 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      for (int c = 0; c < p; ++c)
        k[size_t(i) * size_t(n) + size_t(j)] +=
            x[size_t(i) * size_t(p) + size_t(c)] * x[size_t(j) * size_t(p) + size_t(c)];
  double scale = w[0], worst = 0, orth = 0;
  for (int a = 0; a < n; ++a) {
    if (a > 0) {
      EXPECT_GE(w[size_t(a - 1)], w[size_t(a)] - 1e-9 * scale);
    }
    for (int i = 0; i < n; ++i) {
      double kz = 0;
      for (int j = 0; j < n; ++j)
        kz += k[size_t(i) * size_t(n) + size_t(j)] * z[size_t(j) * size_t(n) + size_t(a)];
      worst = std::max(worst, std::abs(kz - w[size_t(a)] * z[size_t(i) * size_t(n) + size_t(a)]));
    }
    for (int b = 0; b < n; ++b) {
      double d = 0;
      for (int i = 0; i < n; ++i)
        d += z[size_t(i) * size_t(n) + size_t(a)] * z[size_t(i) * size_t(n) + size_t(b)];
      orth = std::max(orth, std::abs(d - (a == b ? 1.0 : 0.0)));
    }
  }
  EXPECT_LT(worst, 1e-10 * scale);
  EXPECT_LT(orth, 1e-10);
}
} // namespace

TEST(KernelEig, EigendecompositionOnThisCommAndEveryGridShape) {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> g;
  for (auto [n, p] : {std::pair<int, int>{80, 150}, {37, 20}, {130, 131}}) {
    std::vector<double> x(size_t(n) * size_t(p));
    for (auto& v : x)
      v = g(rng);
    // The whole communicator (a 1 x P grid, or near-square), and every rank alone (LAPACK).
    expect_eigendecomposition(x, n, p, MPI_COMM_WORLD);
    expect_eigendecomposition(x, n, p, MPI_COMM_SELF);
  }
}
