// gradmap extract (docs/design.md):
// 1. Validate the stimuli and build this rank's model copy (model::FeatureExtractor).
// 2. Open features.h5.partial: resume it when its fingerprint (everything that changes the
//    numbers) matches, else create it with one dataset per (kind, layer).
// 3. Images are cut into blocks of `block` images, dealt to ranks in contiguous runs. Round r:
//    every rank processes its r-th block (in batches of batch_size) unless already done, then all
//    write their rows collectively, flush, mark their blocks done, flush again.
// 4. Commit: rename features.h5.partial to features.h5.
// Per-image features do not depend on batch size or rank count: the model is in eval mode and
// the objective is a sum of per-image losses.
#include "gradmap/extract/extract.hpp"

#include <algorithm>
#include <filesystem>
#include <memory>
#include <numeric>
#include <vector>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/linalg/pca.hpp"
#include "gradmap/linalg/projection.hpp"
#include "gradmap/model/features.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::extract {
namespace {

const char* const kKinds[2] = {"activations", "gradients"};
// Philox streams (the `a` word) of the random projection (+ layer) and PCA (+ kind, layer).
constexpr std::uint32_t kProjectionStream = 1;
constexpr std::uint32_t kPcaStream = 0x10000;

// Every option of ExtractOptions, with what it changes. The resume key of the block-wise
// features (and the reuse key of the pooled features before PCA) is generated from this table, so
// an option cannot be left out of it by accident: adding a member to ExtractOptions changes its
// size and fails the static_assert below until the member is listed here.
enum class Affects { features, pca, nothing };
struct OptionField {
  const char* name;
  std::string value;
  Affects affects;
};
std::vector<OptionField> option_fields(const ExtractOptions& o) {
  using std::to_string;
  return {
      {"stimuli", o.stimuli, Affects::features},
      {"model", o.model, Affects::features},
      {"weights", o.weights, Affects::features},
      {"objective", model::name(o.objective), Affects::features},
      {"seed", to_string(o.seed), Affects::features},
      {"labels", model::name(o.labels), Affects::features},
      {"randomize_weights", to_string(o.randomize_weights), Affects::features},
      {"pooling", model::name(o.pooling), Affects::features},
      {"block", to_string(o.block), Affects::features}, // the layout of the progress record
      {"projection", to_string(o.projection), Affects::features},
      {"pca", to_string(o.pca), Affects::pca},
      {"split_from", o.split_from, Affects::pca},
      {"pca_oversample", to_string(o.pca_oversample), Affects::pca},
      {"pca_power_iterations", to_string(o.pca_power_iterations), Affects::pca},
      // Not in the key: where the output goes, and settings proven not to change the numbers
      // beyond float32 rounding (batch size, ranks, threads: tested) or that only say how to run.
      {"out", o.out, Affects::nothing},
      {"save_weights", o.save_weights, Affects::nothing},
      {"device", o.device, Affects::nothing},
      {"batch_size", to_string(o.batch_size), Affects::nothing},
      {"threads", to_string(o.threads), Affects::nothing},
      {"local_rank", to_string(o.local_rank), Affects::nothing},
      {"resume", to_string(o.resume), Affects::nothing},
  };
}
// 21 members (7 strings, model::Objective, model::Labels, model::Pooling, 6 64-bit integers,
// 3 ints, 2 bools) as laid out by libstdc++ on x86-64; a tripwire, not an ABI promise: update it
// together with option_fields().
static_assert(sizeof(std::string) != 32 || sizeof(ExtractOptions) == 360,
              "ExtractOptions changed: list the new option in option_fields()");

// The key of the block-wise features: every option that changes them, and the stimuli's shape.
std::string fingerprint(const ExtractOptions& o, const io::StimuliInfo& s) {
  std::string fp;
  for (const auto& f : option_fields(o))
    if (f.affects == Affects::features)
      fp += std::string(f.name) + "=" + f.value + ";";
  return fp + "images=" + std::to_string(s.n) + "x" + std::to_string(s.height) + "x" +
         std::to_string(s.width);
}

std::string dataset_name(int kind, const std::string& layer) {
  return std::string("/features/") + kKinds[kind] + "/" + layer;
}

} // namespace

