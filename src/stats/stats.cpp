// gradmap stats: see stats.hpp and docs/statistics.md for the definitions.
// Every rank reads the scores and computes the same numbers (the per-target arrays are at most
// kinds x layers x targets doubles, the replicates layers x groups x B): the heavy, per-target
// replicate work was done, distributed, inside encode. Outputs are written collectively.
#include "gradmap/stats/stats.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "gradmap/core/error.hpp"
#include "gradmap/core/json.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/text.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/encoding/clusters.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/stats/divergence.hpp"

namespace gradmap::stats {

namespace {
std::string num(double v) {
  return format_number(v, 10, "null");
}
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();
} // namespace

std::vector<double> fdr(const std::vector<double>& p, bool by) {
  std::vector<size_t> idx;
  for (size_t i = 0; i < p.size(); ++i)
    if (!std::isnan(p[i]))
      idx.push_back(i);
  std::vector<double> q(p.size(), kNaN);
  const size_t n = idx.size();
  if (n == 0)
    return q;
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return p[a] < p[b]; });
  double cm = 1.0;
  if (by) {
    cm = 0;
    for (size_t i = 1; i <= n; ++i)
      cm += 1.0 / double(i);
  }
  double running = 1.0;
  for (size_t k = n; k-- > 0;) { // step-up: q_(k) = min_{j >= k} cm n p_(j) / j
    running = std::min(running, cm * double(n) * p[idx[k]] / double(k + 1));
    q[idx[k]] = std::min(1.0, running);
  }
  return q;
}

std::vector<double> average_ranks(const std::vector<double>& x) {
  std::vector<size_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<double> r(x.size());
  for (size_t i = 0; i < idx.size();) {
    size_t j = i;
    while (j + 1 < idx.size() && x[idx[j + 1]] == x[idx[i]])
      ++j;
    const double avg = 0.5 * double(i + j) + 1.0;
    for (size_t k = i; k <= j; ++k)
      r[idx[k]] = avg;
    i = j + 1;
  }
  return r;
}

double spearman(const std::vector<double>& x, const std::vector<double>& y) {
  if (x.size() != y.size() || x.size() < 2)
    return kNaN;
  const auto rx = average_ranks(x), ry = average_ranks(y);
  const double n = double(x.size()), mean = (n + 1) / 2;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    sxy += (rx[i] - mean) * (ry[i] - mean);
    sxx += (rx[i] - mean) * (rx[i] - mean);
    syy += (ry[i] - mean) * (ry[i] - mean);
  }
  return sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : kNaN;
}

double quantile(std::vector<double> x, double q) {
  x.erase(std::remove_if(x.begin(), x.end(), [](double v) { return !std::isfinite(v); }), x.end());
  if (x.empty())
    return kNaN;
  std::sort(x.begin(), x.end());
  const double pos = q * double(x.size() - 1);
  const size_t lo = size_t(std::floor(pos)), hi = std::min(x.size() - 1, lo + 1);
  return x[lo] + (pos - double(lo)) * (x[hi] - x[lo]);
}

void validate(const StatsOptions& o) {
  if (o.scores.empty())
    throw UsageError("--scores: at least one scores.h5 is required");
  if (o.out.empty())
    throw UsageError("--out: an output directory is required");
  if (!(o.q > 0 && o.q < 1))
    throw UsageError("--q: must be in (0, 1)");
  if (!(o.alpha > 0 && o.alpha < 1))
    throw UsageError("--alpha: must be in (0, 1)");
  if (!(o.ci > 0 && o.ci < 1))
    throw UsageError("--ci: must be in (0, 1)");
  if (!(o.space_margin >= 0 && o.space_margin < 1))
    throw UsageError("--space-margin: must be in [0, 1) (a share of the network's depth)");
  if (!(o.time_margin >= 0) || !std::isfinite(o.time_margin))
    throw UsageError("--time-margin: must be >= 0 (seconds per layer)");
}

