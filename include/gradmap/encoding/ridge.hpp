#pragma once
// Ridge regression for many targets in the SVD basis of the (standardised) training features.
// With X_train = U diag(s) V^T (n x p, rank r), for a penalty a:
//   fitted values      Yhat = U diag(f) U^T Y,          f_k = s_k^2 / (s_k^2 + a)
//   leverages          h_i  = sum_k U_ik^2 f_k + 1/n   (1/n: the intercept, see fit_loo)
//   LOO residuals      e_i  = (y_i - yhat_i) / (1 - h_i)  (Golub, Heath & Wahba 1979; what
//                      scikit-learn's RidgeCV computes in its efficient leave-one-out)
//   coefficients       W    = V diag(g) U^T Y,          g_k = s_k / (s_k^2 + a)
// so every alpha costs one GEMM and the refit with a different alpha per target costs one more.
#include <mpi.h>

#include <cstdint>
#include <vector>

namespace gradmap::encoding {

/// The training side, computed once per feature set and shared by all targets.
struct RidgeBasis {
  std::int64_t n = 0, p = 0, r = 0, m = 0; ///< training rows, features, rank, test rows
  std::vector<double> u;                   ///< [n, r]
  std::vector<float> u32;                  ///< U in float32, for the float32 GEMMs
  std::vector<double> s;                   ///< [r]
  std::vector<double> test_v;              ///< X_test V, [m, r]
};

/// Not collective. x_train [n, p], x_test [m, p], row-major, already standardised. The primal
/// form: thin SVD of X_train (LAPACK dgesdd), directions with s_k <= 1e-10 s_0 dropped.
RidgeBasis make_basis(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                      const std::vector<double>& x_test, std::int64_t m);

/// Collective on comm (x_train and x_test identical on every rank). The primal basis for n >= p
/// with its n-sized work split over the ranks by rows (p > n: make_basis on rank 0, broadcast):
/// the Gram matrix X^T X (summed over the ranks' rows) gives V_k, the eigenvectors with
/// lambda_k > 1e-14 lambda_0 (s_k > 1e-7 s_0); a CholeskyQR pass on X V_k diag(lambda)^-1/2
/// makes U orthonormal to rounding however small s_k, and s^2 carries the eigenvalues' absolute
/// error (~1e-16 s_0^2: immaterial to ridge, whose shrinkage is s^2 / (s^2 + alpha)). Rank 0
/// runs the O(p^3) steps (two p x p eigendecompositions) and broadcasts; each rank computes its
/// rows of U and X_test V (gathered everywhere). Flops per rank ~6 (n / ranks) p^2, against
/// dgesdd's ~4 n p^2 + O(p^3) with BLAS-2 parts on one rank.
RidgeBasis make_basis_gram(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                           const std::vector<double>& x_test, std::int64_t m, MPI_Comm comm);

/// Collective on comm (x_train and x_test identical on every rank). The same basis from the
/// dual (kernel) form, for p >> n: K = X_train X_train^T = U diag(s^2) U^T (linalg::kernel_eig:
/// LAPACK on one rank, ScaLAPACK PDSYEVD over comm), X_test V = X_test X_train^T U diag(1/s);
/// directions with s_k^2 <= 1e-12 s_0^2 are dropped (the eigenvalues' rounding floor is
/// ~1e-16 s_0^2, so the primal's 1e-10 on s is out of reach). Costs n^2 p + m n p + O(n^3)
/// instead of the SVD's O(n p min(n, p)) with a larger constant.
RidgeBasis make_basis_dual(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
                           const std::vector<double>& x_test, std::int64_t m, MPI_Comm comm);

struct RidgeScores {
  std::vector<double> alpha;      ///< [t] chosen penalty (NaN for constant targets)
  std::vector<double> r;          ///< [t] Pearson r of test predictions (NaN if undefined)
  std::vector<double> r2;         ///< [t] 1 - SSE / SST on the test images
  std::vector<double> prediction; ///< [m, t] test predictions
  std::vector<double> fold_r;     ///< K-fold: [folds, t] held-out Pearson r at the chosen alpha
  /// [t] the cross-validation criterion at the chosen alpha (LOO: the mean squared LOO residual;
  /// K-fold: the summed held-out squared error / n), comparable across fits of the same targets
  /// and training rows (NaN for constant targets)
  std::vector<double> cv_error;
  /// float32 selection: how many targets' criteria were recomputed in float64
  std::int64_t rechecked = 0;
};

/// Not collective. Per target, the candidate fit (same targets, training and test rows) with the
/// smallest cv_error (the first on ties): its alpha, scores, prediction and fold r. chosen[c] is
/// the candidate's index (-1 where no candidate has a finite criterion). This is the per-target
/// choice of a banded ridge over a grid of band weights: candidate k fitted on
/// [sqrt(w_k) X_1, sqrt(1 - w_k) X_2] (penalties alpha / w_k and alpha / (1 - w_k) per band).
RidgeScores select_per_target(const std::vector<RidgeScores>& candidates, std::int64_t m,
                              std::int64_t t, std::vector<std::int32_t>& chosen);

/// Not collective. Copies target j of `from` (fitted on from_t targets) to target c of `to`
/// (to_t targets, arrays already sized): alpha, r, r2, cv_error, the m test predictions and the
/// per-fold r.
void copy_target(const RidgeScores& from, std::int64_t from_t, std::int64_t j, RidgeScores& to,
                 std::int64_t to_t, std::int64_t c, std::int64_t m);

/// Precision of the alpha-selection GEMMs (the per-alpha residuals or fold predictions, which
/// are nearly all the work). float32: those GEMMs and their operands in single precision, the
/// error sums in double; every target whose choice the float32 criterion cannot settle is then
/// recomputed in float64, so the selected alpha is float64's except where float64 itself would
/// tie. LOO with a primal basis (r < n) bounds the float32 error of each criterion (ridge.cpp,
/// loo_errors_fitted) and rechecks a target when another alpha's criterion is within the bounds
/// of its best; the dual LOO and K-fold recheck a target whose best criterion is within a
/// relative 1e-4 of another alpha's. The refit, predictions and scores are always float64.
enum class Precision { float32, float64 };

/// Not collective. y_train [n, t] (centred with training means), y_test [m, t], row-major; the
/// features were centred too (the centring is the fit of an unpenalised intercept).
/// Per-target alpha: the minimum mean squared LOO residual over `alphas`, the first on ties
/// (scikit-learn's RidgeCV(alpha_per_target=True) rule).
RidgeScores fit_loo(const RidgeBasis& b, const std::vector<double>& y_train,
                    const std::vector<double>& y_test, std::int64_t t,
                    const std::vector<double>& alphas, Precision precision = Precision::float64);

/// Not collective. fit_loo's criterion before any recheck, [alphas, t]: the mean squared LOO
/// residual of every target and alpha in the given precision; for float32 with a primal basis
/// (r < n), *bound (when given) receives the bound on its rounding error, [alphas, t].
std::vector<double> loo_criterion(const RidgeBasis& b, const std::vector<double>& y_train,
                                  std::int64_t t, const std::vector<double>& alphas,
                                  Precision precision, std::vector<double>* bound = nullptr);

/// One K-fold split of the training rows: the basis of the fold's training part (centred with
/// its own means: the fold's intercept), and the rows it trains on and holds out.
struct FoldBasis {
  RidgeBasis basis; ///< test_v holds the held-out rows' X V
  std::vector<std::int64_t> train, valid;
  std::vector<float> test_v32; ///< basis.test_v in float32
};

/// Not collective. The centred training and held-out rows of fold f (fold[i] in [0, folds)) of
/// the standardised x_train [n, p], and fb.train / fb.valid; make_basis(xtr, .., xva, ..) and
/// finish_fold complete it.
void fold_rows(const std::vector<double>& x_train, std::int64_t n, std::int64_t p,
               const std::vector<std::int32_t>& fold, int f, FoldBasis& fb,
               std::vector<double>& xtr, std::vector<double>& xva);
void finish_fold(FoldBasis& fb);

/// Not collective. Per-target alpha by K-fold cross-validation over the training rows: in each
/// fold the ridge is fitted on the other folds, centred with their means (the fold's intercept),
/// and the squared errors on the held-out rows are summed; the first alpha with the smallest
/// total wins. Then refit on all training rows as fit_loo does.
RidgeScores fit_kfold(const RidgeBasis& b, const std::vector<FoldBasis>& folds,
                      const std::vector<double>& y_train, const std::vector<double>& y_test,
                      std::int64_t t, const std::vector<double>& alphas,
                      Precision precision = Precision::float64);

/// The K-fold path for n > p in the Gram (primal, p x p) form. For fold f with held-out rows
/// v and training rows tr (each centred with the training rows' means mu, the fold's intercept),
///   G_f = X_tr^T X_tr = V diag(s2) V^T (p x p eigendecomposition, LAPACK dsyevd),
///   beta_a = V diag(1 / (s2 + a)) C,  C = V^T X_tr^T Y_tr,
///   SSE_a = ||Y_v||^2 - 2 sum_k P_k C_k / (s2_k + a) + c^T D_a H D_a c,
///   P = V^T X_v^T Y_v,  H = V^T X_v^T X_v V (r x r),  D_a = diag(1 / (s2 + a)),
/// where X_tr^T Y_tr and X_v^T Y_v come from the per-fold products B_f = X_f^T Y_f of the
/// uncentred rows (their sum is X^T Y, reused by the refit) with rank-one centring terms. Per
/// target and alpha this costs O(r^2) (one triangular matrix product with H: c^T H c =
/// 2 c^T triu(H, halved diagonal) c) instead of the held-out predictions' O(n_v r), and no
/// n x r basis is formed. The training rows must be ordered by fold.
struct GramFold {
  std::int64_t begin = 0, end = 0; ///< held-out rows [begin, end)
  std::int64_t r = 0;              ///< retained eigenpairs (s2_k > 1e-12 s2_0)
  std::vector<double> v;           ///< [p, r] eigenvectors of the centred training Gram
  std::vector<double> s2;          ///< [r] its eigenvalues, decreasing
  std::vector<double> mu;          ///< [p] mean of the fold's training rows
  std::vector<double> sx;          ///< [p] column sums of the held-out rows
  std::vector<double> vd;          ///< [r] V^T (mean of the held-out rows - mu)
  std::vector<double> tri;         ///< [r, r] triu(H) with halved diagonal
  std::vector<float> v32, tri32;   ///< float32 copies for the float32 selection pass
};

struct GramBasis {
  std::int64_t n = 0, p = 0, r = 0, m = 0;
  std::vector<double> x;      ///< [n, p] standardised training rows, ordered by fold
  std::vector<double> v, s2;  ///< eigenpairs of X^T X over all training rows ([p, r], [r])
  std::vector<double> test_v; ///< X_test V, [m, r]
  std::vector<GramFold> folds;
};

/// Not collective. The all-rows part of a GramBasis (v, s2, test_v, r; b.x, b.n, b.p must be
/// set; x_test [m, p]).
void make_gram_full(GramBasis& b, const std::vector<double>& x_test, std::int64_t m);

/// Not collective. Fold with held-out rows [begin, end) of b.x.
GramFold make_gram_fold(const GramBasis& b, std::int64_t begin, std::int64_t end);

/// Not collective. Per-target alpha by K-fold CV (the same criterion as fit_kfold: the first
/// alpha with the smallest summed held-out squared error), the float32 pass rechecked in
/// float64 where the best alpha is within 1e-4 max(1, SST / SSE_best) of another (the float32
/// error of the expanded SSE scales with the held-out variance SST, not with SSE), then the
/// refit on all training rows in float64. y_train rows in the order of b.x.
RidgeScores fit_kfold_gram(const GramBasis& b, const std::vector<double>& y_train,
                           const std::vector<double>& y_test, std::int64_t t,
                           const std::vector<double>& alphas,
                           Precision precision = Precision::float64);

/// Not collective. Pearson r and R^2 of each column of prediction vs y (both [m, t]).
void score_columns(const std::vector<double>& prediction, const std::vector<double>& y,
                   std::int64_t m, std::int64_t t, std::vector<double>& r, std::vector<double>& r2);

} // namespace gradmap::encoding
