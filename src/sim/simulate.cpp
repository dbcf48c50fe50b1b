// `gradmap simulate` (docs/design.md "Simulation"): the built-in dataset and the test oracle.
//
// 1. Stimuli: image i is rendered from Philox(seed, i); images are dealt to ranks in chunks of
//    kChunk so that every chunk goes through the network as the same batch whatever the number
//    of ranks (per-image features then match bit for bit).
// 2. Features: pooled activations and gradients (cross-entropy on the category labels) of every
//    layer of the reference network, gathered on all ranks and z-scored over images.
// 3. fMRI: voxel v belongs to an ROI with a hierarchy level; its signal is a random projection
//    (weights from Philox(seed, v)) of the z-scored features of its planted layer, standardised
//    over images; response = sqrt(snr) * signal + N(0, 1) noise, per trial.
// 4. MEG: each (kind, layer) drives a latent image signal expressed at a planted latency with a
//    Gaussian time course, mixed into sensors by random weights.
// Ranks split voxels (fMRI) and sensors (MEG) and write their column blocks collectively.
#include "gradmap/sim/simulate.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/text.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/model/features.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "gradmap/sim/philox.hpp"
#include "gradmap/sim/stimuli.hpp"

namespace gradmap::sim {
namespace {

constexpr std::int64_t kChunk = 16;     // images per network batch (fixed: rank-independent)
constexpr double kLatencySigma = 0.025; // s, widest MEG response time course

struct Matrix { // row-major [rows, cols], double
  std::int64_t rows = 0, cols = 0;
  std::vector<double> v;
};

// All features of all images on every rank, z-scored per column over images.
struct Features {
  std::vector<std::string> layers;
  std::vector<Matrix> kind[2];
};

std::string path_join(const std::string& dir, const std::string& name) {
  return dir.empty() ? name : (dir.back() == '/' ? dir + name : dir + "/" + name);
}

Matrix zscore(const std::vector<float>& x, std::int64_t rows, std::int64_t cols) {
  Matrix m{rows, cols, std::vector<double>(x.begin(), x.end())};
  for (std::int64_t c = 0; c < cols; ++c) {
    double mean = 0, var = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      mean += m.v[r * cols + c];
    mean /= double(rows);
    for (std::int64_t r = 0; r < rows; ++r)
      var += (m.v[r * cols + c] - mean) * (m.v[r * cols + c] - mean);
    const double sd = std::sqrt(var / double(rows));
    for (std::int64_t r = 0; r < rows; ++r)
      m.v[r * cols + c] = sd > 1e-12 ? (m.v[r * cols + c] - mean) / sd : 0.0;
  }
  return m;
}

// s = Z w with w ~ N(0, I) from rng, standardised to mean 0 and variance 1 over images.
std::vector<double> project(const Matrix& z, Philox rng) {
  std::vector<double> w(static_cast<size_t>(z.cols));
  for (auto& x : w)
    x = rng.normal();
  std::vector<double> s(static_cast<size_t>(z.rows), 0.0);
  for (std::int64_t r = 0; r < z.rows; ++r) {
    const double* row = &z.v[r * z.cols];
    double acc = 0;
    for (std::int64_t c = 0; c < z.cols; ++c)
      acc += row[c] * w[c];
    s[r] = acc;
  }
  double mean = std::accumulate(s.begin(), s.end(), 0.0) / double(s.size()), var = 0;
  for (double x : s)
    var += (x - mean) * (x - mean);
  const double sd = std::sqrt(var / double(s.size()));
  for (double& x : s)
    x = sd > 0 ? (x - mean) / sd : 0.0;
  return s;
}

// The part of the latent u (z-scored, length N) that the other layers' features cannot predict:
// u - O (O^T O + alpha I)^{-1} O^T u, O = [Z_m for m != skip] (z-scored columns), re-standardised.
// Plain loops in a fixed order (no threaded BLAS), so every rank count gives the same bits. Used
// for the MEG latents: the features of a small network's layers predict each other too well for a
// layer's latency to be identifiable otherwise (docs/simulation.md).
std::vector<double> layer_specific(std::vector<double> u, const std::vector<Matrix>& layers,
                                   size_t skip) {
  std::vector<const Matrix*> others;
  std::int64_t P = 0;
  for (size_t m = 0; m < layers.size(); ++m)
    if (m != skip) {
      others.push_back(&layers[m]);
      P += layers[m].cols;
    }
  const std::int64_t N = static_cast<std::int64_t>(u.size());
  if (P == 0)
    return u;
  std::vector<double> row(static_cast<size_t>(P)), g(static_cast<size_t>(P * P), 0.0),
      b(static_cast<size_t>(P), 0.0);
  auto fill_row = [&](std::int64_t r) {
    std::int64_t c0 = 0;
    for (const Matrix* m : others) {
      std::copy_n(&m->v[static_cast<size_t>(r * m->cols)], m->cols, &row[c0]);
      c0 += m->cols;
    }
  };
  for (std::int64_t r = 0; r < N; ++r) { // G = O^T O (upper triangle), b = O^T u
    fill_row(r);
    for (std::int64_t i = 0; i < P; ++i) {
      const double x = row[i];
      b[i] += x * u[r];
      for (std::int64_t j = i; j < P; ++j)
        g[i * P + j] += x * row[j];
    }
  }
  // Ridge residual for penalty alpha: solve (G + alpha I) x = b by Cholesky, r = u - O x.
  auto residual = [&](double alpha) {
    std::vector<double> R = g, x = b, res(u);
    for (std::int64_t i = 0; i < P; ++i)
      R[i * P + i] += alpha;
    for (std::int64_t j = 0; j < P; ++j) { // R^T R = G + alpha I, R upper, in place
      double d = R[j * P + j];
      for (std::int64_t k = 0; k < j; ++k)
        d -= R[k * P + j] * R[k * P + j];
      d = std::sqrt(d);
      R[j * P + j] = d;
      for (std::int64_t i = j + 1; i < P; ++i) {
        double v = R[j * P + i];
        for (std::int64_t k = 0; k < j; ++k)
          v -= R[k * P + j] * R[k * P + i];
        R[j * P + i] = v / d;
      }
    }
    for (std::int64_t i = 0; i < P; ++i) { // R^T y = b
      double v = x[i];
      for (std::int64_t k = 0; k < i; ++k)
        v -= R[k * P + i] * x[k];
      x[i] = v / R[i * P + i];
    }
    for (std::int64_t i = P - 1; i >= 0; --i) { // R x = y
      double v = x[i];
      for (std::int64_t k = i + 1; k < P; ++k)
        v -= R[i * P + k] * x[k];
      x[i] = v / R[i * P + i];
    }
    for (std::int64_t r = 0; r < N; ++r) {
      fill_row(r);
      double fit = 0;
      for (std::int64_t i = 0; i < P; ++i)
        fit += row[i] * x[i];
      res[r] -= fit;
    }
    return res;
  };
  // alpha = 0.2 N, raised 4x at a time while less than 1% of u's variance is left (a
  // layer its neighbours predict almost exactly, like the top layer's gradient).
  std::vector<double> res;
  double kept = 0;
  for (double alpha = 0.2 * double(N); kept < 0.01 && alpha < 1e6 * double(N); alpha *= 4) {
    res = residual(alpha);
    double mean = 0, var = 0;
    for (double x : res)
      mean += x;
    mean /= double(N);
    for (double x : res)
      var += (x - mean) * (x - mean);
    kept = var / double(N); // u has unit variance
  }
  double mean = 0;
  for (double x : res)
    mean += x;
  mean /= double(N);
  for (double& x : res)
    x = kept > 0 ? (x - mean) / std::sqrt(kept) : 0.0;
  return res;
}

// Fisher-Yates shuffle of [0, n) from rng.
std::vector<std::int64_t> permutation(std::int64_t n, Philox rng) {
  std::vector<std::int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  for (std::int64_t i = n - 1; i > 0; --i)
    std::swap(p[i], p[rng.below(std::uint32_t(i + 1))]);
  return p;
}

struct Design {
  std::vector<std::int64_t> trial_stimulus; // [trials]
  std::vector<std::int64_t> test_stimuli;   // sorted
};

std::int64_t trial_count(const SimulateOptions& o) {
  return (o.images - o.test_images) * o.repetitions +
         o.test_images * o.test_repetitions_or_repetitions();
}

// Every image shown `repetitions` times (test images `test_repetitions` times), in random order.
// The pool lists repetition r of every image that has one, r = 0, 1, ...; with equal counts its
// element k is image k mod images.
Design make_design(const SimulateOptions& o) {
  Design d;
  auto pick = permutation(o.images, Philox(o.seed, Stream::design, 1));
  d.test_stimuli.assign(pick.begin(), pick.begin() + o.test_images);
  std::sort(d.test_stimuli.begin(), d.test_stimuli.end());
  std::vector<std::int64_t> shown(static_cast<size_t>(o.images), o.repetitions);
  for (std::int64_t i : d.test_stimuli)
    shown[i] = o.test_repetitions_or_repetitions();
  const std::int64_t most = *std::max_element(shown.begin(), shown.end());
  std::vector<std::int64_t> pool;
  pool.reserve(static_cast<size_t>(trial_count(o)));
  for (std::int64_t r = 0; r < most; ++r)
    for (std::int64_t i = 0; i < o.images; ++i)
      if (r < shown[i])
        pool.push_back(i);
  const auto order = permutation(std::int64_t(pool.size()), Philox(o.seed, Stream::design, 0));
  d.trial_stimulus.resize(pool.size());
  for (size_t t = 0; t < pool.size(); ++t)
    d.trial_stimulus[t] = pool[order[t]];
  return d;
}

// ------------------------------------------------------------------------- stimuli+features

// Collective (the same verdict on every rank). Refuses, before the feature pass, a configuration
// whose per-rank peak exceeds the budget, naming the option that drives it: the features of
// every image (2 kinds, float64, on every rank, plus the float32 gather of the widest layer),
// this rank's images, and the larger of the fMRI round (trials x voxel-chunk float32) and the
// MEG block (1024 trials x this rank's sensors x times float32).
void preflight(const SimulateOptions& o, const std::vector<std::int64_t>& dims, MPI_Comm comm) {
  const int p = mpi::size(comm);
  const double n = double(o.images), trials = double(trial_count(o));
  double sum_d = 0, max_d = 0;
  for (auto d : dims) {
    sum_d += double(d);
    max_d = std::max(max_d, double(d));
  }
  const double features = n * sum_d * 2 * 8 + n * max_d * 12;
  const double images = std::ceil(n / p) * double(o.image_size * o.image_size * 3);
  const bool fmri = o.modality != "meg", meg = o.modality != "fmri";
  const double voxels_here =
      std::min<double>(double(o.voxel_chunk), std::ceil(double(o.voxels) / p));
  const double fmri_round = fmri ? trials * voxels_here * 4 : 0;
  const double meg_block =
      meg ? std::min(trials, 1024.0) * std::ceil(double(o.sensors) / p) * double(o.times) * 4 : 0;
  const double need = features + images + std::max(fmri_round, meg_block);
  const double budget =
      o.memory_gb > 0 ? o.memory_gb * double(1 << 30) : default_memory_budget(mpi::node_size(comm));
  if (mpi::all_of(comm, need <= budget))
    return;
  std::string remedy;
  if (fmri_round >= features && fmri_round >= meg_block)
    remedy = "lower --voxel-chunk (now " + std::to_string(o.voxel_chunk) + ")";
  else if (meg_block > features)
    remedy =
        "run more ranks (each generates a block of the " + std::to_string(o.sensors) + " sensors)";
  else
    remedy = "lower --images, or use a reference network (--model) with fewer or narrower "
             "layers, or fewer ranks per node";
  throw UsageError("simulate needs about " + format_bytes(need) + " per rank (features of " +
                   std::to_string(o.images) + " images x " + std::to_string(std::int64_t(sum_d)) +
                   " dimensions x 2 kinds: " + format_bytes(features) + "; fMRI round: " +
                   format_bytes(fmri_round) + "; MEG block: " + format_bytes(meg_block) +
                   ") but the budget is " + format_bytes(budget) +
                   " (--memory-gb; default 80% of the node's memory over its ranks): " + remedy +
                   ", or raise --memory-gb");
}

Features make_stimuli(const SimulateOptions& o, MPI_Comm comm) {
  StageTimer timer("simulate.stimuli");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  const std::int64_t n = o.images, s = o.image_size, px = s * s * 3;
  const mpi::Block mine = mpi::chunked_block_of(n, kChunk, p, me);
  std::vector<std::uint8_t> images(static_cast<size_t>(mine.size() * px));
  std::vector<std::int64_t> labels(static_cast<size_t>(mine.size())), ids(labels.size());
  for (std::int64_t i = mine.begin; i < mine.end; ++i) {
    labels[i - mine.begin] = render_stimulus(o.seed, i, int(s), &images[(i - mine.begin) * px]);
    ids[i - mine.begin] = i;
  }

  model::ExtractorOptions xo;
  xo.model = o.model;
  xo.threads = o.threads;
  xo.probe_height = xo.probe_width = s;
  std::unique_ptr<model::FeatureExtractor> fx;
  mpi::collective_check(comm, [&] { fx = std::make_unique<model::FeatureExtractor>(xo); });
  const auto& dims = fx->layer_dims();
  const size_t L = dims.size();
  preflight(o, dims, comm);
  std::vector<std::vector<float>> local[2];
  local[0].resize(L);
  local[1].resize(L);
  Progress progress("simulate: features", mine.size(), "images",
                    mine.size() > 0 ? double(n) / double(mine.size()) : 1.0);
  for (std::int64_t b = mine.begin; b < mine.end; b += kChunk) {
    const std::int64_t nb = std::min(kChunk, mine.end - b);
    auto bf = fx->run(&images[(b - mine.begin) * px], nb, s, s, &labels[b - mine.begin],
                      &ids[b - mine.begin]);
    for (size_t l = 0; l < L; ++l) {
      local[0][l].insert(local[0][l].end(), bf.activations[l].begin(), bf.activations[l].end());
      local[1][l].insert(local[1][l].end(), bf.gradients[l].begin(), bf.gradients[l].end());
    }
    progress.advance(nb);
  }
  progress.finish();

  // stimuli.h5: each rank writes its block of rows.
  const std::string path = path_join(o.out_dir, "stimuli.h5");
  io::StimuliWriter out(path, n, s, s, "gradmap simulate", comm);
  const io::File& f = out.file();
  f.set_attr("/stimuli", "seed", static_cast<std::int64_t>(o.seed));
  f.set_attr("/stimuli", "label_names", stimulus_category_names());
  out.images().write_rows(images, mine.begin);
  std::vector<std::int64_t> all_ids(static_cast<size_t>(n));
  std::iota(all_ids.begin(), all_ids.end(), std::int64_t{0});
  out.write_ids(all_ids);
  f.create_dataset("/stimuli/labels", io::DType::i64, {n}).write_rows(labels, mine.begin);
  out.commit();
  GM_INFO("simulate: wrote " << path << " (" << n << " images of " << s << "x" << s << ")");

  Features feats;
  feats.layers = fx->layer_names();
  for (int k = 0; k < 2; ++k)
    for (size_t l = 0; l < L; ++l) {
      auto all = mpi::allgatherv(comm, local[k][l]);
      feats.kind[k].push_back(zscore(all, n, dims[l]));
    }
  return feats;
}

void write_common(const io::File& f, const SimulateOptions& o, const Design& d,
                  const std::string& modality, const std::vector<std::string>& layers) {
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "modality", modality);
  f.create_group("/brain");
  f.create_group("/truth");
  f.write_small("/brain/trial_stimulus", d.trial_stimulus,
                {static_cast<std::int64_t>(d.trial_stimulus.size())});
  f.write_small("/brain/test_stimuli", d.test_stimuli,
                {static_cast<std::int64_t>(d.test_stimuli.size())});
  f.set_attr("/truth", "model", o.model);
  f.set_attr("/truth", "objective", std::string("cross-entropy"));
  f.set_attr("/truth", "labels", std::string("stimuli"));
  f.set_attr("/truth", "pooling", std::string("mean"));
  f.set_attr("/truth", "scenario", o.scenario);
  f.set_attr("/truth", "seed", static_cast<std::int64_t>(o.seed));
  f.set_attr("/truth", "noise_seed", static_cast<std::int64_t>(o.noise_seed_or_seed()));
  f.set_attr("/truth", "layers", layers);
  f.set_attr("/truth", "snr", std::vector<double>{modality == "fmri" ? o.snr : o.meg_snr});
  f.set_attr("/truth", "gradient_share", std::vector<double>{o.gradient_share});
}

// ---------------------------------------------------------------------------------- fMRI

struct Roi {
  const char* name;
  int level;
  double share;
};
const Roi kRois[] = {{"V1", 1, 0.20},      {"V2", 2, 0.17},      {"V3", 3, 0.15},
                     {"hV4", 4, 0.12},     {"ventral", 5, 0.12}, {"lateral", 5, 0.12},
                     {"parietal", 5, 0.12}};
constexpr int kNumRois = sizeof(kRois) / sizeof(kRois[0]);

// ROI of each voxel: contiguous runs in ROI order with sizes proportional to the shares.
std::vector<std::int32_t> assign_rois(std::int64_t v) {
  std::vector<std::int32_t> roi(static_cast<size_t>(v));
  double cum = 0;
  std::int64_t start = 0;
  for (int r = 0; r < kNumRois; ++r) {
    cum += kRois[r].share;
    const std::int64_t end =
        r == kNumRois - 1 ? v : std::min<std::int64_t>(v, std::llround(cum * v));
    for (std::int64_t i = start; i < end; ++i)
      roi[i] = r;
    start = end;
  }
  return roi;
}

// The planted answer of the fMRI brain (cheap metadata, identical on all ranks): each voxel's
// ROI, its activation and gradient layers (-1: none) and whether it is pure noise.
struct FmriTruth {
  std::vector<std::int32_t> roi, layer_act, layer_grad;
  std::vector<std::uint8_t> noise;
  std::vector<std::int32_t> roi_layer_act, roi_layer_grad; ///< [kNumRois]
};

FmriTruth plant_fmri(const SimulateOptions& o, int L) {
  const std::int64_t V = o.voxels;
  const int top_level = 5;
  FmriTruth tr;
  tr.roi = assign_rois(V);
  tr.layer_act.assign(V, -1);
  tr.layer_grad.assign(V, -1);
  tr.noise.assign(V, 0);
  tr.roi_layer_act.assign(kNumRois, 0);
  tr.roi_layer_grad.assign(kNumRois, -1);
  auto& roi = tr.roi;
  auto &layer_act = tr.layer_act, &layer_grad = tr.layer_grad;
  auto& noise = tr.noise;
  auto &roi_layer_act = tr.roi_layer_act, &roi_layer_grad = tr.roi_layer_grad;
  for (int r = 0; r < kNumRois; ++r) {
    // Activations follow the hierarchy: level 1 -> first layer ... top level -> last layer.
    roi_layer_act[r] = static_cast<std::int32_t>(
        std::lround(double(kRois[r].level - 1) / double(top_level - 1) * double(L - 1)));
    if (o.scenario == "aligned")
      roi_layer_grad[r] = roi_layer_act[r];
  }
  if (o.scenario == "misaligned") {
    // Gradient signal only in the high-level areas, with layers unrelated to the hierarchy.
    roi_layer_grad[4] = L - 1;
    roi_layer_grad[5] = 0;
    roi_layer_grad[6] = L / 2;
  }
  for (std::int64_t v = 0; v < V; ++v) {
    Philox rng(o.seed, Stream::voxel, std::uint32_t(v), 0);
    const bool is_noise = o.scenario == "null" || rng.uniform() < o.noise_fraction;
    const double u = rng.uniform();
    noise[v] = is_noise ? 1 : 0;
    if (is_noise)
      continue;
    const int jitter = u < 0.1 ? -1 : (u < 0.2 ? 1 : 0);
    layer_act[v] = std::clamp(roi_layer_act[roi[v]] + jitter, 0, L - 1);
    if (roi_layer_grad[roi[v]] >= 0) {
      const int k = o.gradient_shift, a = layer_act[v];
      layer_grad[v] = o.scenario != "aligned" ? roi_layer_grad[roi[v]] : a + k < L ? a + k : a - k;
    }
  }

  return tr;
}

void simulate_fmri(const SimulateOptions& o, const Features& feats, const Design& d,
                   MPI_Comm comm) {
  StageTimer timer("simulate.fmri");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  const std::int64_t V = o.voxels, T = static_cast<std::int64_t>(d.trial_stimulus.size());
  const int L = static_cast<int>(feats.layers.size());

  // Planted answer for every voxel (cheap metadata, identical on all ranks).
  const FmriTruth tr = plant_fmri(o, L);
  const auto& roi = tr.roi;
  const auto &layer_act = tr.layer_act, &layer_grad = tr.layer_grad;
  const auto& noise = tr.noise;

  // Voxel grid: ROIs are slabs along j (posterior -> anterior), 1.8 mm isotropic.
  const std::int64_t nx = 16, nz = 8, ny = (V + nx * nz - 1) / (nx * nz);
  std::vector<std::int32_t> ijk(static_cast<size_t>(V * 3));
  for (std::int64_t v = 0; v < V; ++v) {
    ijk[v * 3 + 0] = std::int32_t(v % nx);
    ijk[v * 3 + 1] = std::int32_t(v / (nx * nz));
    ijk[v * 3 + 2] = std::int32_t((v / nx) % nz);
  }
  const std::vector<double> affine = {1.8, 0, 0,   -0.9 * nx, 0, 1.8, 0, -0.9 * ny - 60.0,
                                      0,   0, 1.8, -0.9 * nz, 0, 0,   0, 1};

  const std::string path = path_join(o.out_dir, "brain_fmri.h5");
  io::OutputFile out(path, comm);
  const io::File& f = out.file();
  write_common(f, o, d, "fmri", feats.layers);
  std::vector<std::string> roi_names;
  std::vector<std::int32_t> roi_level;
  for (const auto& r : kRois) {
    roi_names.emplace_back(r.name);
    roi_level.push_back(r.level);
  }
  f.write_small("/brain/roi", roi, {V});
  f.write_strings("/brain/roi_names", roi_names);
  f.write_small("/brain/roi_level", roi_level, {kNumRois});
  f.write_small("/brain/voxel_ijk", ijk, {V, 3});
  f.set_attr("/brain", "volume_shape", std::vector<std::int64_t>{nx, ny, nz});
  f.set_attr("/brain", "affine", affine);
  f.write_small("/truth/layer_activations", layer_act, {V});
  f.write_small("/truth/layer_gradients", layer_grad, {V});
  f.write_small("/truth/noise_target", noise, {V});
  f.write_small("/truth/roi_layer_activations", tr.roi_layer_act, {kNumRois});
  f.write_small("/truth/roi_layer_gradients", tr.roi_layer_grad, {kNumRois});

  // Responses [trials, voxels]: this rank's voxel block, in rounds of voxel_chunk columns.
  auto ds = f.create_dataset("/brain/responses", io::DType::f32, {T, V}, {256, 256});
  const mpi::Block mine = mpi::block_of(V, p, me);
  std::int64_t rounds = (mine.size() + o.voxel_chunk - 1) / o.voxel_chunk;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &rounds, 1, MPI_INT64_T, MPI_MAX, comm));
  const double amp = std::sqrt(o.snr), share = o.gradient_share;
  Progress progress("simulate: fMRI", mine.size(), "voxels",
                    mine.size() > 0 ? double(V) / double(mine.size()) : 1.0);
  std::vector<float> buf;
  for (std::int64_t rd = 0; rd < rounds; ++rd) {
    const std::int64_t c0 = std::min(mine.end, mine.begin + rd * o.voxel_chunk);
    const std::int64_t c1 = std::min(mine.end, c0 + o.voxel_chunk), nc = c1 - c0;
    buf.assign(static_cast<size_t>(T * nc), 0.0f);
    for (std::int64_t v = c0; v < c1; ++v) {
      std::vector<double> sig;
      if (!noise[v]) {
        sig = project(feats.kind[0][layer_act[v]],
                      Philox(o.seed, Stream::voxel, std::uint32_t(v), 1));
        if (layer_grad[v] >= 0) {
          const auto g = project(feats.kind[1][layer_grad[v]],
                                 Philox(o.seed, Stream::voxel, std::uint32_t(v), 2));
          for (size_t i = 0; i < sig.size(); ++i)
            sig[i] = std::sqrt(1 - share) * sig[i] + std::sqrt(share) * g[i];
        }
      }
      Philox nrng(o.noise_seed_or_seed(), Stream::fmri_noise, std::uint32_t(v), 0);
      for (std::int64_t t = 0; t < T; ++t) {
        const double s = sig.empty() ? 0.0 : amp * sig[d.trial_stimulus[t]];
        buf[t * nc + (v - c0)] = static_cast<float>(s + nrng.normal());
      }
      progress.advance();
    }
    ds.write(buf.data(), {0, c0}, {nc > 0 ? T : 0, nc});
  }
  progress.finish();
  out.commit();
  GM_INFO("simulate: wrote " << path << " (" << T << " trials x " << V << " voxels, scenario "
                             << o.scenario << ")");
}

