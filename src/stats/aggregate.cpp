// gradmap aggregate: see aggregate.hpp.
#include "gradmap/stats/aggregate.hpp"

#include <boost/math/distributions/students_t.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>
#include <tuple>

#include "gradmap/core/error.hpp"
#include "gradmap/core/json.hpp"
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

namespace {

void check_options(const AggregateOptions& o) {
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
}

// The --label values, or each directory's last path component.
std::vector<std::string> input_labels(const AggregateOptions& o) {
  std::vector<std::string> labels = o.labels;
  for (size_t i = 0; labels.size() < o.stats.size(); ++i) {
    std::string d = o.stats[i];
    while (d.size() > 1 && d.back() == '/')
      d.pop_back();
    labels.push_back(d.substr(d.find_last_of('/') + 1));
  }
  return labels;
}

// The inputs: their stats.h5 files, open on comm, and their labels.
struct Inputs {
  const AggregateOptions& o;
  std::vector<std::string> labels;
  std::vector<io::File> files;
  size_t size() const { return files.size(); }
};

const std::string kKinds[3] = {"activations", "gradients", "unique_gradients"};

// One modality's group of aggregate.h5, entries of aggregate.json and rows of aggregate.csv.
struct ModalityOut {
  const io::File& f;
  JsonWriter& js;
  std::ostringstream& csv;
};

// A headline statistic across the inputs: its values, their mean and t interval and the
// sign-flip p-value.
struct Headline {
  std::string name, path; // aggregate.json's name, the dataset in stats.h5
  std::vector<double> values;
  double mean = kNaN, lo = kNaN, hi = kNaN, p = kNaN;
  size_t n = 0; // finite values
};

// The headline statistics every input's stats.h5 has (as the first input shows).
std::vector<Headline> headline_entries(const io::File& first, const std::string& mod) {
  const bool meg = mod == "meg";
  const std::string rho = meg ? "rho_time" : "rho_space", d = meg ? "D_time" : "D_space";
  std::vector<Headline> entries;
  auto add = [&](const std::string& name, const std::string& path) {
    if (first.exists(path)) {
      entries.emplace_back();
      entries.back().name = name;
      entries.back().path = path;
    }
  };
  for (const auto& k : kKinds)
    add(rho + "_" + k, "/" + mod + "/" + k + "/" + rho);
  for (const std::string& dd : {d, d + "_unique"})
    add(dd, "/" + mod + "/" + dd);
  add("peak_layer_agreement", "/" + mod + "/peak_agreement");
  return entries;
}

// Collective (reads the inputs). Fills h's values (the first value of its dataset in each input)
// and their summaries.
void combine_headline(const Inputs& in, const std::string& mod, Headline& h) {
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in.files[i].exists(h.path))
      throw UsageError(in.o.stats[i] + "/stats.h5: " + h.path + " is missing");
    h.values.push_back(in.files[i].dataset(h.path).read_all<double>().at(0));
  }
  const auto fin = finite(h.values);
  h.n = fin.size();
  if (!fin.empty()) {
    h.mean = 0;
    for (double x : fin)
      h.mean += x / double(fin.size());
  }
  std::tie(h.lo, h.hi) = t_interval(h.values, in.o.ci);
  // H0 of the rho entries: 0 (no hierarchy). D_space / D_time are descriptive here (their
  // H0 is not 0): their group test is the combination of the per-input tests below; the
  // agreement has no null of 0.
  const std::string d = mod == "meg" ? "D_time" : "D_space";
  const bool no_sign_test =
      h.name == "peak_layer_agreement" || h.name == d || h.name == d + "_unique";
  h.p = no_sign_test ? kNaN : sign_flip_p(h.values);
}

void write_headline(const ModalityOut& out, const Inputs& in, const std::string& mod,
                    const Headline& h) {
  for (size_t i = 0; i < in.size(); ++i)
    out.csv << mod << "," << h.name << "," << in.labels[i] << "," << num(h.values[i]) << "\n";
  out.f.write_small("/" + mod + "/" + h.name + "/values", h.values, {std::int64_t(in.size())});
  out.f.write_small("/" + mod + "/" + h.name + "/summary",
                    std::vector<double>{h.mean, h.lo, h.hi, h.p}, {4});
  out.js.key(h.name).begin_object().member("mean", h.mean);
  out.js.key("ci").begin_array().value(h.lo).value(h.hi).end_array();
  out.js.member("p_sign_flip", h.p).member("n", h.n).member("values", h.values).end_object();
}

