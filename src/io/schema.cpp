#include "gradmap/io/schema.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"

namespace gradmap::io {
namespace {

// Metadata is read identically on every rank, so a failure is raised everywhere: collective.
[[noreturn]] void fail(const std::string& msg) {
  Error e(msg);
  e.collective = true;
  throw e;
}

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i)
    out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_version(const File& f) {
  if (!f.has_attr("/", "gradmap_schema"))
    fail(f.path() + ": attribute gradmap_schema missing on / (not a gradmap file?)");
  std::int64_t v = 0;
  try {
    v = f.attr_int("/", "gradmap_schema");
  } catch (const Error&) {
    fail(f.path() + ": attribute gradmap_schema must be an integer");
  }
  if (v != kSchemaVersion)
    fail(f.path() + ": gradmap_schema is " + std::to_string(v) + ", this gradmap reads version " +
         std::to_string(kSchemaVersion));
}

Dataset need(const File& f, const std::string& name, std::initializer_list<DType> types,
             size_t ndim) {
  if (!f.exists(name))
    fail(f.path() + ": dataset " + name + " missing");
  Dataset ds = f.dataset(name);
  DType t;
  try {
    t = ds.dtype();
  } catch (const Error& e) {
    fail(e.what());
  }
  if (std::find(types.begin(), types.end(), t) == types.end()) {
    std::string want;
    for (DType w : types)
      want += (want.empty() ? "" : " or ") + std::string(dtype_name(w));
    fail(ds.where() + ": dtype " + dtype_name(t) + ", expected " + want);
  }
  if (ds.shape().size() != ndim)
    fail(ds.where() + ": shape " + shape_str(ds.shape()) + " has " +
         std::to_string(ds.shape().size()) + " dimensions, expected " + std::to_string(ndim));
  return ds;
}

void expect_dim(const Dataset& ds, size_t axis, std::int64_t n, const std::string& what) {
  if (ds.shape()[axis] != n)
    fail(ds.where() + ": shape " + shape_str(ds.shape()) + ", dimension " + std::to_string(axis) +
         " must be " + std::to_string(n) + " (" + what + ")");
}

// Reads rows of a float dataset in row blocks over ranks and checks for NaN/Inf.
void check_finite(const Dataset& ds, MPI_Comm comm) {
  const auto shape = ds.shape();
  std::int64_t row = 1;
  for (size_t i = 1; i < shape.size(); ++i)
    row *= shape[i];
  const mpi::Block b = mpi::block_of(shape[0], mpi::size(comm), mpi::rank(comm));
  // Bounded memory: read at most ~64 Mi values per step; the step count is agreed on all ranks.
  const std::int64_t step =
      std::max<std::int64_t>(1, (std::int64_t(1) << 26) / std::max<std::int64_t>(row, 1));
  std::int64_t steps = (b.size() + step - 1) / step;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &steps, 1, MPI_INT64_T, MPI_MAX, comm));
  for (std::int64_t k = 0; k < steps; ++k) {
    const std::int64_t r0 = std::min(b.end, b.begin + k * step), r1 = std::min(b.end, r0 + step);
    const auto v = ds.read_rows<float>(r0, r1);
    mpi::collective_check(comm, [&] {
      for (size_t i = 0; i < v.size(); ++i)
        if (!std::isfinite(v[i])) {
          const std::int64_t r = r0 + std::int64_t(i) / row, c = std::int64_t(i) % row;
          throw Error(ds.where() + ": non-finite value (" + std::to_string(v[i]) + ") at row " +
                      std::to_string(r) + ", element " + std::to_string(c));
        }
    });
  }
}

} // namespace

std::string file_kind(const File& f) {
  check_version(f);
  if (f.exists("/stimuli"))
    return "stimuli";
  if (f.exists("/brain"))
    return "brain";
  if (f.exists("/features"))
    return "features";
  fail(f.path() + ": none of the groups /stimuli, /brain, /features is present");
}

StimuliInfo check_stimuli(const File& f) {
  check_version(f);
  StimuliInfo info;
  Dataset img = need(f, "/stimuli/images", {DType::u8}, 4);
  const auto s = img.shape();
  if (s[3] != 3)
    fail(img.where() + ": shape " + shape_str(s) + ", expected [N, H, W, 3] (RGB)");
  info.n = s[0];
  info.height = s[1];
  info.width = s[2];
  if (info.n < 1 || info.height < 1 || info.width < 1)
    fail(img.where() + ": empty image array " + shape_str(s));
  if (f.exists("/stimuli/ids")) {
    Dataset ids = f.dataset("/stimuli/ids");
    if (ids.shape().size() != 1 || ids.shape()[0] != info.n)
      fail(ids.where() + ": shape " + shape_str(ids.shape()) + ", expected [" +
           std::to_string(info.n) + "] (one id per image)");
  } else {
    fail(f.path() + ": dataset /stimuli/ids missing");
  }
  if (f.exists("/stimuli/labels")) {
    Dataset lab = need(f, "/stimuli/labels", {DType::i64, DType::i32}, 1);
    expect_dim(lab, 0, info.n, "one label per image");
    const auto v = lab.read_all<std::int64_t>();
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] < 0)
        fail(lab.where() + ": negative label " + std::to_string(v[i]) + " at image " +
             std::to_string(i));
    info.has_labels = true;
  }
  return info;
}