// ----------------------------------------------------------------------------------- MEG

// The planted MEG model (identical on all ranks): latencies per (kind, layer) (NaN: no signal),
// the latent image signal of each (kind, layer), its Gaussian time course (bump) and each
// sensor's mixing weights; c = kind * L + layer indexes the 2 L components.
struct MegModel {
  std::vector<double> lat[2];              ///< [L] latencies (s) of activations, gradients
  std::vector<std::vector<double>> latent; ///< [2 L][images]; empty: no signal
  std::vector<double> bump;                ///< [2 L, times]
  std::vector<double> weights;             ///< [sensors, 2 L]
  std::vector<std::uint8_t> noise;         ///< [sensors] pure-noise sensors
};

// Planted latencies (s), spread over the post-stimulus part of the epoch [t0, t1] =
// [0.05, tmax - 0.05] (the whole epoch if that is under 4 samples): the forward sweep for
// activations on its first 45%; for gradients the last 45%, either in the forward order
// (misaligned) or top-down (aligned). The time courses are Gaussians of width sigma = 0.35 x the
// latency spacing (at most 25 ms), so that each layer's latent dominates the response at its own
// latency.
// Returns sigma.
double plant_latencies(const SimulateOptions& o, int L, const std::vector<double>& times,
                       MegModel& m) {
  auto& lat = m.lat;
  const bool short_epoch = times.back() - 0.05 - 0.05 < 4.0 / o.sfreq; // then: the whole epoch
  const double first = short_epoch ? times.front() : 0.05,
               t1 = short_epoch ? times.back() : times.back() - 0.05;
  const double span = 0.45 * (t1 - first), step = L > 1 ? span / (L - 1) : span;
  const double sigma = std::min(kLatencySigma, 0.35 * step);
  lat[0].assign(L, NAN);
  lat[1].assign(L, NAN);
  if (o.scenario != "null")
    for (int l = 0; l < L; ++l) {
      lat[0][l] = first + step * l;
      if (o.scenario == "activations-only") // that brain carries no learning signal at all
        continue;
      lat[1][l] = t1 - span + step * (o.scenario == "aligned" ? (L - 1 - l) : l);
      if (o.scenario == "aligned" && o.gradient_timing == "flat")
        lat[1][l] = t1 - span / 2; // slope 0: the boundary of both time claims
      else if (o.scenario == "aligned" && o.gradient_timing == "gap0")
        lat[1][l] = first + step * (L - 1) + step * (L - 1 - l); // gap 0, top-down below it
    }
  return sigma;
}