namespace {

// A statistic with its bootstrap replicates and its p-value.
struct Stat {
  double value = kNaN, lo = kNaN, hi = kNaN, p = kNaN;
  std::vector<double> boot;
};

void finish_ci(Stat& s, double ci) {
  const Interval i = bc_interval(s.boot, s.value, ci);
  s.lo = i.lo;
  s.hi = i.hi;
}

// Two-sided permutation p-value: (1 + #{|null| >= |value|}) / (B + 1). An undefined null
// replicate (constant peak layers) takes the no-effect value 0 (divergence.hpp's rule): the test
// is then an exact permutation test of the fixed statistic |rho| (0 where undefined).
double perm_p(const std::vector<double>& null, double value) {
  if (null.empty() || std::isnan(value))
    return kNaN;
  double c = 1;
  for (double v : null)
    c += std::abs(std::isnan(v) ? 0.0 : v) >= std::abs(value) - 1e-12 ? 1 : 0;
  return c / double(null.size() + 1);
}

// Peak (argmax over layers, the first on ties) of a [L, G, R] replicate array at (g, b), or of
// [L, G] when R = 1. Returns -1 if all are NaN.
int peak_layer(const std::vector<double>& a, std::int64_t L, std::int64_t G, std::int64_t R,
               std::int64_t g, std::int64_t b) {
  int best = -1;
  double v = -std::numeric_limits<double>::infinity();
  for (std::int64_t l = 0; l < L; ++l) {
    const double x = a[(l * G + g) * R + b];
    if (!std::isnan(x) && x > v) {
      v = x;
      best = int(l);
    }
  }
  return best;
}

struct KindData {
  std::string name;
  std::vector<float> r;                               // [L, T]
  std::vector<std::int32_t> exceed;                   // [L, T]
  std::vector<float> null_max;                        // [L, B]
  std::vector<double> null_group, boot_group;         // [L, G, B], [L, G, Bb]
  std::vector<double> group_r;                        // [L, G]
  std::vector<double> p, q_bh, q_by, p_fwer;          // [L, T], within the (kind, layer) family
  std::vector<double> q_bh_all, q_by_all, p_fwer_all; // [L, T], across kinds and layers
};

// One scores.h5 as stats uses it: its shape, the group values and the kinds it scores.
struct Scores {
  std::string path, modality;
  std::string mod; // "/" + modality: the group of its outputs in stats.h5
  bool meg = false;
  std::vector<std::string> layers;
  std::int64_t L = 0, G = 0, T = 0, B = 0, Bb = 0; // layers, groups, targets, replicates
  std::vector<double> value;                       // [G]: ROI level (fMRI) or time in s (MEG)
  std::vector<std::int64_t> group_n;               // [L, G]: scored targets per layer and group
  std::vector<std::int64_t> n_group;               // [G]: the minimum over layers
  std::vector<KindData> kinds; // in the order activations, gradients, unique_gradients
  const KindData* kind(const std::string& name) const {
    for (const auto& kd : kinds)
      if (kd.name == name)
        return &kd;
    return nullptr;
  }
};

// ---- Step 1: read a scores file ----------------------------------------------------------------

void require(const io::File& sf, const std::string& path, const std::string& name) {
  if (!sf.exists(name))
    throw UsageError(path + ": " + name + " is missing (was it written by gradmap encode " +
                     "with --permutations and --bootstraps > 0?)");
}

KindData read_kind(const io::File& sf, const std::string& path, const std::string& name) {
  KindData kd;
  kd.name = name;
  const std::string base = "/" + name + "/";
  for (const char* d : {"exceed", "null_max", "null_group", "boot_group", "group_r"})
    require(sf, path, base + d);
  // the unique kind's per-target statistic is its bootstrap t (encode --joint)
  kd.r = sf.dataset(base + (kd.name == "unique_gradients" ? "t" : "r")).read_all<float>();
  kd.exceed = sf.dataset(base + "exceed").read_all<std::int32_t>();
  kd.null_max = sf.dataset(base + "null_max").read_all<float>();
  kd.null_group = sf.dataset(base + "null_group").read_all<double>();
  kd.boot_group = sf.dataset(base + "boot_group").read_all<double>();
  kd.group_r = sf.dataset(base + "group_r").read_all<double>();
  return kd;
}

// Collective on sf's communicator. seen[meg] records the modalities read so far (one file each).
Scores read_scores(const io::File& sf, const std::string& path, bool (&seen)[2]) {
  Scores s;
  s.path = path;
  require(sf, path, "/groups/value");
  s.modality = sf.attr_string("/", "modality");
  s.meg = s.modality == "meg";
  if (seen[s.meg])
    throw UsageError("--scores: two " + s.modality + " scores files; give one per modality");
  seen[s.meg] = true;
  s.mod = "/" + s.modality;
  s.layers = sf.attr_strings("/", "layers");
  s.L = std::int64_t(s.layers.size());
  s.B = sf.attr_int("/", "permutations");
  s.Bb = sf.attr_int("/", "bootstraps");
  if (s.B < 1 || s.Bb < 1)
    throw UsageError(path + ": encode ran with " + std::to_string(s.B) + " permutations and " +
                     std::to_string(s.Bb) + " bootstraps; stats needs both");
  s.value = sf.dataset("/groups/value").read_all<double>();
  s.G = std::int64_t(s.value.size());
  for (const char* name : {"activations", "gradients", "unique_gradients"})
    if (sf.exists(std::string("/") + name + "/r") || sf.exists(std::string("/") + name + "/t"))
      s.kinds.push_back(read_kind(sf, path, name));
  if (s.kinds.empty())
    throw UsageError(path + ": no /activations or /gradients scores");
  s.T = std::int64_t(s.kinds[0].r.size()) / std::max<std::int64_t>(s.L, 1);
  s.group_n = sf.dataset("/" + s.kinds[0].name + "/group_n").read_all<std::int64_t>();
  // [L, G] -> [G]: a group takes part only if every layer has scored targets in it.
  s.n_group.assign(static_cast<size_t>(s.G), 0);
  for (std::int64_t g = 0; g < s.G && std::int64_t(s.group_n.size()) == s.L * s.G; ++g) {
    s.n_group[g] = s.group_n[g];
    for (std::int64_t l = 1; l < s.L; ++l)
      s.n_group[g] = std::min(s.n_group[g], s.group_n[l * s.G + g]);
  }
  return s;
}

// ---- Step 2: per-target tests ------------------------------------------------------------------

// Per-target p-values, FDR within each (kind, layer) and across all, max-stat FWER. The
// "all" families: the raw kinds (activations and gradients) together, and the gradients'
// unique variance (encode --joint) on its own, over its layers.
int family(const KindData& kd) {
  return kd.name == "unique_gradients" ? 1 : 0;
}

// Layer l of one kind: p = (1 + exceed) / (B + 1), the FWER p-values against the sorted
// permutation maxima of the layer and of the whole family (family_max, sorted), and BH / BY
// within the layer.
void layer_tests(KindData& kd, std::int64_t l, std::int64_t T, std::int64_t B,
                 const std::vector<float>& family_max) {
  std::vector<float> mx(kd.null_max.begin() + l * B, kd.null_max.begin() + (l + 1) * B);
  std::sort(mx.begin(), mx.end());
  std::vector<double> pl(static_cast<size_t>(T), kNaN);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int32_t e = kd.exceed[l * T + t];
    const float r = kd.r[l * T + t];
    if (e < 0 || std::isnan(r))
      continue;
    pl[t] = (1.0 + e) / double(B + 1);
    // #{b: max_b >= r} by binary search in the sorted maxima.
    auto ge = [&](const std::vector<float>& s) {
      return double(s.end() - std::lower_bound(s.begin(), s.end(), r));
    };
    kd.p_fwer[l * T + t] = (1.0 + ge(mx)) / double(B + 1);
    kd.p_fwer_all[l * T + t] = (1.0 + ge(family_max)) / double(B + 1);
  }
  const auto qb = fdr(pl, false), qy = fdr(pl, true);
  std::copy(pl.begin(), pl.end(), kd.p.begin() + l * T);
  std::copy(qb.begin(), qb.end(), kd.q_bh.begin() + l * T);
  std::copy(qy.begin(), qy.end(), kd.q_by.begin() + l * T);
}

