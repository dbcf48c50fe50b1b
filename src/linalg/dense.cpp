#include "gradmap/linalg/dense.hpp"

#include <cblas.h>

#include <algorithm>
#include <string>

#include "gradmap/core/error.hpp"

extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dgesvd_(const char* jobu, const char* jobvt, const int* m, const int* n, double* a,
             const int* lda, double* s, double* u, const int* ldu, double* vt, const int* ldvt,
             double* work, const int* lwork, int* info);
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info);
void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda, double* s,
             double* u, const int* ldu, double* vt, const int* ldvt, double* work, const int* lwork,
             int* iwork, int* info);
}

namespace gradmap::linalg {

void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, double alpha,
          const double* a, const double* b, double beta, double* c) {
  if (m == 0 || n == 0)
    return;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m),
              int(n), int(k), alpha, a, ta ? int(m) : int(k), b, tb ? int(k) : int(n), beta, c,
              int(n));
}

void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const float* a, const float* b, float beta, float* c) {
  if (m == 0 || n == 0)
    return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m),
              int(n), int(k), alpha, a, ta ? int(m) : int(k), b, tb ? int(k) : int(n), beta, c,
              int(n));
}

void gram(std::int64_t n, std::int64_t p, const double* a, double beta, double* c) {
  if (p == 0)
    return;
  // Row-major A^T A: the upper triangle, then mirrored.
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(p), int(n), 1.0, a, int(p), beta, c,
              int(p));
  for (std::int64_t i = 0; i < p; ++i)
    for (std::int64_t j = 0; j < i; ++j)
      c[i * p + j] = c[j * p + i];
}

void sym_eig(std::int64_t l, const std::vector<double>& a, std::vector<double>& w,
             std::vector<double>& z) {
  // Symmetric: row-major = column-major. dsyevd returns ascending eigenvalues with the vectors
  // in columns (column-major); reversed and transposed into row-major columns here.
  const int n = int(l);
  std::vector<double> cm(a);
  std::vector<double> wa(static_cast<size_t>(l));
  w.assign(size_t(l), 0.0);
  z.assign(size_t(l * l), 0.0);
  if (l == 0)
    return;
  int info = 0, lwork = -1, liwork = -1, iq = 0;
  double q = 0;
  dsyevd_("V", "L", &n, cm.data(), &n, wa.data(), &q, &lwork, &iq, &liwork, &info);
  lwork = int(q);
  liwork = iq;
  std::vector<double> work(static_cast<size_t>(std::max(1, lwork)));
  std::vector<int> iwork(static_cast<size_t>(std::max(1, liwork)));
  dsyevd_("V", "L", &n, cm.data(), &n, wa.data(), work.data(), &lwork, iwork.data(), &liwork,
          &info);
  if (info != 0)
    throw Error("LAPACK dsyevd failed on a " + std::to_string(l) + " x " + std::to_string(l) +
                " symmetric matrix (info " + std::to_string(info) + ")");
  for (std::int64_t k = 0; k < l; ++k) {
    const std::int64_t src = l - 1 - k;
    w[size_t(k)] = wa[size_t(src)];
    for (std::int64_t i = 0; i < l; ++i)
      z[size_t(i * l + k)] = cm[size_t(src * l + i)];
  }
}

void trmm_upper(std::int64_t m, std::int64_t n, const double* t, double* b) {
  if (m == 0 || n == 0)
    return;
  cblas_dtrmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, int(m), int(n), 1.0,
              t, int(m), b, int(n));
}

void trmm_upper(std::int64_t m, std::int64_t n, const float* t, float* b) {
  if (m == 0 || n == 0)
    return;
  cblas_strmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, int(m), int(n),
              1.0f, t, int(m), b, int(n));
}

bool cholesky_upper(std::int64_t l, double* g) {
  // Row-major upper R is column-major lower L = R^T: factor "L" in Fortran terms.
  const int n = int(l);
  int info = 0;
  dpotrf_("L", &n, g, &n, &info);
  if (info != 0)
    return false;
  for (std::int64_t i = 0; i < l; ++i) // zero the other triangle (row-major strictly lower)
    for (std::int64_t j = 0; j < i; ++j)
      g[i * l + j] = 0.0;
  return true;
}

void solve_right_upper(std::int64_t n, std::int64_t l, const double* r, double* y) {
  if (n == 0)
    return;
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, int(n), int(l),
              1.0, r, int(l), y, int(l));
}

void svd(std::int64_t m, std::int64_t n, std::vector<double> a, std::vector<double>& s,
         std::vector<double>& vt) {
  std::vector<double> u;
  svd_thin(m, n, std::move(a), u, s, vt);
}

void svd_thin(std::int64_t m, std::int64_t n, std::vector<double> a, std::vector<double>& u,
              std::vector<double>& s, std::vector<double>& vt) {
  // Row-major A (m x n) is column-major A^T (n x m) = V S U^T: LAPACK's U of A^T (n x k,
  // column-major) is row-major V^T (k x n), and its VT (k x m, column-major) is row-major U.
  const int M = int(n), N = int(m), k = int(std::min(m, n));
  s.assign(size_t(k), 0.0);
  vt.assign(size_t(k) * size_t(n), 0.0);
  u.assign(size_t(m) * size_t(k), 0.0);
  if (k == 0)
    return;
  // Divide and conquer (dgesdd: BLAS-3, ~10x faster than dgesvd at 10^4 x 10^3); dgesvd when
  // it does not converge.
  const std::vector<double> a0 = a;
  int lwork = -1, info = 0;
  double q = 0;
  std::vector<int> iwork(8 * size_t(k));
  dgesdd_("S", &M, &N, a.data(), &M, s.data(), vt.data(), &M, u.data(), &k, &q, &lwork,
          iwork.data(), &info);
  lwork = int(q);
  std::vector<double> work(size_t(std::max(1, lwork)));
  dgesdd_("S", &M, &N, a.data(), &M, s.data(), vt.data(), &M, u.data(), &k, work.data(), &lwork,
          iwork.data(), &info);
  if (info == 0)
    return;
  a = a0;
  lwork = -1;
  dgesvd_("S", "S", &M, &N, a.data(), &M, s.data(), vt.data(), &M, u.data(), &k, &q, &lwork, &info);
  lwork = int(q);
  work.assign(size_t(std::max(1, lwork)), 0.0);
  dgesvd_("S", "S", &M, &N, a.data(), &M, s.data(), vt.data(), &M, u.data(), &k, work.data(),
          &lwork, &info);
  if (info != 0)
    throw Error("LAPACK dgesdd/dgesvd failed (info " + std::to_string(info) + ")");
}

} // namespace gradmap::linalg