// Latent image signal of each (kind, layer) and its time course, then each sensor's mixing
// weights (unit norm).
MegModel plant_meg(const SimulateOptions& o, const Features& feats,
                   const std::vector<double>& times) {
  const std::int64_t S = o.sensors, NT = o.times;
  const int L = static_cast<int>(feats.layers.size());
  MegModel m;
  const double sigma = plant_latencies(o, L, times, m);
  const auto& lat = m.lat;
  auto& latent = m.latent;
  latent.resize(static_cast<size_t>(2 * L));
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < L; ++l)
      if (!std::isnan(lat[k][l]))
        latent[k * L + l] =
            layer_specific(project(feats.kind[k][l], Philox(o.seed, Stream::sensor, 1u << 20,
                                                            std::uint32_t(k * L + l))),
                           feats.kind[k], static_cast<size_t>(l));
  auto& bump = m.bump;
  bump.assign(static_cast<size_t>(2 * L * NT), 0.0);
  for (int c = 0; c < 2 * L; ++c)
    for (std::int64_t k = 0; k < NT && !latent[c].empty(); ++k) {
      const double z = (times[k] - lat[c / L][c % L]) / sigma;
      bump[c * NT + k] = std::exp(-0.5 * z * z);
    }
  // Sensor mixing weights, scaled per sensor so that its signal variance at its peak time,
  // max_t sum_c (w_c bump_c(t))^2 (latents treated as independent), is 1: meg_snr is then the
  // signal-to-noise variance ratio at the response peak.
  auto& weights = m.weights;
  weights.assign(static_cast<size_t>(S * 2 * L), 0.0);
  auto& noise = m.noise;
  noise.assign(static_cast<size_t>(S), 0);
  for (std::int64_t s = 0; s < S; ++s) {
    Philox rng(o.seed, Stream::sensor, std::uint32_t(s), 0);
    noise[s] = (o.scenario == "null" || rng.uniform() < o.noise_fraction) ? 1 : 0;
    double* w = &weights[s * 2 * L];
    for (int c = 0; c < 2 * L; ++c) {
      const double x = rng.normal();
      w[c] = (!noise[s] && !latent[c].empty()) ? x : 0.0;
    }
    double peak = 0;
    for (std::int64_t k = 0; k < NT; ++k) {
      double v = 0;
      for (int c = 0; c < 2 * L; ++c)
        v += w[c] * w[c] * bump[c * NT + k] * bump[c * NT + k];
      peak = std::max(peak, v);
    }
    for (int c = 0; c < 2 * L && peak > 0; ++c)
      w[c] /= std::sqrt(peak);
  }
  return m;
}