void per_target_tests(std::vector<KindData>& kinds, std::int64_t L, std::int64_t T,
                      std::int64_t B) {
  std::vector<float> global_max[2];
  for (auto& gm : global_max)
    gm.assign(static_cast<size_t>(B), -INFINITY);
  for (auto& kd : kinds)
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t b = 0; b < B; ++b)
        global_max[family(kd)][b] = std::max(global_max[family(kd)][b], kd.null_max[l * B + b]);
  for (auto& gm : global_max)
    std::sort(gm.begin(), gm.end());
  std::vector<double> all_p[2];
  for (auto& kd : kinds) {
    kd.p.assign(static_cast<size_t>(L * T), kNaN);
    kd.p_fwer = kd.p_fwer_all = kd.q_bh = kd.q_by = kd.p;
    for (std::int64_t l = 0; l < L; ++l)
      layer_tests(kd, l, T, B, global_max[family(kd)]);
    all_p[family(kd)].insert(all_p[family(kd)].end(), kd.p.begin(), kd.p.end());
  }
  for (int fam = 0; fam < 2; ++fam) {
    const auto qa_bh = fdr(all_p[fam], false), qa_by = fdr(all_p[fam], true);
    std::int64_t k = 0; // position of the kind within its family
    for (auto& kd : kinds) {
      if (family(kd) != fam)
        continue;
      kd.q_bh_all.assign(qa_bh.begin() + k * L * T, qa_bh.begin() + (k + 1) * L * T);
      kd.q_by_all.assign(qa_by.begin() + k * L * T, qa_by.begin() + (k + 1) * L * T);
      ++k;
    }
  }
}

// Targets significant per layer: BH within the (kind, layer) at q, max-stat FWER at alpha.
struct SignificantCounts {
  std::vector<std::int64_t> bh, fwer; // [L]
};

SignificantCounts significant_counts(const KindData& kd, std::int64_t L, std::int64_t T, double q,
                                     double alpha) {
  SignificantCounts c;
  c.bh.assign(static_cast<size_t>(L), 0);
  c.fwer = c.bh;
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t t = 0; t < T; ++t) {
      c.bh[l] += kd.q_bh[l * T + t] < q ? 1 : 0;
      c.fwer[l] += kd.p_fwer[l * T + t] < alpha ? 1 : 0;
    }
  return c;
}

void write_target_tests(const io::File& f, const Scores& s, const KindData& kd,
                        const SignificantCounts& c) {
  const std::string base = s.mod + "/" + kd.name + "/";
  f.write_small(base + "r", kd.r, {s.L, s.T});
  for (auto [name, v] : {std::pair<const char*, const std::vector<double>*>{"p", &kd.p},
                         {"q_bh", &kd.q_bh},
                         {"q_by", &kd.q_by},
                         {"p_fwer", &kd.p_fwer},
                         {"q_bh_all", &kd.q_bh_all},
                         {"q_by_all", &kd.q_by_all},
                         {"p_fwer_all", &kd.p_fwer_all}})
    f.write_small(base + name, *v, {s.L, s.T});
  f.write_small(base + "n_significant_bh", c.bh, {s.L});
  f.write_small(base + "n_significant_fwer", c.fwer, {s.L});
  f.write_small(base + "group_r", kd.group_r, {s.L, s.G});
}

// ---- Step 3: hierarchy -------------------------------------------------------------------------

// Hierarchy statistic of one kind: rho(level, peak) over groups (fMRI), or rho(layer, peak
// latency) over layers (MEG), for the observed group means, each permutation and each bootstrap.
struct Hierarchy {
  Stat rho;
  std::vector<double> null; // per permutation
  std::vector<double> peak; // fMRI: best layer per ROI; MEG: peak latency per layer
};

// One replicate: a [L, G, R] array at column b -> the statistic (and the peaks, if asked).
double hierarchy_replicate(const Scores& s, const std::vector<double>& a, std::int64_t R,
                           std::int64_t b, std::vector<double>* peaks) {
  std::vector<double> x, y;
  if (s.meg) { // peak latencies, post-stimulus window only
    y = latencies(Profiles{&a, s.L, s.G, R}, b, s.value).peak;
    for (std::int64_t l = 0; l < s.L; ++l)
      x.push_back(double(l));
    if (peaks)
      *peaks = y;
  } else {
    if (peaks)
      peaks->assign(static_cast<size_t>(s.G), kNaN);
    for (std::int64_t g = 0; g < s.G; ++g) {
      if (s.n_group[g] == 0)
        continue;
      const int pl = peak_layer(a, s.L, s.G, R, g, b);
      if (pl < 0)
        continue;
      x.push_back(s.value[g]);
      y.push_back(double(pl));
      if (peaks)
        (*peaks)[g] = pl;
    }
  }
  for (double v : y)
    if (std::isnan(v))
      return kNaN;
  return spearman(x, y);
}

Hierarchy hierarchy(const Scores& s, const KindData& kd, double ci) {
  Hierarchy h;
  h.rho.value = hierarchy_replicate(s, kd.group_r, 1, 0, &h.peak);
  for (std::int64_t b = 0; b < s.B; ++b)
    h.null.push_back(hierarchy_replicate(s, kd.null_group, s.B, b, nullptr));
  for (std::int64_t b = 0; b < s.Bb; ++b)
    h.rho.boot.push_back(hierarchy_replicate(s, kd.boot_group, s.Bb, b, nullptr));
  h.rho.p = perm_p(h.null, h.rho.value);
  finish_ci(h.rho, ci);
  return h;
}

const char* rho_name(const Scores& s) {
  return s.meg ? "rho_time" : "rho_space";
}
const char* peak_name(const Scores& s) {
  return s.meg ? "peak_latency" : "roi_best_layer";
}