void validate(const ExtractOptions& o) {
  if (o.stimuli.empty())
    throw UsageError("--stimuli: a stimuli file is required");
  if (o.out.empty())
    throw UsageError("--out: an output file is required");
  if (o.batch_size < 1)
    throw UsageError("--batch-size: must be at least 1");
  if (o.block < 1)
    throw UsageError("--block: must be at least 1");
  if (o.labels == model::Labels::shuffled && !model::uses_labels(o.objective))
    throw UsageError("--labels shuffled: objective " + model::name(o.objective) +
                     " uses no labels, so shuffling them controls nothing (the shuffled-labels "
                     "control is for cross-entropy and label-taking TorchScript objectives)");
  if (o.projection < 0)
    throw UsageError("--projection: must be 0 (off) or a positive dimension");
  if (o.pca < 0)
    throw UsageError("--pca: must be 0 (off) or a positive number of components");
  if (o.pca > 0 && o.split_from.empty())
    throw UsageError("--pca is fitted on training images only: give --split-from BRAIN.h5, whose "
                     "/brain/test_stimuli are left out of the fit");
  if (o.pca_oversample < 0 || o.pca_power_iterations < 0)
    throw UsageError("--pca-oversample and --pca-power-iterations must be >= 0");
  if (o.device != "cpu" && o.device != "cuda")
    throw UsageError("--device: must be cpu or cuda, not '" + o.device + "'");
}

