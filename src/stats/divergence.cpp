// Divergence tests: see divergence.hpp and docs/statistics.md ("Divergence").
#include "gradmap/stats/divergence.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace gradmap::stats {

namespace {
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

// Quantile (linear interpolation between order statistics) of a sorted vector that may hold
// +-inf; an interpolation touching an infinite order statistic gives that infinity.
double sorted_quantile(const std::vector<double>& s, double q) {
  if (s.empty())
    return kNaN;
  q = std::clamp(q, 0.0, 1.0);
  const double pos = q * double(s.size() - 1);
  const size_t lo = size_t(std::floor(pos)), hi = std::min(s.size() - 1, lo + 1);
  if (std::isinf(s[lo]))
    return s[lo];
  if (std::isinf(s[hi]))
    return pos > double(lo) ? s[hi] : s[lo]; // interpolating toward an infinity reaches it
  return s[lo] + (pos - double(lo)) * (s[hi] - s[lo]);
}

double finite_or_nan(double x) {
  return std::isfinite(x) ? x : kNaN;
}
} // namespace

double normal_cdf(double z) {
  return 0.5 * std::erfc(-z / std::sqrt(2.0));
}

double normal_quantile(double p) {
  if (!(p > 0))
    return -kInf;
  if (!(p < 1))
    return kInf;
  double lo = -40, hi = 40; // bisection: 100 halvings reach double precision
  for (int i = 0; i < 100; ++i) {
    const double mid = 0.5 * (lo + hi);
    (normal_cdf(mid) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

Interval bc_interval(const std::vector<double>& boot, double estimate, double level) {
  if (!std::isfinite(estimate) || boot.empty())
    return {kNaN, kNaN, false};
  // Undefined replicates: half at -inf, half at +inf (the odd one out at +inf).
  std::vector<double> s;
  size_t undefined = 0;
  for (double b : boot)
    if (std::isfinite(b))
      s.push_back(b);
    else
      ++undefined;
  if (s.empty())
    return {kNaN, kNaN, false};
  s.insert(s.end(), undefined / 2, -kInf);
  s.insert(s.end(), undefined - undefined / 2, kInf);
  std::sort(s.begin(), s.end());
  const double n = double(s.size());
  double below = 0, equal = 0;
  for (double b : s) {
    below += b < estimate ? 1 : 0;
    equal += b == estimate ? 1 : 0;
  }
  const double share = std::clamp((below + 0.5 * equal) / n, 0.5 / n, 1 - 0.5 / n);
  const double z0 = normal_quantile(share), z = normal_quantile(0.5 + level / 2);
  double lo = sorted_quantile(s, normal_cdf(2 * z0 - z));
  double hi = sorted_quantile(s, normal_cdf(2 * z0 + z));
  bool extended = false;
  if (lo > estimate) {
    lo = estimate;
    extended = true;
  }
  if (hi < estimate) {
    hi = estimate;
    extended = true;
  }
  return {finite_or_nan(lo), finite_or_nan(hi), extended};
}

double p_claim_positive(const std::vector<double>& boot) {
  double against = 1;
  for (double b : boot)
    against += b > 0 ? 0 : 1; // NaN > 0 is false: an undefined replicate counts against
  return against / double(boot.size() + 1);
}

double p_contrast_positive(double observed, const std::vector<double>& boot) {
  double n = 0, s = 0;
  for (double b : boot)
    if (std::isfinite(b)) {
      n += 1;
      s += b;
    }
  if (!std::isfinite(observed) || n < 2)
    return 1.0;
  double ss = 0; // two passes: no cancellation
  for (double b : boot)
    if (std::isfinite(b))
      ss += (b - s / n) * (b - s / n);
  const double var = ss / (n - 1);
  double p;
  if (var > 0)
    p = normal_cdf(-observed / std::sqrt(var)); // the upper tail, without cancellation
  else
    p = observed > 0 ? 0.0 : 1.0;
  const double undefined = 1 - n / double(boot.size());
  return p + (1 - p) * undefined; // an undefined replicate never supports the claim
}

std::vector<double> peak_pvalues(const Profiles& obs, const Profiles& boot, std::int64_t g) {
  const std::int64_t L = boot.L, B = boot.R;
  std::vector<double> p(static_cast<size_t>(L), 1.0);
  if (L < 2)
    return p;
  std::vector<double> d(static_cast<size_t>(B));
  for (std::int64_t l = 0; l < L; ++l) {
    double best = 1;
    for (std::int64_t k = 0; k < L; ++k) {
      if (k == l)
        continue;
      for (std::int64_t b = 0; b < B; ++b)
        d[b] = boot.at(k, g, b) - boot.at(l, g, b);
      best = std::min(best, p_contrast_positive(obs.at(k, g, 0) - obs.at(l, g, 0), d));
    }
    p[l] = std::min(1.0, double(L - 1) * best);
  }
  return p;
}

PairTests pair_tests(const std::vector<double>& pa, const std::vector<double>& pg,
                     double margin_layers) {
  // Pairs (a, b) of an activation and a gradient peak layer: within the margin ("the same
  // place") or beyond it. Divergence excludes every pair within the margin, consistency every
  // pair beyond it; a kind of pair that does not exist cannot be excluded (p = 1).
  const double m = margin_layers + 1e-9; // 0.2 x 5 layers is one layer, not 0.99999...
  double div = 0, cons = 0;
  bool far_pairs = false, undefined = false;
  for (size_t l = 0; l < pa.size(); ++l)
    for (size_t k = 0; k < pg.size(); ++k) {
      undefined |= std::isnan(pa[l]) || std::isnan(pg[k]);
      const double q = std::min(pa[l], pg[k]);
      if (std::abs(double(l) - double(k)) <= m) {
        div = std::max(div, q);
      } else {
        cons = std::max(cons, q);
        far_pairs = true;
      }
    }
  if (undefined || pa.empty() || pg.empty())
    return {kNaN, kNaN};
  return {std::min(1.0, 2 * div), far_pairs ? std::min(1.0, 2 * cons) : 1.0};
}

std::vector<float> target_peak_pvalues(const std::vector<float>& r, const std::vector<float>& boot,
                                       std::int64_t L, std::int64_t Bb, std::int64_t t) {
  std::vector<float> out(static_cast<size_t>(L * t), std::numeric_limits<float>::quiet_NaN());
  std::vector<double> obs(static_cast<size_t>(L)), rep(static_cast<size_t>(L * Bb));
  for (std::int64_t c = 0; c < t; ++c) {
    bool any = false;
    for (std::int64_t l = 0; l < L; ++l) {
      obs[l] = r[l * t + c];
      any |= std::isfinite(obs[l]);
      for (std::int64_t b = 0; b < Bb; ++b)
        rep[l * Bb + b] = boot[(l * Bb + b) * t + c];
    }
    if (!any)
      continue;
    const auto p = peak_pvalues(Profiles{&obs, L, 1, 1}, Profiles{&rep, L, 1, Bb}, 0);
    for (std::int64_t l = 0; l < L; ++l)
      out[l * t + c] = float(p[l]);
  }
  return out;
}

void decide(Verdict& v, double alpha) {
  if (!(v.p_signal_activations < alpha) || !(v.p_signal_gradients < alpha)) {
    v.verdict = "undetermined";
    v.reason = !(v.p_signal_gradients < alpha)
                   ? "the gradients carry no detectable signal here, so neither claim can be tested"
                   : "the activations carry no detectable signal here, so the prediction has no "
                     "reference";
  } else if (v.p_consistent < alpha) {
    v.verdict = "consistent";
    v.reason = "the gradients' scores are organised as a biological backpropagation predicts, "
               "within the stated margin (raw scores, which partly re-encode the activations: "
               "see docs/statistics.md, 'What raw gradient scores can and cannot show')";
  } else if (v.p_diverges < alpha) {
    v.verdict = "diverges";
    v.reason = "the gradients' scores are organised differently from what a biological "
               "backpropagation predicts (raw scores, which partly re-encode the activations: on "
               "simulated brains without any learning signal this verdict comes out in space too; "
               "see docs/statistics.md, 'What raw gradient scores can and cannot show')";
  } else {
    v.verdict = "undetermined";
    v.reason = "the data support neither divergence nor consistency at this signal-to-noise";
  }
}

double p_any_signal(const Profiles& observed, const Profiles& null, const std::vector<bool>& use) {
  double obs = -kInf;
  for (std::int64_t l = 0; l < observed.L; ++l)
    for (std::int64_t g = 0; g < observed.G; ++g)
      if (use[g] && std::isfinite(observed.at(l, g, 0)))
        obs = std::max(obs, observed.at(l, g, 0));
  if (!std::isfinite(obs))
    return 1.0;
  double c = 1;
  for (std::int64_t b = 0; b < null.R; ++b) {
    double m = -kInf;
    bool undefined = true;
    for (std::int64_t l = 0; l < null.L; ++l)
      for (std::int64_t g = 0; g < null.G; ++g)
        if (use[g] && std::isfinite(null.at(l, g, b))) {
          m = std::max(m, null.at(l, g, b));
          undefined = false;
        }
    c += (undefined ? 0.0 : m) >= obs ? 1 : 0; // undefined: the no-effect value 0 (the rule)
  }
  return c / double(null.R + 1);
}

namespace {
int argmax_layer(const Profiles& p, std::int64_t g, std::int64_t r) {
  int best = -1;
  double v = -kInf;
  for (std::int64_t l = 0; l < p.L; ++l) {
    const double x = p.at(l, g, r);
    if (std::isfinite(x) && x > v) {
      v = x;
      best = int(l);
    }
  }
  return best;
}

// Mean over the ROIs in use of |peak_G - peak_A| (layers); NaN if any used ROI has no peak.
double mean_peak_distance(const Profiles& a, const Profiles& g, std::int64_t r,
                          const std::vector<bool>& use) {
  double s = 0;
  int n = 0;
  for (std::int64_t k = 0; k < a.G; ++k) {
    if (!use[k])
      continue;
    const int pa = argmax_layer(a, k, r), pg = argmax_layer(g, k, r);
    if (pa < 0 || pg < 0)
      return kNaN;
    s += std::abs(pa - pg);
    ++n;
  }
  return n ? s / n : kNaN;
}
} // namespace

SpaceDivergence space_divergence(const Profiles& act, const Profiles& grad,
                                 const Profiles& act_boot, const Profiles& grad_boot,
                                 const Profiles& act_null, const Profiles& grad_null,
                                 const std::vector<std::int64_t>& group_n, double margin_layers,
                                 double alpha, double level) {
  const std::int64_t L = act.L, G = act.G;
  SpaceDivergence s;
  std::vector<bool> use(static_cast<size_t>(G));
  for (std::int64_t g = 0; g < G; ++g)
    use[g] = group_n[g] > 0 && argmax_layer(act, g, 0) >= 0 && argmax_layer(grad, g, 0) >= 0;
  s.p_div_roi.assign(static_cast<size_t>(G), kNaN);
  s.p_cons_roi = s.p_div_roi;
  s.peak_p_act.assign(static_cast<size_t>(L * G), kNaN);
  s.peak_p_grad = s.peak_p_act;
  double min_div = 1, max_cons = 0;
  int n = 0;
  for (std::int64_t g = 0; g < G; ++g) {
    if (!use[g])
      continue;
    ++n;
    const auto pa = peak_pvalues(act, act_boot, g), pg = peak_pvalues(grad, grad_boot, g);
    for (std::int64_t l = 0; l < L; ++l) {
      s.peak_p_act[l * G + g] = pa[l];
      s.peak_p_grad[l * G + g] = pg[l];
    }
    const PairTests pt = pair_tests(pa, pg, margin_layers);
    s.p_div_roi[g] = pt.p_div;
    s.p_cons_roi[g] = pt.p_cons;
    // An undefined test (NaN) supports neither claim: 1 for both in the combinations below.
    min_div = std::min(min_div, std::isnan(pt.p_div) ? 1.0 : pt.p_div);
    max_cons = std::max(max_cons, std::isnan(pt.p_cons) ? 1.0 : pt.p_cons);
  }
  Verdict& v = s.v;
  v.p_diverges = n ? std::min(1.0, double(n) * min_div) : 1.0;
  v.p_consistent = n ? max_cons : 1.0;
  v.p_signal_activations = p_any_signal(act, act_null, use);
  v.p_signal_gradients = p_any_signal(grad, grad_null, use);
  v.value = mean_peak_distance(act, grad, 0, use);
  for (std::int64_t b = 0; b < act_boot.R; ++b)
    v.boot.push_back(mean_peak_distance(act_boot, grad_boot, b, use));
  const Interval ci = bc_interval(v.boot, v.value, level);
  v.lo = ci.lo;
  v.hi = ci.hi;
  v.ci_extended = ci.extended;
  decide(v, alpha);
  return s;
}

Latencies latencies(const Profiles& c, std::int64_t r, const std::vector<double>& times) {
  Latencies out;
  for (std::int64_t l = 0; l < c.L; ++l) {
    std::int64_t best = -1;
    double v = -kInf;
    for (std::int64_t g = 0; g < c.G; ++g) {
      const double x = c.at(l, g, r);
      if (times[g] > 0 && std::isfinite(x) && x > v) {
        v = x;
        best = g;
      }
    }
    double onset = kNaN;
    if (best >= 0 && v > 0) // half of a peak r <= 0 is no onset: undefined
      for (std::int64_t g = 0; g <= best; ++g) {
        const double x = c.at(l, g, r);
        if (times[g] > 0 && std::isfinite(x) && x >= v / 2) {
          onset = times[g];
          break;
        }
      }
    out.peak.push_back(best >= 0 ? times[best] : kNaN);
    out.onset.push_back(onset);
  }
  return out;
}

double layer_slope(const std::vector<double>& y) {
  std::vector<double> s;
  for (size_t i = 0; i < y.size(); ++i)
    for (size_t j = i + 1; j < y.size(); ++j)
      if (std::isfinite(y[i]) && std::isfinite(y[j]))
        s.push_back((y[j] - y[i]) / double(j - i));
  if (s.empty())
    return kNaN;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  return n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

TimeDivergence time_divergence(const Profiles& act, const Profiles& grad, const Profiles& act_boot,
                               const Profiles& grad_boot, const Profiles& act_null,
                               const Profiles& grad_null, const std::vector<double>& times,
                               double margin_s_per_layer, double alpha, double level) {
  const std::int64_t L = act.L, B = act_boot.R;
  TimeDivergence t;
  t.act = latencies(act, 0, times);
  t.grad = latencies(grad, 0, times);
  auto gap_of = [&](const Latencies& a, const Latencies& g) {
    return L ? g.peak[L - 1] - a.peak[L - 1] : kNaN;
  };
  Verdict& v = t.v;
  v.value = layer_slope(t.grad.peak);
  t.gap = gap_of(t.act, t.grad);
  std::vector<double> gap_boot, slope_margin, neg_gap;
  std::vector<std::vector<double>> peak_boot[2], onset_boot[2];
  for (int k = 0; k < 2; ++k) {
    peak_boot[k].assign(static_cast<size_t>(L), {});
    onset_boot[k].assign(static_cast<size_t>(L), {});
  }
  for (std::int64_t b = 0; b < B; ++b) {
    const Latencies la = latencies(act_boot, b, times), lg = latencies(grad_boot, b, times);
    v.boot.push_back(layer_slope(lg.peak));
    gap_boot.push_back(gap_of(la, lg));
    for (std::int64_t l = 0; l < L; ++l) {
      peak_boot[0][l].push_back(la.peak[l]);
      peak_boot[1][l].push_back(lg.peak[l]);
      onset_boot[0][l].push_back(la.onset[l]);
      onset_boot[1][l].push_back(lg.onset[l]);
    }
  }
  // Claims as "x > 0" on the replicates (NaN stays NaN and so counts against every claim).
  std::vector<double> slope_pos = v.boot, slope_neg, gap_pos = gap_boot;
  for (double x : v.boot)
    slope_neg.push_back(-margin_s_per_layer - x);
  for (double x : gap_boot)
    neg_gap.push_back(-x);
  v.p_diverges =
      std::min(1.0, 2 * std::min(p_claim_positive(slope_pos), p_claim_positive(neg_gap)));
  v.p_consistent = std::max(p_claim_positive(slope_neg), p_claim_positive(gap_pos));
  std::vector<bool> use(times.size());
  for (size_t g = 0; g < times.size(); ++g)
    use[g] = times[g] > 0;
  v.p_signal_activations = p_any_signal(act, act_null, use);
  v.p_signal_gradients = p_any_signal(grad, grad_null, use);
  Interval ci = bc_interval(v.boot, v.value, level);
  v.lo = ci.lo;
  v.hi = ci.hi;
  v.ci_extended = ci.extended;
  ci = bc_interval(gap_boot, t.gap, level);
  t.gap_lo = ci.lo;
  t.gap_hi = ci.hi;
  const Latencies* obs[2] = {&t.act, &t.grad};
  for (int k = 0; k < 2; ++k)
    for (std::int64_t l = 0; l < L; ++l) {
      const Interval p = bc_interval(peak_boot[k][l], obs[k]->peak[l], level);
      const Interval o = bc_interval(onset_boot[k][l], obs[k]->onset[l], level);
      t.peak_ci[k].insert(t.peak_ci[k].end(), {p.lo, p.hi});
      t.onset_ci[k].insert(t.onset_ci[k].end(), {o.lo, o.hi});
    }
  decide(v, alpha);
  return t;
}

} // namespace gradmap::stats