void write_hierarchy(const io::File& f, const Scores& s, const KindData& kd, const Hierarchy& h) {
  const std::string base = s.mod + "/" + kd.name + "/", rho = rho_name(s);
  f.write_small(base + rho, std::vector<double>{h.rho.value, h.rho.lo, h.rho.hi, h.rho.p}, {4});
  f.write_small(base + rho + "_boot", h.rho.boot, {s.Bb});
  f.write_small(base + rho + "_null", h.null, {s.B});
  f.write_small(base + peak_name(s), h.peak, {std::int64_t(h.peak.size())});
}

// ---- Step 4: MEG clusters ----------------------------------------------------------------------

// MEG cluster-based permutation tests (docs/statistics.md, "Clusters"): observed clusters of
// r > threshold on the sensor x time grid, each with p = (1 + #{b: max cluster_b >= size}) /
// (B + 1) from the permutation maxima encode kept.
struct Cluster {
  std::int64_t layer = 0, size = 0;
  double p = kNaN, t_first = kNaN, t_last = kNaN;
};

struct KindClusters {
  const KindData* kind = nullptr;
  std::vector<std::int32_t> labels; // [L, T], -1 outside the clusters
  std::vector<double> table;        // rows: layer, size, p, t_first, t_last
  std::vector<double> onset;        // [L]: the earliest positive t_first of a significant cluster
  std::vector<Cluster> significant; // p < alpha
};

struct ClusterTests {
  bool present = false; // MEG with the permutation maxima of cluster sizes in scores.h5
  double threshold = kNaN;
  std::string adjacency; // scores.h5's description of the sensor adjacency
  std::vector<KindClusters> kinds;
};

// The clusters of layer l of one kind, appended to kc.
void layer_clusters(const Scores& s, const encoding::ClusterGraph& cg, double thr,
                    const std::vector<std::int64_t>& null, std::int64_t l, double alpha,
                    KindClusters& kc) {
  std::vector<std::int32_t> labels;
  const float* r = &kc.kind->r[static_cast<size_t>(l * s.T)];
  const auto sizes = encoding::find_clusters(
      cg, [r, thr](std::int64_t v) { return double(r[v]) > thr; }, &labels);
  std::vector<double> first(sizes.size(), kInf), last(sizes.size(), -kInf);
  for (std::int64_t v = 0; v < s.T; ++v)
    if (labels[v] >= 0) {
      first[labels[v]] = std::min(first[labels[v]], s.value[v % s.G]);
      last[labels[v]] = std::max(last[labels[v]], s.value[v % s.G]);
    }
  for (size_t c = 0; c < sizes.size(); ++c) {
    double ge = 1;
    for (std::int64_t b = 0; b < s.B; ++b)
      ge += null[l * s.B + b] >= sizes[c] ? 1 : 0;
    const double p = ge / double(s.B + 1);
    kc.table.insert(kc.table.end(), {double(l), double(sizes[c]), p, first[c], last[c]});
    if (p < alpha) {
      if (first[c] > 0 && !(kc.onset[l] <= first[c]))
        kc.onset[l] = first[c];
      kc.significant.push_back(Cluster{l, sizes[c], p, first[c], last[c]});
    }
  }
  kc.labels.insert(kc.labels.end(), labels.begin(), labels.end());
}

// Collective (reads sf). Empty kinds when scores.h5 holds no cluster maxima.
ClusterTests cluster_tests(const io::File& sf, const Scores& s, double alpha) {
  ClusterTests ct;
  if (!s.meg || !sf.exists("/" + s.kinds[0].name + "/null_cluster"))
    return ct;
  const encoding::ClusterGraph cg = encoding::make_cluster_graph(
      s.T / std::max<std::int64_t>(s.G, 1), s.G,
      sf.exists("/cluster_adjacency") ? sf.dataset("/cluster_adjacency").read_all<std::int32_t>()
                                      : std::vector<std::int32_t>{});
  ct.present = true;
  ct.threshold = sf.attr_doubles("/", "cluster_threshold").at(0);
  ct.adjacency = sf.attr_string("/", "cluster_adjacency");
  for (const auto& kd : s.kinds) {
    if (!sf.exists("/" + kd.name + "/null_cluster"))
      continue; // the unique kind (its statistic is a t, thresholded nowhere)
    const auto null = sf.dataset("/" + kd.name + "/null_cluster").read_all<std::int64_t>();
    KindClusters kc;
    kc.kind = &kd;
    kc.onset.assign(static_cast<size_t>(s.L), kNaN);
    for (std::int64_t l = 0; l < s.L; ++l)
      layer_clusters(s, cg, ct.threshold, null, l, alpha, kc);
    ct.kinds.push_back(std::move(kc));
  }
  return ct;
}

void write_clusters(const io::File& f, const Scores& s, const ClusterTests& ct) {
  f.set_attr(s.mod, "cluster_threshold", std::vector<double>{ct.threshold});
  for (const auto& kc : ct.kinds) {
    const std::string base = s.mod + "/" + kc.kind->name + "/";
    f.write_small(base + "cluster_labels", kc.labels, {s.L, s.T});
    f.write_small(base + "clusters", kc.table, {std::int64_t(kc.table.size() / 5), 5});
    f.write_small(base + "cluster_onset", kc.onset, {s.L});
  }
}

void json_clusters(JsonWriter& js, const ClusterTests& ct) {
  js.member("cluster_threshold_r", ct.threshold).member("cluster_adjacency", ct.adjacency);
  for (const auto& kc : ct.kinds) {
    js.key("clusters_" + kc.kind->name).begin_array();
    for (const Cluster& c : kc.significant)
      js.begin_object()
          .member("layer", c.layer)
          .member("size", c.size)
          .member("p", c.p)
          .member("t_first", c.t_first)
          .member("t_last", c.t_last)
          .end_object();
    js.end_array().member("cluster_onset_" + kc.kind->name, kc.onset);
  }
}