// Group inference on the divergence verdicts (docs/statistics.md, "Group level"): Fisher's
// combination of the per-input p-values of "diverges" and of the signal tests (valid for
// independent inputs whose p-values are uniform or conservative under H0: X = -2 sum ln p ~
// chi2(2S)), and the intersection-union p of "consistent in every input" (max over inputs).
// The same on the gradients' unique variance (encode --joint: D_*_unique) when every input
// has it.
struct GroupVerdict {
  std::string name; // D_space, D_time, or either with _unique
  Verdict v;
  std::map<std::string, int> count{{"diverges", 0}, {"consistent", 0}, {"undetermined", 0}};
};

// Collective (reads the inputs). The group verdict of divergence dd (its dd_tests in every
// input: p diverges, p consistent, p signal activations, p signal gradients).
GroupVerdict group_verdict(const Inputs& in, const std::string& mod, const std::string& dd,
                           double alpha) {
  const std::string tests = "/" + mod + "/" + dd + "_tests";
  const size_t S = in.size();
  GroupVerdict gv;
  gv.name = dd;
  std::vector<double> pd, pc, psa, psg;
  // Each input's p-values are floored at the resolution of its replicates, 1 / (B_b + 1)
  // (B + 1 for the permutation signal tests): a Wald p in the far tail must not carry a
  // Fisher combination alone.
  for (size_t i = 0; i < S; ++i) {
    const io::File& file = in.files[i];
    if (!file.exists(tests))
      throw UsageError(in.o.stats[i] + "/stats.h5: " + tests + " is missing");
    const auto x = file.dataset(tests).read_all<double>();
    if (x.size() != 4)
      throw UsageError(in.o.stats[i] + "/stats.h5: " + tests + " must hold 4 values");
    const auto floor_of = [&](const char* replicates) { // 0 when the count is not recorded
      return file.has_attr("/" + mod, replicates)
                 ? 1.0 / double(file.attr_int("/" + mod, replicates) + 1)
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
    gv.count[file.attr_string("/" + mod + "/" + dd, "verdict")] += 1;
  }
  Verdict& v = gv.v;
  v.p_diverges = fisher_combined_p(pd);
  v.p_consistent = *std::max_element(pc.begin(), pc.end());
  v.p_signal_activations = fisher_combined_p(psa);
  v.p_signal_gradients = fisher_combined_p(psg);
  decide(v, alpha);
  if (v.verdict == "diverges")
    v.reason = "the prediction fails in at least one of the " + std::to_string(S) + " inputs (" +
               std::to_string(gv.count["diverges"]) + " diverge on their own)";
  else if (v.verdict == "consistent")
    v.reason =
        "consistent with the prediction in every one of the " + std::to_string(S) + " inputs";
  return gv;
}

void write_group_verdict(const ModalityOut& out, const std::string& mod, const GroupVerdict& gv,
                         size_t S) {
  const Verdict& v = gv.v;
  out.f.write_small("/" + mod + "/" + gv.name + "/group_tests",
                    std::vector<double>{v.p_diverges, v.p_consistent, v.p_signal_activations,
                                        v.p_signal_gradients},
                    {4});
  out.f.set_attr("/" + mod + "/" + gv.name, "group_verdict", v.verdict);
  out.js.key(gv.name + "_group")
      .begin_object()
      .member("verdict", v.verdict)
      .member("p_diverges_fisher", v.p_diverges)
      .member("p_consistent_all", v.p_consistent)
      .member("p_signal_activations_fisher", v.p_signal_activations)
      .member("p_signal_gradients_fisher", v.p_signal_gradients)
      .member("inputs_diverges", gv.count.at("diverges"))
      .member("inputs_consistent", gv.count.at("consistent"))
      .member("inputs_undetermined", gv.count.at("undetermined"))
      .member("inputs", S)
      .member("reason", v.reason)
      .end_object();
}

// Collective. Mean ROI x layer (fMRI) or latency-curve (MEG) tables across inputs.
void write_mean_tables(const io::File& f, const Inputs& in, const std::string& mod) {
  const size_t S = in.size();
  for (const auto& k : kKinds) {
    const std::string path = "/" + mod + "/" + k + "/group_r";
    if (!in.files[0].exists(path))
      continue;
    const auto shape = in.files[0].dataset(path).shape();
    std::vector<double> mean(static_cast<size_t>(shape[0] * shape[1]), 0.0);
    for (size_t i = 0; i < S; ++i) {
      auto ds = in.files[i].dataset(path);
      if (ds.shape() != shape)
        throw UsageError(in.o.stats[i] + "/stats.h5: " + path + " has another shape than in " +
                         in.o.stats[0] + " (different ROIs or times?)");
      const auto g = ds.read_all<double>();
      for (size_t j = 0; j < g.size(); ++j)
        mean[j] += g[j] / double(S);
    }
    f.write_small("/" + mod + "/" + k + "/group_r_mean", mean, shape);
  }
}

// Collective. Whether every input has the first input's layers of modality mod.
bool same_layers(const Inputs& in, const std::string& mod) {
  const auto layers = in.files[0].attr_strings("/" + mod, "layers");
  bool same = true;
  for (size_t i = 1; i < in.size(); ++i)
    same = same && in.files[i].attr_strings("/" + mod, "layers") == layers;
  return same;
}

// Collective. One modality: the headline statistics, the group verdicts and the mean tables.
void aggregate_modality(const Inputs& in, const std::string& mod, const ModalityOut& out) {
  // Inputs from different models have different layers: their headline statistics still
  // compare, their layer tables do not.
  const bool same = same_layers(in, mod);
  if (!same)
    GM_WARN("aggregate: the inputs' " << mod << " layers differ (different models?): only the "
                                      << "headline statistics are combined, not the layer tables");
  out.js.key(mod).begin_object();
  for (Headline& h : headline_entries(in.files[0], mod)) {
    combine_headline(in, mod, h);
    write_headline(out, in, mod, h);
  }
  const std::string d = mod == "meg" ? "D_time" : "D_space";
  for (const std::string& dd : {d, d + "_unique"})
    if (in.files[0].exists("/" + mod + "/" + dd + "_tests"))
      write_group_verdict(out, mod, group_verdict(in, mod, dd, in.o.alpha), in.size());
  if (same) {
    write_mean_tables(out.f, in, mod);
    out.f.set_attr("/" + mod, "layers", in.files[0].attr_strings("/" + mod, "layers"));
  }
  out.js.member("same_layers", same).end_object();
}

} // namespace