void simulate_meg(const SimulateOptions& o, const Features& feats, const Design& d, MPI_Comm comm) {
  StageTimer timer("simulate.meg");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  const std::int64_t S = o.sensors, NT = o.times,
                     T = static_cast<std::int64_t>(d.trial_stimulus.size());
  const int L = static_cast<int>(feats.layers.size());
  std::vector<double> times(static_cast<size_t>(NT));
  for (std::int64_t k = 0; k < NT; ++k)
    times[k] = o.tmin + double(k) / o.sfreq;
  const MegModel m = plant_meg(o, feats, times);
  const auto& lat = m.lat;
  const auto& latent = m.latent;
  const auto &bump = m.bump, &weights = m.weights;
  const auto& noise = m.noise;

  const std::string path = path_join(o.out_dir, "brain_meg.h5");
  io::OutputFile out(path, comm);
  const io::File& f = out.file();
  write_common(f, o, d, "meg", feats.layers);
  std::vector<std::string> names;
  for (std::int64_t s = 0; s < S; ++s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "MEG%03lld", static_cast<long long>(s + 1));
    names.emplace_back(buf);
  }
  f.write_small("/brain/times", times, {NT});
  f.write_strings("/brain/sensor_names", names);
  f.set_attr("/brain", "sfreq", std::vector<double>{o.sfreq});
  f.write_small("/truth/latency_activations", lat[0], {L});
  f.write_small("/truth/latency_gradients", lat[1], {L});
  f.write_small("/truth/noise_target", noise, {S});
  f.write_small("/truth/sensor_weights", weights, {S, 2 * L});

  auto ds = f.create_dataset("/brain/responses", io::DType::f32, {T, S, NT}, {64, 1, NT});
  const mpi::Block mine = mpi::block_of(S, p, me);
  const double amp = std::sqrt(o.meg_snr);
  const std::int64_t trial_chunk = 1024;
  Progress progress("simulate: MEG", T, "trials");
  std::vector<float> buf;
  for (std::int64_t t0 = 0; t0 < T; t0 += trial_chunk) {
    const std::int64_t nt = std::min(trial_chunk, T - t0), ns = mine.size();
    buf.assign(static_cast<size_t>(nt * ns * NT), 0.0f);
    for (std::int64_t t = t0; t < t0 + nt; ++t) {
      const std::int64_t img = d.trial_stimulus[t];
      for (std::int64_t s = mine.begin; s < mine.end; ++s) {
        Philox nrng(o.noise_seed_or_seed(), Stream::meg_noise, std::uint32_t(s), std::uint32_t(t));
        float* row = &buf[((t - t0) * ns + (s - mine.begin)) * NT];
        for (std::int64_t k = 0; k < NT; ++k) {
          double sig = 0;
          for (int c = 0; c < 2 * L; ++c)
            if (!latent[c].empty())
              sig += weights[s * 2 * L + c] * bump[c * NT + k] * latent[c][img];
          row[k] = static_cast<float>(amp * sig + nrng.normal());
        }
      }
    }
    ds.write(buf.data(), {t0, mine.begin, 0}, {ns > 0 ? nt : 0, ns, ns > 0 ? NT : 0});
    progress.advance(nt);
  }
  progress.finish();
  out.commit();
  GM_INFO("simulate: wrote " << path << " (" << T << " trials x " << S << " sensors x " << NT
                             << " times, scenario " << o.scenario << ")");
}

} // namespace