// ---- Step 5: divergence ------------------------------------------------------------------------

// Divergence (docs/statistics.md): both kinds needed. The predictions of a biological
// backprop as tests with a verdict: space (fMRI) by peak-layer confidence sets per ROI, time
// (MEG) by the slope of the gradients' peak latencies on layer and the top-layer gap.
// The same tests on the gradients' unique variance beyond the activations (encode --joint;
// suffix "_unique", docs/statistics.md "Unique variance").
struct Divergence {
  const KindData* kind[2] = {nullptr, nullptr}; // activations, gradients (or their unique variance)
  std::string sfx;                              // "" or "_unique"
  std::string name;                             // D_space / D_time + sfx
  double margin = kNaN;                         // layers (fMRI) or s per layer (MEG)
  Verdict v;
  TimeDivergence time;   // MEG
  SpaceDivergence space; // fMRI
  bool unique() const { return !sfx.empty(); }
};

// The verdict's reason when it concerns the unique variance, not raw scores.
std::string unique_reason(const Verdict& v, double alpha) {
  return v.verdict == "consistent"
             ? "the gradients' unique variance beyond the activations is organised as a "
               "biological backpropagation predicts, within the stated margin"
         : v.verdict == "diverges"
             ? "the gradients' unique variance beyond the activations is organised "
               "differently from what a biological backpropagation predicts"
         : !(v.p_signal_gradients < alpha)
             ? "the gradients add no detectable unique variance beyond the activations "
               "here, so neither claim can be tested"
             : v.reason;
}

Divergence divergence(const Scores& s, const KindData& ka, const KindData& kg,
                      const std::string& sfx, const StatsOptions& o) {
  Divergence d;
  d.kind[0] = &ka;
  d.kind[1] = &kg;
  d.sfx = sfx;
  d.name = std::string(s.meg ? "D_time" : "D_space") + sfx;
  const std::int64_t L = s.L, G = s.G;
  const Profiles obs[2] = {{&ka.group_r, L, G, 1}, {&kg.group_r, L, G, 1}};
  const Profiles boot[2] = {{&ka.boot_group, L, G, s.Bb}, {&kg.boot_group, L, G, s.Bb}};
  const Profiles null[2] = {{&ka.null_group, L, G, s.B}, {&kg.null_group, L, G, s.B}};
  if (s.meg) {
    d.margin = o.time_margin;
    d.time = time_divergence(obs[0], obs[1], boot[0], boot[1], null[0], null[1], s.value,
                             o.time_margin, o.alpha, o.ci);
    d.v = d.time.v;
  } else {
    d.margin = o.space_margin * double(L - 1);
    d.space = space_divergence(obs[0], obs[1], boot[0], boot[1], null[0], null[1], s.n_group,
                               d.margin, o.alpha, o.ci);
    d.v = d.space.v;
  }
  if (d.unique()) // the verdict concerns the unique variance, not raw scores
    d.v.reason = unique_reason(d.v, o.alpha);
  return d;
}

void write_divergence(const io::File& f, const Scores& s, const Divergence& d) {
  const std::string& mod = s.mod;
  if (s.meg) {
    const TimeDivergence& td = d.time;
    f.write_small(mod + "/top_layer_latency_gap" + d.sfx,
                  std::vector<double>{td.gap, td.gap_lo, td.gap_hi}, {3});
    for (int k = d.unique() ? 1 : 0; k < 2; ++k) { // the activations' entries once
      const std::string base = mod + "/" + d.kind[k]->name + "/";
      f.write_small(base + "onset_latency", (k ? td.grad : td.act).onset, {s.L});
      f.write_small(base + "peak_latency_ci", td.peak_ci[k], {s.L, 2});
      f.write_small(base + "onset_latency_ci", td.onset_ci[k], {s.L, 2});
    }
  } else {
    const SpaceDivergence& sd = d.space;
    f.write_small(mod + "/D_space" + d.sfx + "_p_diverges_roi", sd.p_div_roi, {s.G});
    f.write_small(mod + "/D_space" + d.sfx + "_p_consistent_roi", sd.p_cons_roi, {s.G});
    if (!d.unique())
      f.write_small(mod + "/" + d.kind[0]->name + "/peak_layer_p", sd.peak_p_act, {s.L, s.G});
    f.write_small(mod + "/" + d.kind[1]->name + "/peak_layer_p", sd.peak_p_grad, {s.L, s.G});
  }
  const Verdict& v = d.v;
  f.write_small(mod + "/" + d.name, std::vector<double>{v.value, v.lo, v.hi, v.p_diverges}, {4});
  f.write_small(mod + "/" + d.name + "_boot", v.boot, {s.Bb});
  f.write_small(mod + "/" + d.name + "_tests",
                std::vector<double>{v.p_diverges, v.p_consistent, v.p_signal_activations,
                                    v.p_signal_gradients},
                {4});
  f.set_attr(mod + "/" + d.name, "verdict", v.verdict);
}

// [[lo, hi], ...] from a flat [n, 2] vector.
void json_pairs(JsonWriter& js, const std::vector<double>& v) {
  js.begin_array();
  for (size_t i = 0; i + 1 < v.size(); i += 2)
    js.begin_array().value(v[i]).value(v[i + 1]).end_array();
  js.end_array();
}