namespace {

// Stage 1 (inputs): which labels the model is given. Cross-entropy needs labels; a user
// objective gets them when the file has them (else the model's own argmax).
// --labels shuffled: the stimuli's labels, permuted across images (the control).
struct LabelUse {
  bool need = false; ///< the objective needs /stimuli/labels (cross-entropy)
  bool pass = false; ///< the model is given them (or their permutation)
};
LabelUse label_use(const ExtractOptions& o, const io::StimuliInfo& si) {
  using model::Labels;
  using Kind = model::Objective::Kind;
  const bool file_labels = o.labels == Labels::stimuli || o.labels == Labels::shuffled;
  LabelUse u;
  u.need = o.objective.kind == Kind::cross_entropy && file_labels;
  u.pass = u.need || (o.objective.kind == Kind::torchscript && file_labels && si.has_labels);
  if (o.labels == Labels::shuffled && !si.has_labels)
    throw UsageError(o.stimuli + ": --labels shuffled needs /stimuli/labels, which is missing");
  if (u.need && !si.has_labels)
    throw UsageError(o.stimuli + ": objective " + model::name(o.objective) +
                     " needs /stimuli/labels, which is missing (or use --labels self)");
  return u;
}

model::ExtractorOptions model_options(const ExtractOptions& o) {
  model::ExtractorOptions mo;
  mo.model = o.model;
  mo.weights = o.weights;
  mo.objective = o.objective;
  mo.labels = o.labels == model::Labels::shuffled ? model::Labels::stimuli : o.labels;
  mo.randomize_weights = o.randomize_weights;
  mo.pooling = o.pooling;
  mo.device = o.device;
  mo.threads = o.threads;
  mo.seed = o.seed;
  mo.local_rank = o.local_rank;
  return mo;
}

// This rank's model copy, and the optional sparse random projection of layers wider than K
// (the same matrix for both kinds).
struct Model {
  std::unique_ptr<model::FeatureExtractor> fx;
  std::vector<std::unique_ptr<linalg::SparseProjection>> proj; ///< [L]; null: not projected
  std::vector<std::int64_t> dims;                              ///< [L] after projection
  const std::vector<std::string>& layers() const { return fx->layer_names(); }
  int size() const { return static_cast<int>(dims.size()); }
};

// Collective on comm (a model that fails to build on any rank fails on all).
Model build_model(const ExtractOptions& o, const io::StimuliInfo& si, MPI_Comm comm) {
  Model m;
  model::ExtractorOptions mo = model_options(o);
  mo.probe_height = si.height;
  mo.probe_width = si.width;
  mpi::collective_check(comm, [&] { m.fx = std::make_unique<model::FeatureExtractor>(mo); });
  if (!o.save_weights.empty()) {
    mpi::collective_check(comm, [&] {
      if (mpi::rank(comm) == 0)
        m.fx->save_weights(o.save_weights);
    });
    GM_INFO("extract: wrote the weights of " << o.model << " to " << o.save_weights);
  }
  m.dims = m.fx->layer_dims();
  m.proj.resize(m.dims.size());
  for (int l = 0; l < m.size(); ++l)
    if (o.projection > 0 && m.dims[l] > o.projection) {
      m.proj[l] = std::make_unique<linalg::SparseProjection>(m.dims[l], o.projection, o.seed,
                                                             kProjectionStream + std::uint32_t(l));
      m.dims[l] = o.projection;
    }
  return m;
}

// The stimuli's labels must be outputs of the model (cross-entropy against them).
void check_label_range(const ExtractOptions& o, io::File& stim, const Model& m) {
  const auto labels = stim.dataset("/stimuli/labels").read_all<std::int64_t>();
  const auto mx = *std::max_element(labels.begin(), labels.end());
  if (mx >= m.fx->num_outputs())
    throw UsageError(o.stimuli + ": /stimuli/labels has label " + std::to_string(mx) +
                     " but model " + o.model + " has " + std::to_string(m.fx->num_outputs()) +
                     " outputs (use --labels self for labels the model does not know)");
}

// --labels shuffled: one permutation of all images' labels (Fisher-Yates, Philox(seed,
// labels)), the same on every rank.
std::vector<std::int64_t> shuffled_labels(const ExtractOptions& o, io::File& stim) {
  auto shuffled = stim.dataset("/stimuli/labels").read_all<std::int64_t>();
  sim::Philox rng(o.seed, sim::Stream::labels);
  for (std::int64_t i = std::int64_t(shuffled.size()) - 1; i > 0; --i)
    std::swap(shuffled[i], shuffled[rng.below(std::uint32_t(i + 1))]);
  return shuffled;
}

// Stage 2 (a new output): one dataset per (kind, layer), the nuisance features, the attributes
// and the progress record (every block not done).
std::unique_ptr<io::OutputFile> create_output(const ExtractOptions& o, const std::string& path,
                                              const io::StimuliInfo& si, const Model& m,
                                              std::int64_t nblocks, const std::string& fp,
                                              MPI_Comm comm) {
  auto out = std::make_unique<io::OutputFile>(path, comm);
  const io::File& f = out->file();
  const auto& layers = m.layers();
  const std::int64_t L = m.size();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.create_group("/features");
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < L; ++l)
      f.create_dataset(dataset_name(k, layers[l]), io::DType::f32, {si.n, m.dims[l]},
                       {std::min<std::int64_t>(o.block, si.n), m.dims[l]});
  // Nuisance features (docs/statistics.md, "Unique variance"): each image's loss and the L2
  // norm of every layer's (unpooled) gradient.
  f.create_dataset("/nuisance/loss", io::DType::f32, {si.n},
                   {std::min<std::int64_t>(o.block, si.n)});
  f.create_dataset("/nuisance/grad_norm", io::DType::f32, {si.n, L},
                   {std::min<std::int64_t>(o.block, si.n), L});
  f.set_attr("/features", "layers", layers);
  f.set_attr("/features", "model", o.model);
  f.set_attr("/features", "objective", model::name(o.objective));
  f.set_attr("/features", "labels", std::string(model::name(o.labels)));
  f.set_attr("/features", "randomize_weights", std::int64_t{o.randomize_weights ? 1 : 0});
  f.set_attr("/features", "pooling", model::name(o.pooling));
  f.set_attr("/features", "reduction",
             o.projection > 0 ? "projection:" + std::to_string(o.projection) : std::string("none"));
  f.set_attr("/features", "stimuli", o.stimuli);
  f.set_attr("/features", "seed", static_cast<std::int64_t>(o.seed));
  f.write_small("/progress/blocks_done", std::vector<std::uint8_t>(nblocks, 0), {nblocks});
  f.set_attr("/progress", "fingerprint", fp);
  f.set_attr("/progress", "block", std::int64_t{o.block});
  f.flush();
  return out;
}

// Collective on comm. Stage 2: the partial output resumed when every rank can open it and its
// fingerprint matches (resumed = true), else a new one.
std::unique_ptr<io::OutputFile> open_output(const ExtractOptions& o, const std::string& path,
                                            const io::StimuliInfo& si, const Model& m,
                                            bool& resumed, MPI_Comm comm) {
  const std::int64_t nblocks = (si.n + o.block - 1) / o.block;
  const std::string fp = fingerprint(o, si);
  resumed = false;
  std::unique_ptr<io::OutputFile> out;
  if (o.resume && io::OutputFile::has_partial(path)) {
    try {
      auto candidate = std::make_unique<io::OutputFile>(io::OutputFile::resume(path, comm));
      const io::File& f = candidate->file();
      resumed =
          f.has_attr("/progress", "fingerprint") && f.attr_string("/progress", "fingerprint") == fp;
      if (resumed)
        out = std::move(candidate);
    } catch (const Error& e) {
      GM_WARN("extract: cannot resume " << io::OutputFile::partial_name(path) << " (" << e.what()
                                        << "); starting over");
    }
    resumed = mpi::all_of(comm, resumed);
  }
  if (!resumed) {
    out.reset();
    out = create_output(o, path, si, m, nblocks, fp, comm);
  }
  return out;
}

