// gradmap stats: see stats.hpp and docs/statistics.md for the definitions.
// Every rank reads the scores and computes the same numbers (the per-target arrays are at most
// kinds x layers x targets doubles, the replicates layers x groups x B): the heavy, per-target
// replicate work was done, distributed, inside encode. Outputs are written collectively.
#include "gradmap/stats/stats.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <limits>
#include <numeric>
#include <sstream>

#include "gradmap/core/error.hpp"
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

// Hierarchy statistic of one kind: rho(level, peak) over groups (fMRI), or rho(layer, peak
// latency) over layers (MEG), for the observed group means, each permutation and each bootstrap.
struct Hierarchy {
  Stat rho;
  std::vector<double> null; // per permutation
  std::vector<double> peak; // fMRI: best layer per ROI; MEG: peak latency per layer
};

Hierarchy hierarchy(const KindData& kd, bool meg, std::int64_t L, std::int64_t G, std::int64_t B,
                    std::int64_t Bb, const std::vector<double>& value,
                    const std::vector<std::int64_t>& group_n) {
  // One replicate: a [L, G, R] array at column b -> the statistic and the peaks.
  auto one = [&](const std::vector<double>& a, std::int64_t R, std::int64_t b,
                 std::vector<double>* peaks) {
    std::vector<double> x, y;
    if (meg) { // peak latencies, post-stimulus window only
      y = latencies(Profiles{&a, L, G, R}, b, value).peak;
      for (std::int64_t l = 0; l < L; ++l)
        x.push_back(double(l));
      if (peaks)
        *peaks = y;
    } else {
      if (peaks)
        peaks->assign(static_cast<size_t>(G), kNaN);
      for (std::int64_t g = 0; g < G; ++g) {
        if (group_n[g] == 0)
          continue;
        const int pl = peak_layer(a, L, G, R, g, b);
        if (pl < 0)
          continue;
        x.push_back(value[g]);
        y.push_back(double(pl));
        if (peaks)
          (*peaks)[g] = pl;
      }
    }
    for (double v : y)
      if (std::isnan(v))
        return kNaN;
    return spearman(x, y);
  };
  Hierarchy h;
  h.rho.value = one(kd.group_r, 1, 0, &h.peak);
  for (std::int64_t b = 0; b < B; ++b)
    h.null.push_back(one(kd.null_group, B, b, nullptr));
  for (std::int64_t b = 0; b < Bb; ++b)
    h.rho.boot.push_back(one(kd.boot_group, Bb, b, nullptr));
  h.rho.p = perm_p(h.null, h.rho.value);
  return h;
}

