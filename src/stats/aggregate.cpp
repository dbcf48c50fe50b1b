// gradmap aggregate: see aggregate.hpp.
#include "gradmap/stats/aggregate.hpp"

#include <boost/math/distributions/students_t.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <sstream>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/text.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/sim/philox.hpp"
#include "gradmap/stats/divergence.hpp"

namespace gradmap::stats {

namespace {
std::string num(double v) {
  return format_number(v, 10, "null");
}
const double kNaN = std::numeric_limits<double>::quiet_NaN();

std::vector<double> finite(const std::vector<double>& x) {
  std::vector<double> v;
  for (double d : x)
    if (std::isfinite(d))
      v.push_back(d);
  return v;
}

} // namespace

double sign_flip_p(const std::vector<double>& xs, std::int64_t random_flips, std::uint64_t seed) {
  const auto x = finite(xs);
  const size_t n = x.size();
  if (n == 0)
    return kNaN;
  double obs = 0;
  for (double v : x)
    obs += v;
  obs = std::abs(obs) * (1 - 1e-12); // relative slack: sums of the same values in another order
  auto flipped = [&](auto sign_of) {
    double s = 0;
    for (size_t i = 0; i < n; ++i)
      s += sign_of(i) ? -x[i] : x[i];
    return std::abs(s);
  };
  if (n <= 20) {
    std::int64_t hits = 0;
    const std::uint64_t total = std::uint64_t(1) << n;
    for (std::uint64_t mask = 0; mask < total; ++mask)
      hits += flipped([&](size_t i) { return (mask >> i) & 1; }) >= obs ? 1 : 0;
    return double(hits) / double(total);
  }
  std::int64_t hits = 0;
  for (std::int64_t b = 0; b < random_flips; ++b) {
    sim::Philox rng(seed, sim::Stream::permutation, std::uint32_t(b), 1u << 31);
    std::vector<bool> s(n);
    for (size_t i = 0; i < n; ++i)
      s[i] = rng.below(2) == 1;
    hits += flipped([&](size_t i) { return s[i]; }) >= obs ? 1 : 0;
  }
  return double(1 + hits) / double(random_flips + 1);
}

// Fisher's method: X = -2 sum ln p_i, p = P(chi2(2S) >= X) = exp(-X/2) sum_{k<S} (X/2)^k / k!.
// Any non-finite input p makes the combination 1 (an undefined test supports no claim).
double fisher_combined_p(const std::vector<double>& p) {
  double half = 0;
  for (double x : p) {
    if (!(x >= 0 && x <= 1))
      return 1.0;
    half -= std::log(std::max(x, 1e-300));
  }
  double term = 1, sum = 1;
  for (size_t k = 1; k < p.size(); ++k) {
    term *= half / double(k);
    sum += term;
  }
  return std::min(1.0, std::exp(-half) * sum);
}

std::pair<double, double> t_interval(const std::vector<double>& xs, double level) {
  const auto x = finite(xs);
  const size_t n = x.size();
  if (n < 2)
    return {kNaN, kNaN};
  double mean = 0, ss = 0;
  for (double v : x)
    mean += v / double(n);
  for (double v : x)
    ss += (v - mean) * (v - mean);
  const double se = std::sqrt(ss / double(n - 1) / double(n));
  const boost::math::students_t dist(double(n - 1));
  const double t = boost::math::quantile(dist, (1 + level) / 2);
  return {mean - t * se, mean + t * se};
}

void aggregate(const AggregateOptions& o, MPI_Comm comm) {
  if (o.stats.size() < 2)
    throw UsageError("--stats: at least two stats directories are needed");
  if (!o.labels.empty() && o.labels.size() != o.stats.size())
    throw UsageError("--label: give one label per --stats directory (" +
                     std::to_string(o.stats.size()) + "), not " + std::to_string(o.labels.size()));
  if (o.out.empty())
    throw UsageError("--out: an output directory is required");
  if (!(o.ci > 0 && o.ci < 1))
    throw UsageError("--ci: must be in (0, 1)");
  if (!(o.alpha > 0 && o.alpha < 1))
    throw UsageError("--alpha: must be in (0, 1)");
  std::vector<std::string> labels = o.labels;
  for (size_t i = 0; labels.size() < o.stats.size(); ++i) {
    std::string d = o.stats[i];
    while (d.size() > 1 && d.back() == '/')
      d.pop_back();
    labels.push_back(d.substr(d.find_last_of('/') + 1));
  }
  const size_t S = o.stats.size();
  std::vector<io::File> files;
  for (const auto& d : o.stats)
    files.push_back(io::File::open(d + "/stats.h5", comm));

  io::make_directories(o.out);
  io::OutputFile out(o.out + "/aggregate.h5", comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "inputs", o.stats);
  f.set_attr("/", "labels", labels);
  std::ostringstream js, csv;
  js << "{\n  \"inputs\": [";
  for (size_t i = 0; i < S; ++i)
    js << (i ? ", " : "") << "\"" << labels[i] << "\"";
  js << "], \"ci_level\": " << num(o.ci);
  csv << "modality,statistic,input,value\n";
  const std::string kinds[3] = {"activations", "gradients", "unique_gradients"};
  for (const std::string mod : {"fmri", "meg"}) {
    size_t have = 0;
    for (const auto& file : files)
      have += file.exists("/" + mod) ? 1 : 0;
    if (have == 0)
      continue;
    if (have != S)
      throw UsageError("aggregate: only " + std::to_string(have) + " of the " + std::to_string(S) +
                       " inputs have " + mod + " statistics");
    // Inputs from different models have different layers: their headline statistics still
    // compare, their layer tables do not.
    const auto layers = files[0].attr_strings("/" + mod, "layers");
    bool same_layers = true;
    for (size_t i = 1; i < S; ++i)
      same_layers = same_layers && files[i].attr_strings("/" + mod, "layers") == layers;
    if (!same_layers)
      GM_WARN("aggregate: the inputs' "
              << mod << " layers differ (different models?): only the "
              << "headline statistics are combined, not the layer tables");
    const bool meg = mod == "meg";
    const std::string rho = meg ? "rho_time" : "rho_space", d = meg ? "D_time" : "D_space";
    std::vector<std::pair<std::string, std::string>> entries; // (name, dataset)
    for (const auto& k : kinds)
      if (files[0].exists("/" + mod + "/" + k + "/" + rho))
        entries.push_back({rho + "_" + k, "/" + mod + "/" + k + "/" + rho});
    for (const std::string& dd : {d, d + "_unique"})
      if (files[0].exists("/" + mod + "/" + dd))
        entries.push_back({dd, "/" + mod + "/" + dd});
    if (files[0].exists("/" + mod + "/peak_agreement"))
      entries.push_back({"peak_layer_agreement", "/" + mod + "/peak_agreement"});
    js << ",\n  \"" << mod << "\": {";
    bool first = true;
    for (const auto& [name, path] : entries) {
      std::vector<double> v;
      for (size_t i = 0; i < S; ++i) {
        if (!files[i].exists(path))
          throw UsageError(o.stats[i] + "/stats.h5: " + path + " is missing");
        v.push_back(files[i].dataset(path).read_all<double>().at(0));
        csv << mod << "," << name << "," << labels[i] << "," << num(v.back()) << "\n";
      }
      const auto fin = finite(v);
      double mean = kNaN;
      if (!fin.empty()) {
        mean = 0;
        for (double x : fin)
          mean += x / double(fin.size());
      }
      const auto [lo, hi] = t_interval(v, o.ci);
      // H0 of the rho entries: 0 (no hierarchy). D_space / D_time are descriptive here (their
      // H0 is not 0): their group test is the combination of the per-input tests below; the
      // agreement has no null of 0.
      const bool no_sign_test =
          name == "peak_layer_agreement" || name == d || name == d + "_unique";
      const double p = no_sign_test ? kNaN : sign_flip_p(v);
      f.write_small("/" + mod + "/" + name + "/values", v, {std::int64_t(S)});
      f.write_small("/" + mod + "/" + name + "/summary", std::vector<double>{mean, lo, hi, p}, {4});
      js << (first ? "" : ",") << "\n    \"" << name << "\": {\"mean\": " << num(mean)
         << ", \"ci\": [" << num(lo) << ", " << num(hi) << "], \"p_sign_flip\": " << num(p)
         << ", \"n\": " << fin.size() << ", \"values\": [";
      for (size_t i = 0; i < S; ++i)
        js << (i ? ", " : "") << num(v[i]);
      js << "]}";
      first = false;
    }
    // Group inference on the divergence verdicts (docs/statistics.md, "Group level"): Fisher's
    // combination of the per-input p-values of "diverges" and of the signal tests (valid for
    // independent inputs whose p-values are uniform or conservative under H0: X = -2 sum ln p ~
    // chi2(2S)), and the intersection-union p of "consistent in every input" (max over inputs).
    // The same on the gradients' unique variance (encode --joint: D_*_unique) when every input
    // has it.
    for (const std::string& dd : {d, d + "_unique"}) {
      const std::string tests = "/" + mod + "/" + dd + "_tests";
      if (files[0].exists(tests)) {
        std::vector<double> pd, pc, psa, psg;
        // Each input's p-values are floored at the resolution of its replicates, 1 / (B_b + 1)
        // (B + 1 for the permutation signal tests): a Wald p in the far tail must not carry a
        // Fisher combination alone.
        std::map<std::string, int> count{{"diverges", 0}, {"consistent", 0}, {"undetermined", 0}};
        for (size_t i = 0; i < S; ++i) {
          if (!files[i].exists(tests))
            throw UsageError(o.stats[i] + "/stats.h5: " + tests + " is missing");
          const auto x = files[i].dataset(tests).read_all<double>();
          if (x.size() != 4)
            throw UsageError(o.stats[i] + "/stats.h5: " + tests + " must hold 4 values");
          const auto floor_of = [&](const char* replicates) { // 0 when the count is not recorded
            return files[i].has_attr("/" + mod, replicates)
                       ? 1.0 / double(files[i].attr_int("/" + mod, replicates) + 1)
                       : 0.0;
          };
          const double fb = floor_of("bootstraps"), fp = floor_of("permutations");
          auto floored = [](double p, double lowest) {
            return std::isfinite(p) ? std::max(p, lowest) : 1.0;
          };
          pd.push_back(floored(x[0], fb));
          pc.push_back(floored(x[1], 0)); // non-finite: 1, never supports "consistent"
          psa.push_back(floored(x[2], fp));
          psg.push_back(floored(x[3], fp));
          count[files[i].attr_string("/" + mod + "/" + dd, "verdict")] += 1;
        }
        Verdict v;
        v.p_diverges = fisher_combined_p(pd);
        v.p_consistent = *std::max_element(pc.begin(), pc.end());
        v.p_signal_activations = fisher_combined_p(psa);
        v.p_signal_gradients = fisher_combined_p(psg);
        decide(v, o.alpha);
        if (v.verdict == "diverges")
          v.reason = "the prediction fails in at least one of the " + std::to_string(S) +
                     " inputs (" + std::to_string(count["diverges"]) + " diverge on their own)";
        else if (v.verdict == "consistent")
          v.reason =
              "consistent with the prediction in every one of the " + std::to_string(S) + " inputs";
        f.write_small("/" + mod + "/" + dd + "/group_tests",
                      std::vector<double>{v.p_diverges, v.p_consistent, v.p_signal_activations,
                                          v.p_signal_gradients},
                      {4});
        f.set_attr("/" + mod + "/" + dd, "group_verdict", v.verdict);
        js << ",\n    \"" << dd << "_group\": {\"verdict\": \"" << v.verdict
           << "\", \"p_diverges_fisher\": " << num(v.p_diverges)
           << ", \"p_consistent_all\": " << num(v.p_consistent)
           << ", \"p_signal_activations_fisher\": " << num(v.p_signal_activations)
           << ", \"p_signal_gradients_fisher\": " << num(v.p_signal_gradients)
           << ", \"inputs_diverges\": " << count["diverges"]
           << ", \"inputs_consistent\": " << count["consistent"]
           << ", \"inputs_undetermined\": " << count["undetermined"] << ", \"inputs\": " << S
           << ", \"reason\": \"" << v.reason << "\"}";
      }
    }
    // Mean ROI x layer (fMRI) or latency-curve (MEG) tables across inputs.
    for (const auto& k :
         same_layers ? std::vector<std::string>(kinds, kinds + 3) : std::vector<std::string>{}) {
      const std::string path = "/" + mod + "/" + k + "/group_r";
      if (!files[0].exists(path))
        continue;
      const auto shape = files[0].dataset(path).shape();
      std::vector<double> mean(static_cast<size_t>(shape[0] * shape[1]), 0.0);
      for (size_t i = 0; i < S; ++i) {
        auto ds = files[i].dataset(path);
        if (ds.shape() != shape)
          throw UsageError(o.stats[i] + "/stats.h5: " + path + " has another shape than in " +
                           o.stats[0] + " (different ROIs or times?)");
        const auto g = ds.read_all<double>();
        for (size_t j = 0; j < g.size(); ++j)
          mean[j] += g[j] / double(S);
      }
      f.write_small("/" + mod + "/" + k + "/group_r_mean", mean, shape);
    }
    if (same_layers)
      f.set_attr("/" + mod, "layers", layers);
    js << ",\n    \"same_layers\": " << (same_layers ? "true" : "false") << "\n  }";
  }
  js << "\n}\n";
  out.commit();
  if (mpi::rank(comm) == 0) {
    write_file_atomically(o.out + "/aggregate.json", js.str());
    write_file_atomically(o.out + "/aggregate.csv", csv.str());
  }
  GM_CHECK_MPI(MPI_Barrier(comm));
  GM_INFO("aggregate: " << S << " inputs -> " << o.out << "/aggregate.{h5,json,csv}");
}

} // namespace gradmap::stats