BrainInfo check_brain(const File& f, std::int64_t n_stimuli, bool scan_values) {
  check_version(f);
  BrainInfo info;
  if (!f.has_attr("/", "modality"))
    fail(f.path() + ": attribute modality missing on / (fmri or meg)");
  info.modality = f.attr_string("/", "modality");
  if (info.modality != "fmri" && info.modality != "meg")
    fail(f.path() + ": attribute modality is '" + info.modality + "', expected fmri or meg");
  const bool meg = info.modality == "meg";
  Dataset resp = need(f, "/brain/responses", {DType::f32, DType::f64}, meg ? 3 : 2);
  const auto rs = resp.shape();
  info.trials = rs[0];
  if (info.trials < 1)
    fail(resp.where() + ": no trials");
  if (meg) {
    info.sensors = rs[1];
    info.times = rs[2];
    info.targets = rs[1] * rs[2];
  } else {
    info.targets = rs[1];
  }
  if (info.targets < 1)
    fail(resp.where() + ": no targets");

  Dataset ts = need(f, "/brain/trial_stimulus", {DType::i64, DType::i32}, 1);
  expect_dim(ts, 0, info.trials, "one stimulus index per trial of /brain/responses");
  const auto trial_stim = ts.read_all<std::int64_t>();
  for (size_t t = 0; t < trial_stim.size(); ++t) {
    const auto v = trial_stim[t];
    if (v < 0 || (n_stimuli >= 0 && v >= n_stimuli))
      fail(ts.where() + ": trial " + std::to_string(t) + " shows stimulus " + std::to_string(v) +
           ", outside [0, " + (n_stimuli >= 0 ? std::to_string(n_stimuli) : "inf") + ")");
    info.max_stimulus = std::max(info.max_stimulus, v);
  }
  Dataset test = need(f, "/brain/test_stimuli", {DType::i64, DType::i32}, 1);
  const auto tv = test.read_all<std::int64_t>();
  if (tv.empty())
    fail(test.where() + ": no test stimuli");
  const std::set<std::int64_t> shown(trial_stim.begin(), trial_stim.end());
  std::set<std::int64_t> seen;
  for (auto v : tv) {
    if (v < 0 || (n_stimuli >= 0 && v >= n_stimuli))
      fail(test.where() + ": test stimulus " + std::to_string(v) + " outside [0, " +
           (n_stimuli >= 0 ? std::to_string(n_stimuli) : "inf") + ")");
    if (!shown.count(v))
      fail(test.where() + ": test stimulus " + std::to_string(v) + " is shown in no trial");
    if (!seen.insert(v).second)
      fail(test.where() + ": test stimulus " + std::to_string(v) + " listed twice");
  }
  if (seen.size() == shown.size())
    fail(test.where() + ": every stimulus is a test stimulus; no training images are left");

  if (meg) {
    Dataset times = need(f, "/brain/times", {DType::f64, DType::f32}, 1);
    expect_dim(times, 0, info.times, "one time per sample of /brain/responses");
    const auto t = times.read_all<double>();
    for (size_t i = 1; i < t.size(); ++i)
      if (!(t[i] > t[i - 1]))
        fail(times.where() + ": times must increase (index " + std::to_string(i) + ")");
    Dataset names = need(f, "/brain/sensor_names", {DType::string}, 1);
    expect_dim(names, 0, info.sensors, "one name per sensor of /brain/responses");
  } else {
    Dataset roi = need(f, "/brain/roi", {DType::i32, DType::i64}, 1);
    expect_dim(roi, 0, info.targets, "one ROI per voxel of /brain/responses");
    Dataset names = need(f, "/brain/roi_names", {DType::string}, 1);
    Dataset level = need(f, "/brain/roi_level", {DType::i32, DType::i64}, 1);
    const std::int64_t nroi = names.shape()[0];
    expect_dim(level, 0, nroi, "one level per entry of /brain/roi_names");
    const auto rv = roi.read_all<std::int64_t>();
    for (size_t i = 0; i < rv.size(); ++i)
      if (rv[i] < -1 || rv[i] >= nroi)
        fail(roi.where() + ": voxel " + std::to_string(i) + " has ROI " + std::to_string(rv[i]) +
             ", outside [-1, " + std::to_string(nroi) + ")");
    Dataset ijk = need(f, "/brain/voxel_ijk", {DType::i32, DType::i64}, 2);
    expect_dim(ijk, 0, info.targets, "one coordinate per voxel");
    expect_dim(ijk, 1, 3, "i, j, k");
    if (!f.has_attr("/brain", "volume_shape") || !f.has_attr("/brain", "affine"))
      fail(f.path() + ": attributes volume_shape and affine are required on /brain (fMRI)");
    const auto vs = f.attr_ints("/brain", "volume_shape");
    if (vs.size() != 3)
      fail(f.path() + ": /brain attribute volume_shape must have 3 values");
    const auto aff = f.attr_doubles("/brain", "affine");
    if (aff.size() != 16)
      fail(f.path() + ": /brain attribute affine must have 16 values (4x4, row-major)");
    const auto c = ijk.read_all<std::int64_t>();
    for (size_t i = 0; i < c.size(); ++i)
      if (c[i] < 0 || c[i] >= vs[i % 3])
        fail(ijk.where() + ": voxel " + std::to_string(i / 3) + " coordinate " +
             std::to_string(i % 3) + " = " + std::to_string(c[i]) + " outside volume_shape");
  }
  if (scan_values)
    check_finite(resp, f.comm());
  return info;
}

