#pragma once
// The predictions of a biological backpropagation as hypotheses with valid tests (definitions,
// formulas and the reasons for each choice: docs/statistics.md, "Divergence"). All functions are
// pure and not collective: they take the group means of one modality (observed, bootstrap
// replicates paired across the two kinds, permutation replicates) and return numbers.
//
// Undefined statistics (a replicate whose peak or slope does not exist) follow one rule
// everywhere: an undefined replicate never supports a claim. In a one-sided bootstrap p-value it
// counts as a replicate that does not support the claim; in a permutation null it takes the
// no-effect value 0 (never more extreme than a defined observation; the test stays exact); in an
// interval it is placed half at -inf and half at +inf (so the interval widens, possibly to an
// infinite bound, reported as null); an undefined observed statistic gives no p-value.
#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::stats {

/// A [L, G, R] array of group means (layer, group, replicate), row-major, R = 1 for observed.
struct Profiles {
  const std::vector<double>* data = nullptr;
  std::int64_t L = 0, G = 0, R = 1;
  double at(std::int64_t l, std::int64_t g, std::int64_t r) const {
    return (*data)[static_cast<size_t>((l * G + g) * R + r)];
  }
};

/// Bias-corrected percentile bootstrap interval (Efron 1987 BC, no acceleration):
/// z0 = Phi^-1(share of replicates below the estimate, ties counting one half), bounds at the
/// quantiles Phi(2 z0 -+ z_{(1+level)/2}). Undefined (non-finite) replicates follow the rule
/// above. When the estimate still falls outside (|z0| beyond z_{(1+level)/2}: the bootstrap is
/// inconsistent for this statistic there), the interval is extended to the estimate and
/// `extended` is set. Bounds are NaN where infinite or where no replicate is defined.
struct Interval {
  double lo, hi;
  bool extended;
};
Interval bc_interval(const std::vector<double>& boot, double estimate, double level);

/// One-sided bootstrap p-value of the claim "statistic > 0" from its replicates:
/// p = (1 + #{b: not (x_b > 0)}) / (B + 1) (an undefined replicate counts as not supporting).
double p_claim_positive(const std::vector<double>& boot);

/// Standard normal CDF and its inverse.
double normal_cdf(double z);
double normal_quantile(double p);

/// One-sided p-value of "contrast > 0" from its observed value d and bootstrap replicates, with the
/// bootstrap standard error: p = 1 - Phi(d / sd(d*)) (a Wald test; the contrasts are differences
/// of group means of r, close to normal). A share u of undefined replicates makes it
/// p + (1 - p) u (they never support the claim).
double p_contrast_positive(double observed, const std::vector<double>& boot);

/// Peak-layer p-values of one group's layer profile: for each layer l,
/// p(l) = min(1, (L - 1) min_{k != l} p(X_k > X_l)), where p(X_k > X_l) is the one-sided
/// p-value of the paired contrast X_k - X_l (p_contrast_positive). {l : p(l) >= a} is a
/// confidence set of level 1 - a for the layer of the profile's maximum (Bonferroni over the
/// L - 1 competitors: the true peak l* is left out only if some X_k - X_l*, whose true value is
/// <= 0, tests positive).
std::vector<double> peak_pvalues(const Profiles& obs, const Profiles& boot, std::int64_t g);

/// The space tests of one profile pair (an ROI, or one voxel) from the peak-layer p-values of
/// the activations (pa) and gradients (pg), confidence sets at level alpha / 2 each:
///   p_div  = min(1, 2 max_{|a - b| <= margin} min(pa(a), pg(b)))  (every pair farther apart),
///   p_cons = min(1, 2 max_{|a - b| > margin} min(pa(a), pg(b)))   (every pair within;
///            1 when no pair is farther apart than the margin: nothing to exclude).
/// NaN p-values (an undefined profile) give NaN.
struct PairTests {
  double p_div, p_cons;
};
PairTests pair_tests(const std::vector<double>& pa, const std::vector<double>& pg,
                     double margin_layers);

/// Per-target peak-layer p-values (the voxel-level space tests): r [L, t] the observed test r of
/// t targets, boot [L, Bb, t] their bootstrap replicates (the same resamples for every layer;
/// NaN where undefined). Per target, peak_pvalues of its layer profile; NaN for every layer of a
/// target without a finite r. Returns [L, t].
std::vector<float> target_peak_pvalues(const std::vector<float>& r, const std::vector<float>& boot,
                                       std::int64_t L, std::int64_t Bb, std::int64_t t);