void json_divergence(JsonWriter& js, const Scores& s, const Divergence& d) {
  const Verdict& v = d.v;
  js.key(d.name).begin_object().member("value", v.value);
  js.key("ci").begin_array().value(v.lo).value(v.hi).end_array();
  js.member("p", v.p_diverges)
      .member("verdict", v.verdict)
      .member("p_consistent", v.p_consistent)
      .member("p_signal_activations", v.p_signal_activations)
      .member("p_signal_gradients", v.p_signal_gradients)
      .member("ci_extended", v.ci_extended)
      .member("margin", d.margin)
      .member("reason", v.reason)
      .end_object();
  if (s.meg) {
    const TimeDivergence& td = d.time;
    for (int k = d.unique() ? 1 : 0; k < 2; ++k) { // the activations' entries once
      const std::string& name = d.kind[k]->name;
      json_pairs(js.key("peak_latency_ci_" + name), td.peak_ci[k]);
      js.member("onset_latency_" + name, (k ? td.grad : td.act).onset);
      json_pairs(js.key("onset_latency_ci_" + name), td.onset_ci[k]);
    }
    js.key("top_layer_latency_gap" + d.sfx).begin_object().member("value", td.gap);
    js.key("ci").begin_array().value(td.gap_lo).value(td.gap_hi).end_array().end_object();
  } else {
    js.member("D_space" + d.sfx + "_p_diverges_roi", d.space.p_div_roi)
        .member("D_space" + d.sfx + "_p_consistent_roi", d.space.p_cons_roi);
    if (!d.unique())
      js.member("D_space_margin_layers", d.margin);
  }
}

// ---- Step 6: voxelwise peak layers (fMRI) ------------------------------------------------------

// Voxelwise agreement of the peak-layer maps over voxels significant in both kinds: per kind and
// voxel, the peak layer (-1 where no layer is significant at BH q across kinds and layers) and
// the centre of mass of the positive r over layers.
struct PeakMaps {
  std::vector<std::int32_t> peak[2]; // [T]
  std::vector<double> com[2];        // [T]
  std::int64_t both = 0;             // voxels significant in both kinds
  double agree = kNaN;               // the share of them with the same peak layer
};

PeakMaps peak_maps(const Scores& s, const KindData* const (&kp)[2], double q) {
  const std::int64_t L = s.L, T = s.T;
  PeakMaps m;
  for (int k = 0; k < 2; ++k) {
    m.peak[k].assign(static_cast<size_t>(T), -1);
    m.com[k].assign(static_cast<size_t>(T), kNaN);
    for (std::int64_t t = 0; t < T; ++t) {
      bool sig = false;
      double best = -INFINITY, wsum = 0, lsum = 0;
      for (std::int64_t l = 0; l < L; ++l) {
        const double r = kp[k]->r[l * T + t];
        sig = sig || kp[k]->q_bh_all[l * T + t] < q;
        if (!std::isnan(r) && r > best) {
          best = r;
          m.peak[k][t] = std::int32_t(l);
        }
        if (r > 0) {
          wsum += r;
          lsum += r * double(l);
        }
      }
      if (!sig) {
        m.peak[k][t] = -1;
        continue;
      }
      m.com[k][t] = wsum > 0 ? lsum / wsum : kNaN;
    }
  }
  std::int64_t same = 0;
  for (std::int64_t t = 0; t < T; ++t)
    if (m.peak[0][t] >= 0 && m.peak[1][t] >= 0) {
      ++m.both;
      same += m.peak[0][t] == m.peak[1][t] ? 1 : 0;
    }
  m.agree = m.both > 0 ? double(same) / double(m.both) : kNaN;
  return m;
}

void write_peak_maps(const io::File& f, const Scores& s, const KindData* const (&kp)[2],
                     const PeakMaps& m) {
  for (int k = 0; k < 2; ++k) {
    f.write_small(s.mod + "/" + kp[k]->name + "/peak_layer", m.peak[k], {s.T});
    f.write_small(s.mod + "/" + kp[k]->name + "/peak_layer_com", m.com[k], {s.T});
  }
  f.write_small(s.mod + "/peak_agreement", std::vector<double>{m.agree, double(m.both)}, {2});
}

// Voxel-level space tests (docs/statistics.md, "Voxel level"): over the voxels significant for
// both kinds (tested[t]: a peak layer in peak_map), the pair tests of the voxel's peak-layer
// p-values (encode's voxel_peak_p), BH across the tested voxels for each claim, and a verdict per
// voxel (0 not tested, 1 undetermined, 2 diverges, 3 consistent).
struct VoxelSpace {
  double q = kNaN, margin = kNaN;
  std::vector<double> p_div, p_cons, q_div, q_cons; // [T]
  std::vector<std::int32_t> verdict;                // [T]
  std::vector<std::string> names;                   // ROI names
  using Counts = std::array<std::int64_t, 4>;       // tested, then per verdict code 1..3
  std::vector<Counts> per_roi;
  Counts total{0, 0, 0, 0};
};

// Verdicts from the q-values, counted over all voxels and per ROI (roi[t]: the voxel's ROI).
void voxel_verdicts(VoxelSpace& vs, const std::vector<std::int32_t>& roi, std::int64_t T) {
  vs.verdict.assign(static_cast<size_t>(T), 0);
  vs.per_roi.assign(vs.names.size(), {0, 0, 0, 0});
  for (std::int64_t t = 0; t < T; ++t) {
    if (!std::isfinite(vs.p_div[t]))
      continue;
    vs.verdict[t] = vs.q_cons[t] < vs.q ? 3 : vs.q_div[t] < vs.q ? 2 : 1;
    ++vs.total[vs.verdict[t]];
    ++vs.total[0];
    if (std::int64_t(roi.size()) == T && roi[t] >= 0 && size_t(roi[t]) < vs.names.size()) {
      ++vs.per_roi[roi[t]][vs.verdict[t]];
      ++vs.per_roi[roi[t]][0];
    }
  }
}