void validate(const SimulateOptions& o) {
  auto bad = [](const std::string& opt, const std::string& why) {
    throw UsageError("--" + opt + ": " + why);
  };
  if (o.out_dir.empty())
    bad("out", "an output directory is required");
  if (o.scenario != "misaligned" && o.scenario != "aligned" && o.scenario != "null" &&
      o.scenario != "activations-only")
    bad("scenario",
        "must be misaligned, aligned, activations-only or null, not '" + o.scenario + "'");
  if (o.gradient_timing != "top-down" && o.gradient_timing != "flat" && o.gradient_timing != "gap0")
    bad("gradient-timing", "must be top-down, flat or gap0, not '" + o.gradient_timing + "'");
  if ((o.gradient_shift != 0 || o.gradient_timing != "top-down") && o.scenario != "aligned")
    bad(o.gradient_shift != 0 ? "gradient-shift" : "gradient-timing",
        "applies to --scenario aligned only");
  if (o.gradient_shift < 0)
    bad("gradient-shift", "must be >= 0");
  if (o.modality != "fmri" && o.modality != "meg" && o.modality != "both")
    bad("modality", "must be fmri, meg or both, not '" + o.modality + "'");
  if (o.images < 4)
    bad("images", "at least 4 images are needed");
  if (o.test_images < 2 || o.test_images > o.images - 2)
    bad("test-images", "must be between 2 and images - 2");
  if (o.image_size < 8 || o.image_size > 1024)
    bad("image-size", "must be between 8 and 1024 pixels");
  if (o.repetitions < 1 || o.repetitions > 100)
    bad("repetitions", "must be between 1 and 100");
  if (o.test_repetitions < 0 || o.test_repetitions > 100)
    bad("test-repetitions", "must be between 1 and 100 (0: --repetitions)");
  if (trial_count(o) > (std::int64_t(1) << 31))
    bad("repetitions", "images x repetitions exceeds 2^31 trials");
  if (o.voxels < 1)
    bad("voxels", "must be positive");
  if (o.sensors < 1)
    bad("sensors", "must be positive");
  if (o.times < 2)
    bad("times", "must be at least 2");
  if (!(o.sfreq > 0))
    bad("sfreq", "must be positive");
  if (!(o.snr >= 0) || !std::isfinite(o.snr))
    bad("snr", "must be a finite non-negative number");
  if (!(o.meg_snr >= 0) || !std::isfinite(o.meg_snr))
    bad("meg-snr", "must be a finite non-negative number");
  if (!(o.noise_fraction >= 0 && o.noise_fraction <= 1))
    bad("noise-fraction", "must be in [0, 1]");
  if (!(o.gradient_share >= 0 && o.gradient_share <= 1))
    bad("gradient-share", "must be in [0, 1]");
  if (o.voxel_chunk < 1)
    bad("voxel-chunk", "must be positive");
  if (!(o.memory_gb >= 0))
    bad("memory-gb", "must be >= 0 (0: the default budget)");
}

void simulate(const SimulateOptions& o, MPI_Comm comm) {
  validate(o);
  GM_INFO("simulate: scenario " << o.scenario << ", seed " << o.seed << ", " << o.images
                                << " images, modality " << o.modality << ", " << mpi::size(comm)
                                << " ranks");
  const Features feats = make_stimuli(o, comm);
  const Design design = make_design(o);
  if (o.modality == "fmri" || o.modality == "both")
    simulate_fmri(o, feats, design, comm);
  if (o.modality == "meg" || o.modality == "both")
    simulate_meg(o, feats, design, comm);
}

} // namespace gradmap::sim