// The features of one block's images, [L] rows of [n, dims[l]] per kind, and its nuisance
// features: loss [n] and gradient norms [n, L].
struct BlockFeatures {
  std::vector<std::vector<float>> feats[2];
  std::vector<float> loss, gnorm;
};

// Stage 3 (one block): the model run over images [i0, i0 + n) in batches of batch_size.
// Collective on comm (a failure on any rank fails all); images: [n, height, width, 3];
// labels: empty or n values.
BlockFeatures run_block(const ExtractOptions& o, const io::StimuliInfo& si, const Model& m,
                        const std::vector<std::uint8_t>& images,
                        const std::vector<std::int64_t>& labels, std::int64_t i0, std::int64_t n,
                        Progress& progress, MPI_Comm comm) {
  const int L = m.size();
  const std::int64_t px = si.height * si.width * 3;
  std::vector<std::int64_t> indices(static_cast<size_t>(n));
  std::iota(indices.begin(), indices.end(), i0);
  BlockFeatures out;
  out.feats[0].resize(L);
  out.feats[1].resize(L);
  out.gnorm.resize(static_cast<size_t>(n * L));
  mpi::collective_check(comm, [&] {
    for (std::int64_t s = 0; s < n; s += o.batch_size) {
      const std::int64_t nb = std::min(o.batch_size, n - s);
      ProfileEvent ev("gm.extract.batch");
      model::BatchFeatures bf = m.fx->run(&images[s * px], nb, si.height, si.width,
                                          labels.empty() ? nullptr : &labels[s], &indices[s]);
      for (int l = 0; l < L; ++l) {
        if (m.proj[l]) {
          bf.activations[l] = m.proj[l]->apply(bf.activations[l].data(), nb);
          bf.gradients[l] = m.proj[l]->apply(bf.gradients[l].data(), nb);
        }
        auto& act = out.feats[0][l];
        auto& grad = out.feats[1][l];
        act.insert(act.end(), bf.activations[l].begin(), bf.activations[l].end());
        grad.insert(grad.end(), bf.gradients[l].begin(), bf.gradients[l].end());
        for (std::int64_t i = 0; i < nb; ++i)
          out.gnorm[(s + i) * L + l] = bf.grad_norm[l][i];
      }
      out.loss.insert(out.loss.end(), bf.loss.begin(), bf.loss.end());
      progress.advance(nb);
    }
  });
  return out;
}

// Collective on comm (the writes are): rows [i0, i0 + n) of every dataset.
void write_block(const io::File& f, const Model& m, const BlockFeatures& bf, std::int64_t i0,
                 std::int64_t n) {
  const int L = m.size();
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < L; ++l)
      f.dataset(dataset_name(k, m.layers()[l]))
          .write(bf.feats[k][l].data(), {i0, 0}, {n, n ? m.dims[l] : 0});
  f.dataset("/nuisance/loss").write(bf.loss.data(), {i0}, {n});
  f.dataset("/nuisance/grad_norm").write(bf.gnorm.data(), {i0, 0}, {n, n ? std::int64_t(L) : 0});
}