// Collective (reads sf).
VoxelSpace voxel_space_tests(const io::File& sf, const Scores& s,
                             const std::vector<std::int32_t> (&peak_map)[2], double margin,
                             double q) {
  const std::int64_t L = s.L, T = s.T;
  const auto pa = sf.dataset("/activations/voxel_peak_p").read_all<float>();
  const auto pg = sf.dataset("/gradients/voxel_peak_p").read_all<float>();
  if (std::int64_t(pa.size()) != L * T || std::int64_t(pg.size()) != L * T)
    throw UsageError(sf.path() + ": voxel_peak_p must be [layers, voxels]");
  VoxelSpace vs;
  vs.q = q;
  vs.margin = margin;
  vs.p_div.assign(static_cast<size_t>(T), kNaN);
  vs.p_cons = vs.p_div;
  std::vector<double> a(static_cast<size_t>(L)), g(a);
  for (std::int64_t t = 0; t < T; ++t) {
    if (peak_map[0][t] < 0 || peak_map[1][t] < 0)
      continue;
    for (std::int64_t l = 0; l < L; ++l) {
      a[l] = pa[l * T + t];
      g[l] = pg[l * T + t];
    }
    const PairTests pt = pair_tests(a, g, margin);
    vs.p_div[t] = pt.p_div;
    vs.p_cons[t] = pt.p_cons;
  }
  vs.q_div = fdr(vs.p_div, false);
  vs.q_cons = fdr(vs.p_cons, false);
  std::vector<std::int32_t> roi;
  if (sf.exists("/groups/target"))
    roi = sf.dataset("/groups/target").read_all<std::int32_t>();
  if (sf.exists("/groups/names"))
    vs.names = sf.dataset("/groups/names").read_strings();
  voxel_verdicts(vs, roi, T);
  return vs;
}

void write_voxel_space(const io::File& f, const Scores& s, const VoxelSpace& vs) {
  const std::string base = s.mod + "/D_space_voxel/";
  f.write_small(base + "p_diverges", vs.p_div, {s.T});
  f.write_small(base + "p_consistent", vs.p_cons, {s.T});
  f.write_small(base + "q_diverges", vs.q_div, {s.T});
  f.write_small(base + "q_consistent", vs.q_cons, {s.T});
  f.write_small(base + "verdict", vs.verdict, {s.T});
  f.set_attr(s.mod + "/D_space_voxel", "verdict_codes",
             std::string("0 not tested (no signal in a kind), 1 undetermined, 2 diverges, "
                         "3 consistent"));
}

void json_voxel_space(JsonWriter& js, const VoxelSpace& vs) {
  auto counts = [&](const VoxelSpace::Counts& c) {
    js.begin_object()
        .member("tested", c[0])
        .member("diverges", c[2])
        .member("consistent", c[3])
        .member("undetermined", c[1])
        .end_object();
  };
  js.key("D_space_voxels").begin_object().member("q", vs.q).member("margin", vs.margin);
  js.key("all");
  counts(vs.total);
  js.key("roi").begin_object();
  for (size_t i = 0; i < vs.names.size(); ++i) {
    js.key(vs.names[i]);
    counts(vs.per_roi[i]);
  }
  js.end_object().end_object();
}

// ---- Step 7: the gradients' unique variance ----------------------------------------------------

// The gradients' unique variance (encode --joint): targets significant in any layer (BH across
// its layers at q; max-stat FWER at alpha) and the mean dR^2 of the significant targets per layer.
struct UniqueSummary {
  std::vector<float> dr2;              // [L, T]
  std::vector<std::int32_t> any;       // [T]: significant in some layer (BH)
  std::vector<std::int64_t> per_layer; // [L]: significant targets (BH)
  std::vector<double> mean_dr2;        // [L]: over those targets
  std::int64_t n_any = 0, n_fwer = 0, T = 0;
};

// Collective (reads sf).
UniqueSummary unique_summary(const io::File& sf, const Scores& s, const KindData& ku, double q,
                             double alpha) {
  const std::int64_t L = s.L, T = s.T;
  UniqueSummary u;
  u.T = T;
  u.dr2 = sf.dataset("/unique_gradients/dr2").read_all<float>();
  u.any.assign(static_cast<size_t>(T), 0);
  u.per_layer.assign(static_cast<size_t>(L), 0);
  u.mean_dr2.assign(static_cast<size_t>(L), 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    bool fw = false;
    for (std::int64_t l = 0; l < L; ++l) {
      if (ku.q_bh_all[l * T + t] < q) {
        u.any[t] = 1;
        ++u.per_layer[l];
        u.mean_dr2[l] += u.dr2[l * T + t];
      }
      fw = fw || ku.p_fwer_all[l * T + t] < alpha;
    }
    u.n_any += u.any[t];
    u.n_fwer += fw ? 1 : 0;
  }
  for (std::int64_t l = 0; l < L; ++l)
    u.mean_dr2[l] = u.per_layer[l] > 0 ? u.mean_dr2[l] / double(u.per_layer[l]) : kNaN;
  return u;
}

void write_unique_summary(const io::File& f, const Scores& s, const UniqueSummary& u) {
  f.write_small(s.mod + "/unique_gradients/dr2", u.dr2, {s.L, s.T});
  f.write_small(s.mod + "/unique_gradients/significant_any_layer", u.any, {s.T});
}

void json_unique_summary(JsonWriter& js, const UniqueSummary& u) {
  js.key("unique_gradients")
      .begin_object()
      .member("n_significant_bh", u.n_any)
      .member("n_significant_fwer", u.n_fwer)
      .member("targets", u.T)
      .member("n_significant_bh_per_layer", u.per_layer)
      .member("mean_dr2_significant", u.mean_dr2)
      .end_object();
}

// ---- The steps for one modality ----------------------------------------------------------------

