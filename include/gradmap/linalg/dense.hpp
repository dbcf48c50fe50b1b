#pragma once
// Thin row-major wrappers over BLAS/LAPACK (OpenBLAS), double precision (and SGEMM).
#include <cstdint>
#include <vector>

namespace gradmap::linalg {

/// Not collective. C[m x n] = alpha op(A) op(B) + beta C; all row-major; op(A) is m x k.
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, double alpha,
          const double* a, const double* b, double beta, double* c);

/// Not collective. Single precision: C[m x n] = alpha op(A) op(B) + beta C, row-major.
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const float* a, const float* b, float beta, float* c);

/// Not collective. C (p x p, row-major, both triangles) = beta C + A^T A for the rows of A
/// (n x p, row-major). DSYRK.
void gram(std::int64_t n, std::int64_t p, const double* a, double beta, double* c);

/// Not collective. Eigendecomposition of the symmetric a (l x l, row-major, both triangles):
/// w (l, decreasing) and z (l x l, row-major, column k = eigenvector k). LAPACK dsyevd.
void sym_eig(std::int64_t l, const std::vector<double>& a, std::vector<double>& w,
             std::vector<double>& z);

/// Not collective. B (m x n, row-major) := T B, T upper triangular m x m (row-major; its lower
/// triangle is not read). TRMM: half the flops of the GEMM with a full matrix.
void trmm_upper(std::int64_t m, std::int64_t n, const double* t, double* b);
void trmm_upper(std::int64_t m, std::int64_t n, const float* t, float* b);

/// Not collective. In place: G (l x l, symmetric positive definite) := R, upper triangular with
/// G = R^T R. Returns false if G is not positive definite.
bool cholesky_upper(std::int64_t l, double* g);

/// Not collective. Y (n x l, row-major) := Y R^{-1}, R upper triangular l x l.
void solve_right_upper(std::int64_t n, std::int64_t l, const double* r, double* y);

/// Not collective. Thin SVD of A (m x n, row-major): s (min(m,n)), vt (min(m,n) x n, row-major),
/// singular values in decreasing order. LAPACK dgesvd.
void svd(std::int64_t m, std::int64_t n, std::vector<double> a, std::vector<double>& s,
         std::vector<double>& vt);

/// Not collective. Thin SVD A = U diag(s) V^T of A (m x n, row-major), k = min(m, n):
/// u (m x k), s (k, decreasing), vt (k x n), all row-major. LAPACK dgesvd.
void svd_thin(std::int64_t m, std::int64_t n, std::vector<double> a, std::vector<double>& u,
              std::vector<double>& s, std::vector<double>& vt);

} // namespace gradmap::linalg