struct Verdict {
  double value = 0, lo = 0, hi = 0; ///< descriptive statistic with its BC interval
  bool ci_extended = false;
  double p_diverges = 1;   ///< valid p-value of "the data diverge from the prediction"
  double p_consistent = 1; ///< p-value of the equivalence claim (consistent within the margin)
  double p_signal_activations = 1, p_signal_gradients = 1; ///< max-statistic signal tests
  std::string verdict;      ///< "diverges", "consistent" or "undetermined"
  std::string reason;       ///< one sentence: why this verdict
  std::vector<double> boot; ///< replicates of `value`
};

/// Verdict from the p-values: undetermined unless both kinds carry signal (p_signal < alpha);
/// then consistent if p_consistent < alpha, else diverges if p_diverges < alpha, else
/// undetermined. (Both small means a difference inside the margin: consistent.)
void decide(Verdict& v, double alpha);

/// Max-statistic permutation test that a kind carries any signal in the given groups:
/// p = (1 + #{b: max_{l, g in use} null_b >= max_{l, g in use} observed}) / (B + 1); a replicate
/// with no defined value takes the no-effect value 0.
double p_any_signal(const Profiles& observed, const Profiles& null, const std::vector<bool>& use);

/// Space (fMRI): per ROI g with voxels, peak-layer confidence sets of the activations (S_A) and
/// gradients (S_G) at level alpha / 2 each.
///   diverges in g:   every pair (a in S_A, b in S_G) more than `margin` layers apart,
///                    p_div(g) = min(1, 2 max_{|a - b| <= margin} min(pA(a), pG(b)))
///   consistent in g: every pair within `margin` layers,
///                    p_cons(g) = min(1, 2 max_{|a - b| > margin} min(pA(a), pG(b)))
///                    (1 when no pair is farther apart than the margin: nothing to exclude)
/// Across ROIs: p_diverges = min(1, n min_g p_div(g)) (Bonferroni: some ROI diverges);
/// p_consistent = max_g p_cons(g) (intersection-union: every ROI consistent).
/// value = mean over ROIs of |peak_G(g) - peak_A(g)| (layers), with its paired replicates.
struct SpaceDivergence {
  Verdict v;
  std::vector<double> p_div_roi, p_cons_roi;   ///< [G] (NaN for ROIs without voxels)
  std::vector<double> peak_p_act, peak_p_grad; ///< [L, G] peak-layer p-values
};
SpaceDivergence space_divergence(const Profiles& act, const Profiles& grad,
                                 const Profiles& act_boot, const Profiles& grad_boot,
                                 const Profiles& act_null, const Profiles& grad_null,
                                 const std::vector<std::int64_t>& group_n, double margin_layers,
                                 double alpha, double level);

/// Latencies of one kind from latency curves (groups = time points `times`): per layer, the
/// peak latency argmax_{t > 0} c_l(t) (the first on ties) and the onset latency, the first
/// t > 0 with c_l(t) >= c_l(peak) / 2; NaN where the curve has no finite post-stimulus value
/// (and the onset NaN where the peak r is <= 0: no response to rise to).
struct Latencies {
  std::vector<double> peak, onset;
};
Latencies latencies(const Profiles& curves, std::int64_t r, const std::vector<double>& times);

/// Theil-Sen slope of y on 0..n-1: the median of the pairwise slopes (y_j - y_i) / (j - i) over
/// finite pairs (NaN with none). Robust to a minority of layers whose peak jumps to another mode
/// of its latency curve (asymptotic breakdown point 29%; with 6 layers one bad layer is tolerated,
/// with 12 layers three; with 2 layers none).
double layer_slope(const std::vector<double>& y);

/// Time (MEG): the prediction is that the gradient of layer l peaks after that of layer l + 1
/// (slope of gradient peak latency on layer < 0) and the top layer's gradient after its forward
/// activation (gap = tau_G(L-1) - tau_A(L-1) > 0).
///   diverges:   slope > 0 or gap < 0, p = min(1, 2 min(p(slope > 0), p(gap < 0)))
///   consistent: slope < -margin and gap > 0, p = max(p(slope < -margin), p(gap > 0))
/// value = the slope (s per layer), with its paired replicates.
struct TimeDivergence {
  Verdict v;
  double gap = 0, gap_lo = 0, gap_hi = 0;
  Latencies act, grad;                         ///< observed
  std::vector<double> peak_ci[2], onset_ci[2]; ///< per kind, [L, 2] BC intervals
};
TimeDivergence time_divergence(const Profiles& act, const Profiles& grad, const Profiles& act_boot,
                               const Profiles& grad_boot, const Profiles& act_null,
                               const Profiles& grad_null, const std::vector<double>& times,
                               double margin_s_per_layer, double alpha, double level);

} // namespace gradmap::stats