// Steps 2 and 3: the per-target tests and the hierarchy of every kind, written to stats.h5 and
// to summary.json ("significant", rho_*, and the peaks). Returns the hierarchies, by kind.
std::vector<Hierarchy> kind_tests(const Scores& s, const StatsOptions& o, const io::File& f,
                                  JsonWriter& js) {
  std::vector<SignificantCounts> counts;
  std::vector<Hierarchy> hier;
  for (const auto& kd : s.kinds) {
    counts.push_back(significant_counts(kd, s.L, s.T, o.q, o.alpha));
    hier.push_back(hierarchy(s, kd, o.ci));
    write_target_tests(f, s, kd, counts.back());
  }
  f.write_small(s.mod + "/groups/value", s.value, {s.G});
  f.write_small(s.mod + "/groups/n", s.group_n, {s.L, s.G});
  f.set_attr(s.mod, "layers", s.layers);
  f.set_attr(s.mod, "scores", s.path);
  f.set_attr(s.mod, "permutations", s.B);
  f.set_attr(s.mod, "bootstraps", s.Bb);
  for (size_t k = 0; k < s.kinds.size(); ++k)
    write_hierarchy(f, s, s.kinds[k], hier[k]);

  js.key("significant").begin_object();
  for (size_t k = 0; k < s.kinds.size(); ++k)
    js.key(s.kinds[k].name)
        .begin_object()
        .member("bh", counts[k].bh)
        .member("fwer", counts[k].fwer)
        .end_object();
  js.end_object().key(rho_name(s)).begin_object();
  for (size_t k = 0; k < s.kinds.size(); ++k) {
    const Stat& rho = hier[k].rho;
    js.key(s.kinds[k].name).begin_object().member("value", rho.value);
    js.key("ci").begin_array().value(rho.lo).value(rho.hi).end_array();
    js.member("p", rho.p).end_object();
  }
  js.end_object();
  for (size_t k = 0; k < s.kinds.size(); ++k)
    js.member(std::string(peak_name(s)) + "_" + s.kinds[k].name, hier[k].peak);
  return hier;
}

// Step 5 for one pair of kinds, with (fMRI, raw kinds) the voxelwise peak-layer maps.
void divergence_step(const io::File& sf, const Scores& s, const KindData& ka, const KindData& kg,
                     const std::string& sfx, const StatsOptions& o, const io::File& f,
                     JsonWriter& js) {
  const Divergence d = divergence(s, ka, kg, sfx, o);
  write_divergence(f, s, d);
  json_divergence(js, s, d);
  GM_INFO("stats: " << s.modality << ": " << d.name << " verdict: " << d.v.verdict
                    << " (p diverges " << num(d.v.p_diverges) << ", p consistent "
                    << num(d.v.p_consistent) << ")");
  if (s.meg || d.unique())
    return;
  const PeakMaps m = peak_maps(s, d.kind, o.q);
  write_peak_maps(f, s, d.kind, m);
  js.key("peak_layer_agreement")
      .begin_object()
      .member("fraction", m.agree)
      .member("voxels", m.both)
      .end_object();
  if (sf.exists("/activations/voxel_peak_p") && sf.exists("/gradients/voxel_peak_p")) {
    const VoxelSpace vs = voxel_space_tests(sf, s, m.peak, d.margin, o.q);
    write_voxel_space(f, s, vs);
    json_voxel_space(js, vs);
  }
}

// Collective on sf's communicator. Steps 2-7 for one scores file: writes its group of stats.h5
// and the members of its summary.json object.
void modality_stats(const io::File& sf, Scores& s, const StatsOptions& o, const io::File& f,
                    JsonWriter& js) {
  js.member("scores", s.path).member("permutations", s.B).member("bootstraps", s.Bb);
  js.member("layers", s.layers);
  // 2. Per-target tests (p, FDR, FWER) of every kind, then 3. their hierarchy statistics.
  per_target_tests(s.kinds, s.L, s.T, s.B);
  const std::vector<Hierarchy> hier = kind_tests(s, o, f, js);
  // 4. MEG: cluster-based permutation tests on the sensor x time grid.
  const ClusterTests ct = cluster_tests(sf, s, o.alpha);
  if (ct.present) {
    write_clusters(f, s, ct);
    json_clusters(js, ct);
  }
  // 5. Divergence of the gradients from the activations, then of their unique variance (with,
  // 6., the voxelwise peak-layer maps and tests of the raw kinds, fMRI).
  const KindData *ka = s.kind("activations"), *kg = s.kind("gradients"),
                 *ku = s.kind("unique_gradients");
  if (ka && kg)
    divergence_step(sf, s, *ka, *kg, "", o, f, js);
  if (ka && ku)
    divergence_step(sf, s, *ka, *ku, "_unique", o, f, js);
  // 7. The gradients' unique variance: targets significant in any layer.
  if (ku) {
    const UniqueSummary u = unique_summary(sf, s, *ku, o.q, o.alpha);
    write_unique_summary(f, s, u);
    json_unique_summary(js, u);
  }
  GM_INFO("stats: " << s.modality << ": " << rho_name(s) << " activations " << hier[0].rho.value
                    << " [" << hier[0].rho.lo << ", " << hier[0].rho.hi << "]"
                    << (hier.size() > 1 ? ", gradients " + num(hier[1].rho.value) + " [" +
                                              num(hier[1].rho.lo) + ", " + num(hier[1].rho.hi) + "]"
                                        : std::string()));
}

} // namespace

void stats(const StatsOptions& o, MPI_Comm comm) {
  validate(o);
  StageTimer timer("stats");
  const bool root = mpi::rank(comm) == 0;
  io::make_directories(o.out);
  io::OutputFile out(o.out + "/stats.h5", comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "q", std::vector<double>{o.q});
  f.set_attr("/", "alpha", std::vector<double>{o.alpha});
  f.set_attr("/", "ci", std::vector<double>{o.ci});
  JsonWriter summary;
  summary.begin_object().member("q", o.q).member("alpha", o.alpha).member("ci_level", o.ci);
  bool seen[2] = {false, false};
  for (const auto& path : o.scores) {
    // 1. Read the scores file (one per modality); then steps 2-7 (modality_stats).
    io::File sf = io::File::open(path, comm);
    Scores s = read_scores(sf, path, seen);
    summary.key(s.modality).begin_object();
    modality_stats(sf, s, o, f, summary);
    summary.end_object();
  }
  summary.end_object();
  out.commit();
  if (root) { // summary.json last, via a temporary name
    write_file_atomically(o.out + "/summary.json", summary.str());
  }
  GM_CHECK_MPI(MPI_Barrier(comm));
  GM_INFO("stats: wrote " << o.out << "/stats.h5 and summary.json");
}

} // namespace gradmap::stats