// Stages 1-4 above, writing pooled (and projected) features to `path`.
void extract_blocks(const ExtractOptions& o, const std::string& path, MPI_Comm comm) {
  StageTimer total("extract.blocks");
  const int me = mpi::rank(comm), p = mpi::size(comm);

  // 1. Inputs and the model.
  io::File stim = io::File::open(o.stimuli, comm);
  const io::StimuliInfo si =
      with_context("while checking stimuli " + o.stimuli, [&] { return io::check_stimuli(stim); });
  const LabelUse lab = label_use(o, si);
  const Model m = build_model(o, si, comm);
  GM_INFO("extract: " << o.model << ", " << m.size() << " layers, objective "
                      << model::name(o.objective) << ", pooling " << model::name(o.pooling) << ", "
                      << si.n << " images, " << p << " ranks, batch " << o.batch_size << ", device "
                      << o.device);
  if (lab.need)
    check_label_range(o, stim, m);
  std::vector<std::int64_t> shuffled;
  if (o.labels == model::Labels::shuffled && lab.pass)
    shuffled = shuffled_labels(o, stim);

  // 2. The output, new or resumed.
  const std::int64_t nblocks = (si.n + o.block - 1) / o.block;
  bool resumed = false;
  const std::unique_ptr<io::OutputFile> out = open_output(o, path, si, m, resumed, comm);
  const io::File& f = out->file();
  auto done_ds = f.dataset("/progress/blocks_done");
  const auto done = done_ds.read_all<std::uint8_t>();
  const auto n_done = std::count(done.begin(), done.end(), std::uint8_t{1});
  if (resumed)
    GM_INFO("extract: resuming " << io::OutputFile::partial_name(path) << ": " << n_done << "/"
                                 << nblocks << " blocks already done");

  // 3. Rounds of one block per rank.
  const mpi::Block mine = mpi::block_of(nblocks, p, me);
  const std::int64_t rounds = (nblocks + p - 1) / p;
  std::int64_t remaining = 0;
  for (auto b = mine.begin; b < mine.end; ++b)
    remaining += done[b] ? 0 : std::min(o.block, si.n - b * o.block);
  const std::int64_t global_remaining = mpi::sum(comm, remaining);
  Progress progress("extract", remaining, "images",
                    remaining > 0 ? double(global_remaining) / double(remaining) : 1.0);
  auto images_ds = stim.dataset("/stimuli/images");
  for (std::int64_t r = 0; r < rounds; ++r) {
    const std::int64_t b = mine.begin + r;
    const bool work = b < mine.end && !done[b];
    const std::int64_t i0 = work ? b * o.block : 0;
    const std::int64_t i1 = work ? std::min(si.n, i0 + o.block) : 0;
    const auto images = images_ds.read_rows<std::uint8_t>(i0, i1);
    std::vector<std::int64_t> labels;
    if (lab.pass)
      labels = o.labels == model::Labels::shuffled
                   ? std::vector<std::int64_t>(shuffled.begin() + i0, shuffled.begin() + i1)
                   : stim.dataset("/stimuli/labels").read_rows<std::int64_t>(i0, i1);
    const BlockFeatures bf = run_block(o, si, m, images, labels, i0, i1 - i0, progress, comm);
    write_block(f, m, bf, i0, i1 - i0);
    f.flush(); // the rows reach the file before their block is marked done
    const std::uint8_t one = 1;
    done_ds.write(&one, {work ? b : 0}, {work ? 1 : 0});
    f.flush();
    signals::check(comm, "during extract (" + o.out + ".partial holds the completed blocks)");
  }
  progress.finish();

  // 4. Done: a features.h5 that passes the validator.
  out->commit();
  GM_INFO("extract: wrote " << path);
}

} // namespace