// Voxel-level space tests (docs/statistics.md, "Voxel level"): over the voxels significant for
// both kinds (tested[t]: a peak layer in peak_map), the pair tests of the voxel's peak-layer
// p-values (encode's voxel_peak_p), BH across the tested voxels for each claim, and a verdict per
// voxel (0 not tested, 1 undetermined, 2 diverges, 3 consistent). Returns the summary.json entry.
std::string voxel_space_tests(const io::File& f, const io::File& sf, const std::string& mod,
                              const std::vector<std::int32_t> (&peak_map)[2], std::int64_t L,
                              std::int64_t T, double margin, double q) {
  const auto pa = sf.dataset("/activations/voxel_peak_p").read_all<float>();
  const auto pg = sf.dataset("/gradients/voxel_peak_p").read_all<float>();
  if (std::int64_t(pa.size()) != L * T || std::int64_t(pg.size()) != L * T)
    throw UsageError(sf.path() + ": voxel_peak_p must be [layers, voxels]");
  std::vector<double> p_div(static_cast<size_t>(T), kNaN), p_cons(p_div);
  std::vector<double> a(static_cast<size_t>(L)), g(a);
  for (std::int64_t t = 0; t < T; ++t) {
    if (peak_map[0][t] < 0 || peak_map[1][t] < 0)
      continue;
    for (std::int64_t l = 0; l < L; ++l) {
      a[l] = pa[l * T + t];
      g[l] = pg[l * T + t];
    }
    const PairTests pt = pair_tests(a, g, margin);
    p_div[t] = pt.p_div;
    p_cons[t] = pt.p_cons;
  }
  const auto q_div = fdr(p_div, false), q_cons = fdr(p_cons, false);
  std::vector<std::int32_t> verdict(static_cast<size_t>(T), 0);
  std::vector<std::int32_t> roi;
  if (sf.exists("/groups/target"))
    roi = sf.dataset("/groups/target").read_all<std::int32_t>();
  std::vector<std::string> names;
  if (sf.exists("/groups/names"))
    names = sf.dataset("/groups/names").read_strings();
  std::vector<std::array<std::int64_t, 4>> per_roi(names.size(), {0, 0, 0, 0});
  std::array<std::int64_t, 4> total{0, 0, 0, 0};
  for (std::int64_t t = 0; t < T; ++t) {
    if (!std::isfinite(p_div[t]))
      continue;
    verdict[t] = q_cons[t] < q ? 3 : q_div[t] < q ? 2 : 1;
    ++total[verdict[t]];
    ++total[0];
    if (std::int64_t(roi.size()) == T && roi[t] >= 0 && size_t(roi[t]) < names.size()) {
      ++per_roi[roi[t]][verdict[t]];
      ++per_roi[roi[t]][0];
    }
  }
  const std::string base = mod + "/D_space_voxel/";
  f.write_small(base + "p_diverges", p_div, {T});
  f.write_small(base + "p_consistent", p_cons, {T});
  f.write_small(base + "q_diverges", q_div, {T});
  f.write_small(base + "q_consistent", q_cons, {T});
  f.write_small(base + "verdict", verdict, {T});
  f.set_attr(mod + "/D_space_voxel", "verdict_codes",
             std::string("0 not tested (no signal in a kind), 1 undetermined, 2 diverges, "
                         "3 consistent"));
  std::ostringstream s;
  auto counts = [&](const std::array<std::int64_t, 4>& c) {
    s << "{\"tested\": " << c[0] << ", \"diverges\": " << c[2] << ", \"consistent\": " << c[3]
      << ", \"undetermined\": " << c[1] << "}";
  };
  s << ",\n    \"D_space_voxels\": {\"q\": " << num(q) << ", \"margin\": " << num(margin)
    << ", \"all\": ";
  counts(total);
  s << ", \"roi\": {";
  for (size_t i = 0; i < names.size(); ++i) {
    s << (i ? ", " : "") << "\"" << names[i] << "\": ";
    counts(per_roi[i]);
  }
  s << "}}";
  return s.str();
}

std::string json_list(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i)
    s += (i ? ", " : "") + num(v[i]);
  return s + "]";
}

// [[lo, hi], ...] from a flat [n, 2] vector.
std::string json_pairs(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i + 1 < v.size(); i += 2)
    s += (i ? ", [" : "[") + num(v[i]) + ", " + num(v[i + 1]) + "]";
  return s + "]";
}