void aggregate(const AggregateOptions& o, MPI_Comm comm) {
  check_options(o);
  Inputs in{o, input_labels(o), {}};
  const size_t S = o.stats.size();
  for (const auto& d : o.stats)
    in.files.push_back(io::File::open(d + "/stats.h5", comm));

  io::make_directories(o.out);
  io::OutputFile out(o.out + "/aggregate.h5", comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "inputs", o.stats);
  f.set_attr("/", "labels", in.labels);
  JsonWriter js;
  std::ostringstream csv;
  js.begin_object().member("inputs", in.labels).member("ci_level", o.ci);
  csv << "modality,statistic,input,value\n";
  for (const std::string mod : {"fmri", "meg"}) {
    size_t have = 0;
    for (const auto& file : in.files)
      have += file.exists("/" + mod) ? 1 : 0;
    if (have == 0)
      continue;
    if (have != S)
      throw UsageError("aggregate: only " + std::to_string(have) + " of the " + std::to_string(S) +
                       " inputs have " + mod + " statistics");
    aggregate_modality(in, mod, ModalityOut{f, js, csv});
  }
  js.end_object();
  out.commit();
  if (mpi::rank(comm) == 0) {
    write_file_atomically(o.out + "/aggregate.json", js.str());
    write_file_atomically(o.out + "/aggregate.csv", csv.str());
  }
  GM_CHECK_MPI(MPI_Barrier(comm));
  GM_INFO("aggregate: " << S << " inputs -> " << o.out << "/aggregate.{h5,json,csv}");
}

} // namespace gradmap::stats