FeaturesInfo check_features(const File& f) {
  check_version(f);
  FeaturesInfo info;
  if (!f.exists("/features"))
    fail(f.path() + ": group /features missing");
  info.kinds = f.members("/features");
  if (info.kinds.empty())
    fail(f.path() + ": /features has no kinds (activations, gradients, ...)");
  std::vector<std::string> order;
  if (f.has_attr("/features", "layers"))
    order = f.attr_strings("/features", "layers");
  for (const auto& kind : info.kinds) {
    auto names = f.members("/features/" + kind);
    if (names.empty())
      fail(f.path() + ": /features/" + kind + " has no layers");
    if (order.empty())
      order = names; // sorted names
    std::vector<std::string> sorted_order = order;
    std::sort(sorted_order.begin(), sorted_order.end());
    if (sorted_order != names)
      fail(f.path() + ": the layers of /features/" + kind +
           " differ from the attribute `layers` (or from the other kinds)");
    for (size_t l = 0; l < order.size(); ++l) {
      Dataset ds = need(f, "/features/" + kind + "/" + order[l], {DType::f32, DType::f64}, 2);
      const auto s = ds.shape();
      if (info.n == 0)
        info.n = s[0];
      if (s[0] != info.n)
        fail(ds.where() + ": " + std::to_string(s[0]) + " rows, other layers have " +
             std::to_string(info.n) + " (one row per image)");
      if (kind == info.kinds.front()) // other kinds may have other widths (made elsewhere)
        info.dims.push_back(s[1]);
      check_finite(ds, f.comm());
    }
  }
  info.layers = order;
  return info;
}

} // namespace gradmap::io

namespace gradmap::io {

namespace {
Dataset begin_stimuli(const File& f, std::int64_t n, std::int64_t height, std::int64_t width,
                      const std::string& source) {
  f.set_attr("/", "gradmap_schema", std::int64_t{kSchemaVersion});
  f.create_group("/stimuli");
  f.set_attr("/stimuli", "source", source);
  return f.create_dataset(
      "/stimuli/images", DType::u8, {n, height, width, 3},
      {std::max<std::int64_t>(1, std::min<std::int64_t>(n, 64)), height, width, 3});
}
} // namespace

StimuliWriter::StimuliWriter(const std::string& path, std::int64_t n, std::int64_t height,
                             std::int64_t width, const std::string& source, MPI_Comm comm)
    : out_(path, comm), images_(begin_stimuli(out_.file(), n, height, width, source)), n_(n),
      comm_(comm) {}

void StimuliWriter::write_ids(const std::vector<std::int64_t>& ids) {
  const mpi::Block mine = mpi::block_of(n_, mpi::size(comm_), mpi::rank(comm_));
  out_.file()
      .create_dataset("/stimuli/ids", DType::i64, {n_})
      .write_rows(std::vector<std::int64_t>(ids.begin() + mine.begin, ids.begin() + mine.end),
                  mine.begin);
}

void StimuliWriter::commit() {
  check_stimuli(out_.file());
  out_.commit();
}

} // namespace gradmap::io