// Stage 5: PCA of every (kind, layer) of the pooled file, fitted on the training images only
// (those not in /brain/test_stimuli of --split-from), rows distributed over ranks.
void pca_stage(const ExtractOptions& o, const std::string& pooled, MPI_Comm comm) {
  StageTimer timer("extract.pca");
  const int me = mpi::rank(comm), p = mpi::size(comm);
  io::File in = io::File::open(pooled, comm);
  const io::FeaturesInfo fi = io::check_features(in);
  io::File brain = io::File::open(o.split_from, comm);
  with_context("while reading the train/test split from " + o.split_from,
               [&] { return io::check_brain(brain, fi.n); });
  const auto test = brain.dataset("/brain/test_stimuli").read_all<std::int64_t>();
  std::vector<std::uint8_t> is_test(static_cast<size_t>(fi.n), 0);
  for (auto t : test)
    is_test[t] = 1;
  const mpi::Block mine = mpi::block_of(fi.n, p, me);
  std::vector<std::uint8_t> fit(static_cast<size_t>(mine.size()));
  for (auto i = mine.begin; i < mine.end; ++i)
    fit[i - mine.begin] = is_test[i] ? 0 : 1;

  io::OutputFile out(o.out, comm);
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.create_group("/features");
  for (const char* key : {"model", "objective", "labels", "pooling", "stimuli"})
    if (in.has_attr("/features", key))
      f.set_attr("/features", key, in.attr_string("/features", key));
  f.set_attr("/features", "layers", fi.layers);
  f.set_attr("/features", "seed", static_cast<std::int64_t>(o.seed));
  f.set_attr(
      "/features", "reduction",
      (o.projection > 0 ? "projection:" + std::to_string(o.projection) + "+" : std::string()) +
          "pca:" + std::to_string(o.pca));
  f.set_attr("/features", "pca_fit",
             "training images: all but /brain/test_stimuli of " + o.split_from);
  Progress progress("extract: PCA", std::int64_t(fi.kinds.size() * fi.layers.size()), "layers");
  for (size_t k = 0; k < fi.kinds.size(); ++k)
    for (size_t l = 0; l < fi.layers.size(); ++l) {
      const std::string name = "/features/" + fi.kinds[k] + "/" + fi.layers[l];
      auto src = in.dataset(name);
      const std::int64_t d = src.shape()[1];
      const auto x = src.read_rows<float>(mine.begin, mine.end);
      linalg::PcaOptions po;
      po.k = std::min<std::int64_t>(o.pca, d);
      po.oversample = o.pca_oversample;
      po.power_iterations = o.pca_power_iterations;
      po.seed = o.seed;
      po.stream = kPcaStream + std::uint32_t(k * 1024 + l);
      if (po.k < o.pca)
        GM_INFO("extract: " << name << " has " << d << " dimensions; keeping " << po.k
                            << " PCA components");
      const linalg::Pca pca = with_context("while fitting the PCA of " + name, [&] {
        return linalg::fit_pca(comm, x.data(), mine.size(), d, fit, po);
      });
      const auto scores = pca.transform(x.data(), mine.size());
      f.create_dataset(name, io::DType::f32, {fi.n, po.k},
                       {std::min<std::int64_t>(fi.n, 1024), po.k})
          .write_rows(scores, mine.begin);
      const std::string red = "/reduction/" + fi.kinds[k] + "/" + fi.layers[l];
      f.write_small(red + "/mean", pca.mean, {d});
      f.write_small(red + "/components", pca.components, {po.k, d});
      f.write_small(red + "/singular_values", pca.singular_values, {po.k});
      progress.advance();
    }
  progress.finish();
  for (const char* name : {"/nuisance/loss", "/nuisance/grad_norm"}) // per image: copied as is
    if (in.exists(name)) {
      auto src = in.dataset(name);
      const auto shape = src.shape();
      const std::int64_t w = shape.size() > 1 ? shape[1] : 1;
      const auto x = src.read_rows<float>(mine.begin, mine.end);
      auto dst = f.create_dataset(name, io::DType::f32, shape);
      if (shape.size() > 1)
        dst.write(x.data(), {mine.begin, 0}, {mine.size(), w});
      else
        dst.write(x.data(), {mine.begin}, {mine.size()});
    }
  out.commit();
  GM_INFO("extract: wrote " << o.out << " (PCA fitted on " << (fi.n - std::int64_t(test.size()))
                            << " training images)");
}

std::string pooled_name(const std::string& out) {
  const auto dot = out.rfind('.');
  const auto slash = out.rfind('/');
  const bool ext = dot != std::string::npos && (slash == std::string::npos || dot > slash);
  return (ext ? out.substr(0, dot) : out) + ".pooled.h5";
}

void extract(const ExtractOptions& o, MPI_Comm comm) {
  validate(o);
  if (o.pca == 0) {
    extract_blocks(o, o.out, comm);
    return;
  }
  // With PCA, the pooled features are a complete features file of their own (kept: the
  // unreduced features), reused when it was made with the same settings.
  const std::string pooled = pooled_name(o.out);
  bool reuse = false;
  if (o.resume && std::filesystem::exists(pooled)) {
    io::File f = io::File::open(pooled, comm);
    io::File stim = io::File::open(o.stimuli, comm);
    const auto si = io::check_stimuli(stim);
    reuse = f.has_attr("/progress", "fingerprint") &&
            f.attr_string("/progress", "fingerprint") == fingerprint(o, si);
  }
  if (reuse)
    GM_INFO("extract: reusing the pooled features in " << pooled);
  else
    extract_blocks(o, pooled, comm);
  pca_stage(o, pooled, comm);
}

} // namespace gradmap::extract