std::string json_stat(const Stat& s) {
  return "{\"value\": " + num(s.value) + ", \"ci\": [" + num(s.lo) + ", " + num(s.hi) +
         "], \"p\": " + num(s.p) + "}";
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
  std::ostringstream summary;
  summary << "{\n  \"q\": " << num(o.q) << ", \"alpha\": " << num(o.alpha)
          << ", \"ci_level\": " << num(o.ci);
  bool seen[2] = {false, false};
  for (const auto& path : o.scores) {
    io::File sf = io::File::open(path, comm);
    auto need = [&](const std::string& name) {
      if (!sf.exists(name))
        throw UsageError(path + ": " + name + " is missing (was it written by gradmap encode " +
                         "with --permutations and --bootstraps > 0?)");
    };
    need("/groups/value");
    const std::string modality = sf.attr_string("/", "modality");
    const bool meg = modality == "meg";
    if (seen[meg])
      throw UsageError("--scores: two " + modality + " scores files; give one per modality");
    seen[meg] = true;
    const auto layers = sf.attr_strings("/", "layers");
    const std::int64_t L = std::int64_t(layers.size());
    const std::int64_t B = sf.attr_int("/", "permutations"), Bb = sf.attr_int("/", "bootstraps");
    if (B < 1 || Bb < 1)
      throw UsageError(path + ": encode ran with " + std::to_string(B) + " permutations and " +
                       std::to_string(Bb) + " bootstraps; stats needs both");
    const auto value = sf.dataset("/groups/value").read_all<double>();
    const std::int64_t G = std::int64_t(value.size());
    std::vector<KindData> kinds;
    for (const char* name : {"activations", "gradients", "unique_gradients"})
      if (sf.exists(std::string("/") + name + "/r") || sf.exists(std::string("/") + name + "/t")) {
        KindData kd;
        kd.name = name;
        const std::string base = std::string("/") + name + "/";
        for (const char* d : {"exceed", "null_max", "null_group", "boot_group", "group_r"})
          need(base + d);
        // the unique kind's per-target statistic is its bootstrap t (encode --joint)
        kd.r = sf.dataset(base + (kd.name == "unique_gradients" ? "t" : "r")).read_all<float>();
        kd.exceed = sf.dataset(base + "exceed").read_all<std::int32_t>();
        kd.null_max = sf.dataset(base + "null_max").read_all<float>();
        kd.null_group = sf.dataset(base + "null_group").read_all<double>();
        kd.boot_group = sf.dataset(base + "boot_group").read_all<double>();
        kd.group_r = sf.dataset(base + "group_r").read_all<double>();
        kinds.push_back(std::move(kd));
      }
    if (kinds.empty())
      throw UsageError(path + ": no /activations or /gradients scores");
    const std::int64_t T = std::int64_t(kinds[0].r.size()) / std::max<std::int64_t>(L, 1);
    const auto group_n = sf.dataset("/" + kinds[0].name + "/group_n").read_all<std::int64_t>();
    // [L, G] -> [G]: a group takes part only if every layer has scored targets in it.
    std::vector<std::int64_t> n_group(static_cast<size_t>(G), 0);
    for (std::int64_t g = 0; g < G && std::int64_t(group_n.size()) == L * G; ++g) {
      n_group[g] = group_n[g];
      for (std::int64_t l = 1; l < L; ++l)
        n_group[g] = std::min(n_group[g], group_n[l * G + g]);
    }
    const std::string mod = "/" + modality;

    // Per-target p-values, FDR within each (kind, layer) and across all, max-stat FWER. The
    // "all" families: the raw kinds (activations and gradients) together, and the gradients'
    // unique variance (encode --joint) on its own, over its layers.
    auto family = [](const KindData& kd) { return kd.name == "unique_gradients" ? 1 : 0; };
    std::vector<float> global_max[2];
    for (auto& gm : global_max)
      gm.assign(static_cast<size_t>(B), -INFINITY);
    for (auto& kd : kinds)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t b = 0; b < B; ++b)
          global_max[family(kd)][b] = std::max(global_max[family(kd)][b], kd.null_max[l * B + b]);
    std::vector<double> all_p[2];
    for (auto& kd : kinds) {
      kd.p.assign(static_cast<size_t>(L * T), kNaN);
      kd.p_fwer = kd.p_fwer_all = kd.q_bh = kd.q_by = kd.p;
      for (std::int64_t l = 0; l < L; ++l) {
        std::vector<float> mx(kd.null_max.begin() + l * B, kd.null_max.begin() + (l + 1) * B),
            gm(global_max[family(kd)]);
        std::sort(mx.begin(), mx.end());
        std::sort(gm.begin(), gm.end());
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
          kd.p_fwer_all[l * T + t] = (1.0 + ge(gm)) / double(B + 1);
        }
        const auto qb = fdr(pl, false), qy = fdr(pl, true);
        std::copy(pl.begin(), pl.end(), kd.p.begin() + l * T);
        std::copy(qb.begin(), qb.end(), kd.q_bh.begin() + l * T);
        std::copy(qy.begin(), qy.end(), kd.q_by.begin() + l * T);
      }
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

    summary << ",\n  \"" << modality << "\": {\n    \"scores\": \"" << path
            << "\", \"permutations\": " << B << ", \"bootstraps\": " << Bb
            << ",\n    \"layers\": [";
    for (std::int64_t l = 0; l < L; ++l)
      summary << (l ? ", " : "") << "\"" << layers[l] << "\"";
    summary << "],\n    \"significant\": {";
    std::vector<Hierarchy> hier;
    for (size_t k = 0; k < kinds.size(); ++k) {
      const auto& kd = kinds[k];
      const std::string base = mod + "/" + kd.name + "/";
      f.write_small(base + "r", kd.r, {L, T});
      for (auto [name, v] : {std::pair<const char*, const std::vector<double>*>{"p", &kd.p},
                             {"q_bh", &kd.q_bh},
                             {"q_by", &kd.q_by},
                             {"p_fwer", &kd.p_fwer},
                             {"q_bh_all", &kd.q_bh_all},
                             {"q_by_all", &kd.q_by_all},
                             {"p_fwer_all", &kd.p_fwer_all}})
        f.write_small(base + name, *v, {L, T});
      std::vector<std::int64_t> n_bh(static_cast<size_t>(L), 0), n_fwer(n_bh);
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t t = 0; t < T; ++t) {
          n_bh[l] += kd.q_bh[l * T + t] < o.q ? 1 : 0;
          n_fwer[l] += kd.p_fwer[l * T + t] < o.alpha ? 1 : 0;
        }
      f.write_small(base + "n_significant_bh", n_bh, {L});
      f.write_small(base + "n_significant_fwer", n_fwer, {L});
      summary << (k ? ", " : "") << "\"" << kd.name << "\": {\"bh\": [";
      for (std::int64_t l = 0; l < L; ++l)
        summary << (l ? ", " : "") << n_bh[l];
      summary << "], \"fwer\": [";
      for (std::int64_t l = 0; l < L; ++l)
        summary << (l ? ", " : "") << n_fwer[l];
      summary << "]}";
      hier.push_back(hierarchy(kd, meg, L, G, B, Bb, value, n_group));
      finish_ci(hier.back().rho, o.ci);
      f.write_small(base + "group_r", kd.group_r, {L, G});
    }
    summary << "}";
    f.write_small(mod + "/groups/value", value, {G});
    f.write_small(mod + "/groups/n", group_n, {L, G});

    f.set_attr(mod, "layers", layers);
    f.set_attr(mod, "scores", path);
    f.set_attr(mod, "permutations", B);
    f.set_attr(mod, "bootstraps", Bb);
    const char* rho_name = meg ? "rho_time" : "rho_space";
    summary << ",\n    \"" << rho_name << "\": {";
    for (size_t k = 0; k < kinds.size(); ++k) {
      const Hierarchy& h = hier[k];
      const std::string base = mod + "/" + kinds[k].name + "/";
      f.write_small(base + rho_name, std::vector<double>{h.rho.value, h.rho.lo, h.rho.hi, h.rho.p},
                    {4});
      f.write_small(base + rho_name + "_boot", h.rho.boot, {Bb});
      f.write_small(base + rho_name + "_null", h.null, {B});
      f.write_small(base + (meg ? "peak_latency" : "roi_best_layer"), h.peak,
                    {std::int64_t(h.peak.size())});
      summary << (k ? ", " : "") << "\"" << kinds[k].name << "\": " << json_stat(h.rho);
    }
    summary << "}";
    for (size_t k = 0; k < kinds.size(); ++k) {
      summary << ",\n    \"" << (meg ? "peak_latency" : "roi_best_layer") << "_" << kinds[k].name
              << "\": [";
      for (size_t i = 0; i < hier[k].peak.size(); ++i)
        summary << (i ? ", " : "") << num(hier[k].peak[i]);
      summary << "]";
    }

    // MEG cluster-based permutation tests (docs/statistics.md, "Clusters"): observed clusters of
    // r > threshold on the sensor x time grid, each with p = (1 + #{b: max cluster_b >= size}) /
    // (B + 1) from the permutation maxima encode kept.
    if (meg && sf.exists("/" + kinds[0].name + "/null_cluster")) {
      const encoding::ClusterGraph cg = encoding::make_cluster_graph(
          T / std::max<std::int64_t>(G, 1), G,
          sf.exists("/cluster_adjacency")
              ? sf.dataset("/cluster_adjacency").read_all<std::int32_t>()
              : std::vector<std::int32_t>{});
      const double thr = sf.attr_doubles("/", "cluster_threshold").at(0);
      f.set_attr(mod, "cluster_threshold", std::vector<double>{thr});
      summary << ",\n    \"cluster_threshold_r\": " << num(thr) << ", \"cluster_adjacency\": \""
              << sf.attr_string("/", "cluster_adjacency") << "\"";
      for (const auto& kd : kinds) {
        if (!sf.exists("/" + kd.name + "/null_cluster"))
          continue; // the unique kind (its statistic is a t, thresholded nowhere)
        const auto null = sf.dataset("/" + kd.name + "/null_cluster").read_all<std::int64_t>();
        std::vector<std::int32_t> labels_all;
        std::vector<double> table; // rows: layer, size, p, t_first, t_last
        std::vector<double> onset(static_cast<size_t>(L), kNaN);
        std::string sig;
        for (std::int64_t l = 0; l < L; ++l) {
          std::vector<std::int32_t> labels;
          const float* r = &kd.r[static_cast<size_t>(l * T)];
          const auto sizes = encoding::find_clusters(
              cg, [r, thr](std::int64_t v) { return double(r[v]) > thr; }, &labels);
          std::vector<double> first(sizes.size(), kInf), last(sizes.size(), -kInf);
          for (std::int64_t v = 0; v < T; ++v)
            if (labels[v] >= 0) {
              first[labels[v]] = std::min(first[labels[v]], value[v % G]);
              last[labels[v]] = std::max(last[labels[v]], value[v % G]);
            }
          for (size_t c = 0; c < sizes.size(); ++c) {
            double ge = 1;
            for (std::int64_t b = 0; b < B; ++b)
              ge += null[l * B + b] >= sizes[c] ? 1 : 0;
            const double p = ge / double(B + 1);
            table.insert(table.end(), {double(l), double(sizes[c]), p, first[c], last[c]});
            if (p < o.alpha) {
              if (first[c] > 0 && !(onset[l] <= first[c]))
                onset[l] = first[c];
              sig += std::string(sig.empty() ? "" : ", ") + "{\"layer\": " + std::to_string(l) +
                     ", \"size\": " + std::to_string(sizes[c]) + ", \"p\": " + num(p) +
                     ", \"t_first\": " + num(first[c]) + ", \"t_last\": " + num(last[c]) + "}";
            }
          }
          labels_all.insert(labels_all.end(), labels.begin(), labels.end());
        }
        const std::string base = mod + "/" + kd.name + "/";
        f.write_small(base + "cluster_labels", labels_all, {L, T});
        f.write_small(base + "clusters", table, {std::int64_t(table.size() / 5), 5});
        f.write_small(base + "cluster_onset", onset, {L});
        summary << ",\n    \"clusters_" << kd.name << "\": [" << sig << "]"
                << ",\n    \"cluster_onset_" << kd.name << "\": " << json_list(onset);
      }
    }

    // Divergence (docs/statistics.md): both kinds needed. The predictions of a biological
    // backprop as tests with a verdict: space (fMRI) by peak-layer confidence sets per ROI, time
    // (MEG) by the slope of the gradients' peak latencies on layer and the top-layer gap.
    // The same tests on the gradients' unique variance beyond the activations (encode --joint;
    // suffix "_unique", docs/statistics.md "Unique variance").
    auto divergence = [&](const KindData& ka, const KindData& kg, const std::string& sfx) {
      const bool unique = !sfx.empty();
      const KindData* kp[2] = {&ka, &kg};
      const Profiles obs[2] = {{&ka.group_r, L, G, 1}, {&kg.group_r, L, G, 1}};
      const Profiles boot[2] = {{&ka.boot_group, L, G, Bb}, {&kg.boot_group, L, G, Bb}};
      const Profiles null[2] = {{&ka.null_group, L, G, B}, {&kg.null_group, L, G, B}};
      Verdict v;
      std::ostringstream extra;
      if (meg) {
        const TimeDivergence td = time_divergence(obs[0], obs[1], boot[0], boot[1], null[0],
                                                  null[1], value, o.time_margin, o.alpha, o.ci);
        v = td.v;
        f.write_small(mod + "/top_layer_latency_gap" + sfx,
                      std::vector<double>{td.gap, td.gap_lo, td.gap_hi}, {3});
        for (int k = unique ? 1 : 0; k < 2; ++k) { // the activations' entries once
          const std::string base = mod + "/" + kp[k]->name + "/";
          const Latencies& lat = k ? td.grad : td.act;
          f.write_small(base + "onset_latency", lat.onset, {L});
          f.write_small(base + "peak_latency_ci", td.peak_ci[k], {L, 2});
          f.write_small(base + "onset_latency_ci", td.onset_ci[k], {L, 2});
          extra << ",\n    \"peak_latency_ci_" << kp[k]->name << "\": " << json_pairs(td.peak_ci[k])
                << ",\n    \"onset_latency_" << kp[k]->name << "\": " << json_list(lat.onset)
                << ",\n    \"onset_latency_ci_" << kp[k]->name
                << "\": " << json_pairs(td.onset_ci[k]);
        }
        extra << ",\n    \"top_layer_latency_gap" << sfx << "\": {\"value\": " << num(td.gap)
              << ", \"ci\": [" << num(td.gap_lo) << ", " << num(td.gap_hi) << "]}";
      } else {
        const double margin = o.space_margin * double(L - 1);
        const SpaceDivergence sd = space_divergence(obs[0], obs[1], boot[0], boot[1], null[0],
                                                    null[1], n_group, margin, o.alpha, o.ci);
        v = sd.v;
        f.write_small(mod + "/D_space" + sfx + "_p_diverges_roi", sd.p_div_roi, {G});
        f.write_small(mod + "/D_space" + sfx + "_p_consistent_roi", sd.p_cons_roi, {G});
        if (!unique)
          f.write_small(mod + "/" + ka.name + "/peak_layer_p", sd.peak_p_act, {L, G});
        f.write_small(mod + "/" + kg.name + "/peak_layer_p", sd.peak_p_grad, {L, G});
        extra << ",\n    \"D_space" << sfx << "_p_diverges_roi\": " << json_list(sd.p_div_roi)
              << ",\n    \"D_space" << sfx << "_p_consistent_roi\": " << json_list(sd.p_cons_roi);
        if (!unique)
          extra << ",\n    \"D_space_margin_layers\": " << num(margin);
      }
      if (unique) // the verdict concerns the unique variance, not raw scores
        v.reason = v.verdict == "consistent"
                       ? "the gradients' unique variance beyond the activations is organised as a "
                         "biological backpropagation predicts, within the stated margin"
                   : v.verdict == "diverges"
                       ? "the gradients' unique variance beyond the activations is organised "
                         "differently from what a biological backpropagation predicts"
                   : !(v.p_signal_gradients < o.alpha)
                       ? "the gradients add no detectable unique variance beyond the activations "
                         "here, so neither claim can be tested"
                       : v.reason;
      const std::string dn = std::string(meg ? "D_time" : "D_space") + sfx;
      f.write_small(mod + "/" + dn, std::vector<double>{v.value, v.lo, v.hi, v.p_diverges}, {4});
      f.write_small(mod + "/" + dn + "_boot", v.boot, {Bb});
      f.write_small(mod + "/" + dn + "_tests",
                    std::vector<double>{v.p_diverges, v.p_consistent, v.p_signal_activations,
                                        v.p_signal_gradients},
                    {4});
      f.set_attr(mod + "/" + dn, "verdict", v.verdict);
      summary << ",\n    \"" << dn << "\": {\"value\": " << num(v.value) << ", \"ci\": ["
              << num(v.lo) << ", " << num(v.hi) << "], \"p\": " << num(v.p_diverges)
              << ", \"verdict\": \"" << v.verdict << "\", \"p_consistent\": " << num(v.p_consistent)
              << ", \"p_signal_activations\": " << num(v.p_signal_activations)
              << ", \"p_signal_gradients\": " << num(v.p_signal_gradients)
              << ", \"ci_extended\": " << (v.ci_extended ? "true" : "false")
              << ", \"margin\": " << num(meg ? o.time_margin : o.space_margin * double(L - 1))
              << ", \"reason\": \"" << v.reason << "\"}" << extra.str();
      GM_INFO("stats: " << modality << ": " << dn << " verdict: " << v.verdict << " (p diverges "
                        << num(v.p_diverges) << ", p consistent " << num(v.p_consistent) << ")");
      if (!meg &&
          !unique) { // voxelwise agreement of the peak-layer maps over voxels significant in both
        std::vector<double> pk[2], lv;
        std::int64_t both = 0, same = 0;
        std::vector<std::int32_t> peak_map[2];
        std::vector<double> com_map[2];
        for (int k = 0; k < 2; ++k) {
          peak_map[k].assign(static_cast<size_t>(T), -1);
          com_map[k].assign(static_cast<size_t>(T), kNaN);
          for (std::int64_t t = 0; t < T; ++t) {
            bool sig = false;
            double best = -INFINITY, wsum = 0, lsum = 0;
            for (std::int64_t l = 0; l < L; ++l) {
              const double r = kp[k]->r[l * T + t];
              sig = sig || kp[k]->q_bh_all[l * T + t] < o.q;
              if (!std::isnan(r) && r > best) {
                best = r;
                peak_map[k][t] = std::int32_t(l);
              }
              if (r > 0) {
                wsum += r;
                lsum += r * double(l);
              }
            }
            if (!sig) {
              peak_map[k][t] = -1;
              continue;
            }
            com_map[k][t] = wsum > 0 ? lsum / wsum : kNaN;
          }
          f.write_small(mod + "/" + kp[k]->name + "/peak_layer", peak_map[k], {T});
          f.write_small(mod + "/" + kp[k]->name + "/peak_layer_com", com_map[k], {T});
        }
        for (std::int64_t t = 0; t < T; ++t)
          if (peak_map[0][t] >= 0 && peak_map[1][t] >= 0) {
            ++both;
            same += peak_map[0][t] == peak_map[1][t] ? 1 : 0;
          }
        const double agree = both > 0 ? double(same) / double(both) : kNaN;
        f.write_small(mod + "/peak_agreement", std::vector<double>{agree, double(both)}, {2});
        summary << ",\n    \"peak_layer_agreement\": {\"fraction\": " << num(agree)
                << ", \"voxels\": " << both << "}";
        if (sf.exists("/activations/voxel_peak_p") && sf.exists("/gradients/voxel_peak_p"))
          summary << voxel_space_tests(f, sf, mod, peak_map, L, T, o.space_margin * double(L - 1),
                                       o.q);
      }
    };
    const KindData* kind_of[3] = {nullptr, nullptr, nullptr};
    for (const auto& kd : kinds)
      kind_of[kd.name == "activations" ? 0 : kd.name == "gradients" ? 1 : 2] = &kd;
    if (kind_of[0] && kind_of[1])
      divergence(*kind_of[0], *kind_of[1], "");
    if (kind_of[0] && kind_of[2])
      divergence(*kind_of[0], *kind_of[2], "_unique");
    if (kind_of[2]) { // the gradients' unique variance: targets significant in any layer
      const KindData& ku = *kind_of[2];
      const auto dr2 = sf.dataset("/unique_gradients/dr2").read_all<float>();
      std::vector<std::int32_t> any(static_cast<size_t>(T), 0);
      std::vector<std::int64_t> per_layer(static_cast<size_t>(L), 0);
      std::vector<double> mean_dr2(static_cast<size_t>(L), 0.0);
      std::int64_t n_any = 0, n_fwer = 0;
      for (std::int64_t t = 0; t < T; ++t) {
        bool fw = false;
        for (std::int64_t l = 0; l < L; ++l) {
          if (ku.q_bh_all[l * T + t] < o.q) {
            any[t] = 1;
            ++per_layer[l];
            mean_dr2[l] += dr2[l * T + t];
          }
          fw = fw || ku.p_fwer_all[l * T + t] < o.alpha;
        }
        n_any += any[t];
        n_fwer += fw ? 1 : 0;
      }
      for (std::int64_t l = 0; l < L; ++l)
        mean_dr2[l] = per_layer[l] > 0 ? mean_dr2[l] / double(per_layer[l]) : kNaN;
      f.write_small(mod + "/unique_gradients/dr2", dr2, {L, T});
      f.write_small(mod + "/unique_gradients/significant_any_layer", any, {T});
      summary << ",\n    \"unique_gradients\": {\"n_significant_bh\": " << n_any
              << ", \"n_significant_fwer\": " << n_fwer << ", \"targets\": " << T
              << ", \"n_significant_bh_per_layer\": [";
      for (std::int64_t l = 0; l < L; ++l)
        summary << (l ? ", " : "") << per_layer[l];
      summary << "], \"mean_dr2_significant\": " << json_list(mean_dr2) << "}";
    }
    summary << "\n  }";
    GM_INFO("stats: " << modality << ": " << rho_name << " activations " << hier[0].rho.value
                      << " [" << hier[0].rho.lo << ", " << hier[0].rho.hi << "]"
                      << (hier.size() > 1
                              ? ", gradients " + num(hier[1].rho.value) + " [" +
                                    num(hier[1].rho.lo) + ", " + num(hier[1].rho.hi) + "]"
                              : std::string()));
  }
  summary << "\n}\n";
  out.commit();
  if (root) { // summary.json last, via a temporary name
    write_file_atomically(o.out + "/summary.json", summary.str());
  }
  GM_CHECK_MPI(MPI_Barrier(comm));
  GM_INFO("stats: wrote " << o.out << "/stats.h5 and summary.json");
}

} // namespace gradmap::stats
