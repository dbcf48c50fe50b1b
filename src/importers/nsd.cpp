// gradmap import-nsd: see nsd.hpp. Layout facts: NSD data manual (Allen et al. 2022) and the
// authors' nsd_access code; docs/datasets.md lists every file read here.
#include "gradmap/importers/nsd.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/image.hpp"
#include "gradmap/io/matfile.hpp"
#include "gradmap/io/nifti.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "images.hpp"

namespace gradmap::importers {

namespace fs = std::filesystem;

int nsd_sessions(int subject) {
  static const int n[8] = {40, 40, 32, 30, 40, 32, 40, 30};
  return subject >= 1 && subject <= 8 ? n[subject - 1] : 0;
}

std::vector<int> parse_sessions(const std::string& text) {
  std::vector<int> out;
  if (text.empty() || text == "all")
    return out;
  std::stringstream ss(text);
  std::string part;
  auto number = [&](const std::string& s) {
    try {
      size_t used = 0;
      const int v = std::stoi(s, &used);
      if (used != s.size())
        throw std::invalid_argument(s);
      return v;
    } catch (const std::exception&) {
      throw UsageError("--sessions: '" + text + "' is not a list like 1-10,12 or 'all'");
    }
  };
  while (std::getline(ss, part, ',')) {
    const auto dash = part.find('-');
    if (dash == std::string::npos) {
      out.push_back(number(part));
    } else {
      const int a = number(part.substr(0, dash)), b = number(part.substr(dash + 1));
      if (b < a)
        throw UsageError("--sessions: range '" + part + "' runs backwards");
      for (int s = a; s <= b; ++s)
        out.push_back(s);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

namespace {

constexpr std::int64_t kTrialsPerSession = 750;

struct RoiName {
  const char* name;
  int level;
};
// Labels of the two NSD atlases gradmap knows (nsddata/freesurfer/subjXX/label/*.mgz.ctab).
// V1v/V1d etc. are merged; streams "early" (1) is left to prf-visualrois' V1-V3.
const std::map<std::string, std::map<int, RoiName>> kAtlases = {
    {"prf-visualrois",
     {{1, {"V1", 1}},
      {2, {"V1", 1}},
      {3, {"V2", 2}},
      {4, {"V2", 2}},
      {5, {"V3", 3}},
      {6, {"V3", 3}},
      {7, {"hV4", 4}}}},
    {"streams",
     {{2, {"midventral", 5}},
      {3, {"midlateral", 5}},
      {4, {"midparietal", 5}},
      {5, {"ventral", 6}},
      {6, {"lateral", 6}},
      {7, {"parietal", 6}}}},
};

std::string two(int v) {
  char b[8];
  std::snprintf(b, sizeof b, "%02d", v);
  return b;
}

struct Plan {
  std::vector<int> sessions;
  std::vector<std::int64_t> ids;            // 73k ids (1-based) of the stimuli, sorted
  std::vector<std::int64_t> trial_stimulus; // per trial, index into ids
  std::vector<std::int64_t> test;           // indices into ids of the shared images
  std::vector<std::string> session_files;
  bool hdf5 = true;
  std::vector<std::int64_t> grid; // X, Y, Z
  std::vector<double> affine;
  std::vector<std::int64_t> voxels; // linear index i + X (j + Y k), sorted
  std::vector<std::int32_t> roi;
  std::vector<std::string> roi_names;
  std::vector<std::int32_t> roi_level;
  std::int64_t image_h = 0, image_w = 0, brick_n = 0;
};

bool same_affine(const std::vector<double>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < 16; ++i)
    if (std::abs(a[i] - b[i]) > 1e-3 * std::max(1.0, std::abs(a[i])))
      return false;
  return true;
}

std::string grid_str(const std::vector<std::int64_t>& d) {
  std::string s;
  for (size_t i = 0; i < d.size(); ++i)
    s += (i ? "x" : "") + std::to_string(d[i]);
  return s;
}

// Step 1 of make_plan: the sessions to import (all of the subject's by default), checked.
void plan_sessions(const NsdOptions& o, Plan& p) {
  const int nsess = nsd_sessions(o.subject);
  if (nsess == 0)
    throw UsageError("--subject: " + std::to_string(o.subject) + " is not an NSD subject (1..8)");
  p.sessions = o.sessions;
  if (p.sessions.empty())
    for (int s = 1; s <= nsess; ++s)
      p.sessions.push_back(s);
  for (int s : p.sessions)
    if (s < 1 || s > nsess)
      throw UsageError("--sessions: subject " + std::to_string(o.subject) + " has sessions 1.." +
                       std::to_string(nsess) + ", not " + std::to_string(s));
  if (o.format != "auto" && o.format != "hdf5" && o.format != "nifti")
    throw UsageError("--betas-format: '" + o.format + "' is not auto, hdf5 or nifti");
}

// Step 2: the session files (all must exist before any work starts), one format for all.
void plan_session_files(const NsdOptions& o, const fs::path& root, const std::string& subj,
                        Plan& p) {
  const fs::path bdir = root / "nsddata_betas/ppdata" / subj / o.space / o.betas;
  for (int s : p.sessions) {
    const fs::path h5 = bdir / ("betas_session" + two(s) + ".hdf5");
    const fs::path nii = bdir / ("betas_session" + two(s) + ".nii.gz");
    const bool use_h5 = o.format == "hdf5" || (o.format == "auto" && fs::exists(h5));
    const fs::path f = use_h5 ? h5 : nii;
    if (!fs::exists(f))
      throw Error(f.string() + ": session file missing (import fewer sessions with --sessions, " +
                  "or another --betas-format)");
    if (!p.session_files.empty() && use_h5 != p.hdf5)
      throw Error(bdir.string() + ": sessions mix .hdf5 and .nii.gz files; choose one with "
                                  "--betas-format");
    p.hdf5 = use_h5;
    p.session_files.push_back(f.string());
  }
}

// Step 3: the experimental design: trial -> 73k id, the stimulus list and the shared (test)
// images.
void plan_design(const NsdOptions& o, const fs::path& root, Plan& p) {
  const std::string design = (root / "nsddata/experiments/nsd/nsd_expdesign.mat").string();
  const auto mat = io::read_mat(design, {"masterordering", "subjectim", "sharedix"});
  const auto& mo = mat.at("masterordering");
  const auto& si = mat.at("subjectim");
  const auto& sh = mat.at("sharedix");
  if (si.dims.size() != 2 || si.dims[0] < o.subject)
    throw Error(design + ": subjectim has shape " + grid_str(si.dims) + ", expected 8x10000");
  const std::int64_t per_subject = si.dims[1];
  const std::int64_t trials = std::int64_t(p.sessions.size()) * kTrialsPerSession;
  std::vector<std::int64_t> trial_id(static_cast<size_t>(trials));
  for (size_t k = 0; k < p.sessions.size(); ++k)
    for (std::int64_t t = 0; t < kTrialsPerSession; ++t) {
      const std::int64_t g = (p.sessions[k] - 1) * kTrialsPerSession + t; // 0-based trial
      if (g >= mo.numel())
        throw Error(design + ": masterordering has " + std::to_string(mo.numel()) +
                    " trials, session " + std::to_string(p.sessions[k]) + " needs " +
                    std::to_string(g + 1));
      const double idx = mo.values[size_t(g)];
      if (!(idx >= 1 && idx <= double(per_subject)) || idx != std::floor(idx))
        throw Error(design + ": masterordering(" + std::to_string(g + 1) +
                    ") = " + std::to_string(idx) + " is not an index into 1.." +
                    std::to_string(per_subject));
      const double id = si.at(o.subject - 1, std::int64_t(idx) - 1);
      if (!(id >= 1) || id != std::floor(id))
        throw Error(design + ": subjectim(" + std::to_string(o.subject) + ", " +
                    std::to_string(std::int64_t(idx)) + ") = " + std::to_string(id) +
                    " is not a 1-based 73k id");
      trial_id[size_t(k * kTrialsPerSession + t)] = std::int64_t(id);
    }
  p.ids = trial_id;
  std::sort(p.ids.begin(), p.ids.end());
  p.ids.erase(std::unique(p.ids.begin(), p.ids.end()), p.ids.end());
  for (auto id : trial_id)
    p.trial_stimulus.push_back(std::lower_bound(p.ids.begin(), p.ids.end(), id) - p.ids.begin());
  std::set<std::int64_t> shared;
  for (double v : sh.values)
    shared.insert(std::int64_t(v));
  for (size_t i = 0; i < p.ids.size(); ++i)
    if (shared.count(p.ids[i]))
      p.test.push_back(std::int64_t(i));
  if (p.test.empty())
    throw Error(design + ": none of the subject's images in these sessions is a shared image");
}

// An atlas or mask given by name (in the subject's roi directory) or as a path.
std::string roi_file(const fs::path& rdir, const std::string& name) {
  const auto ends = [&](const std::string& suffix) {
    return name.size() > suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  const bool is_path = name.find('/') != std::string::npos || ends(".nii") || ends(".nii.gz");
  return is_path ? name : (rdir / (name + ".nii.gz")).string();
}

// Step 4: the mask on the betas' grid: the voxels (value > 0), the grid and affine, checked
// against the first session's betas. Returns the mask's header (the atlases must match it).
io::NiftiHeader plan_mask(const NsdOptions& o, const fs::path& rdir, Plan& p) {
  io::NiftiHeader mh;
  const std::string mask_path = roi_file(rdir, o.mask);
  const auto mask = io::read_nifti_volume(mask_path, &mh);
  p.grid = {mh.dims[0], mh.dims.size() > 1 ? mh.dims[1] : 1, mh.dims.size() > 2 ? mh.dims[2] : 1};
  p.affine = mh.affine;
  for (std::int64_t v = 0; v < std::int64_t(mask.size()); ++v)
    if (std::lround(mask[size_t(v)]) > 0)
      p.voxels.push_back(v);
  if (p.voxels.empty())
    throw Error(mask_path + ": the mask selects no voxel (no value > 0)");
  // The betas' grid must be the mask's.
  const std::string& first = p.session_files.front();
  if (p.hdf5) {
    io::File bf = io::File::open(first, MPI_COMM_SELF);
    const auto shape = bf.dataset("betas").shape();
    if (shape.size() != 4 || shape[0] != kTrialsPerSession || shape[1] != p.grid[2] ||
        shape[2] != p.grid[1] || shape[3] != p.grid[0])
      throw Error(first + ": /betas has shape " + grid_str(shape) + ", expected 750x" +
                  std::to_string(p.grid[2]) + "x" + std::to_string(p.grid[1]) + "x" +
                  std::to_string(p.grid[0]) + " (trials, Z, Y, X of the mask " + mask_path + ")");
  } else {
    io::NiftiReader r(first);
    const auto& d = r.header().dims;
    if (d.size() != 4 || d[0] != p.grid[0] || d[1] != p.grid[1] || d[2] != p.grid[2] ||
        d[3] != kTrialsPerSession)
      throw Error(first + ": shape " + grid_str(d) + ", expected " + grid_str(p.grid) +
                  "x750 (the mask " + mask_path + " grid)");
    if (!same_affine(r.header().affine, mh.affine))
      throw Error(first + ": affine differs from the mask's (" + mask_path + ")");
  }
  return mh;
}

// Step 5: the ROI label of every voxel, from the atlases in order (the first that labels a
// voxel wins); -1: none.
void plan_rois(const NsdOptions& o, const fs::path& rdir, const io::NiftiHeader& mh, Plan& p) {
  const std::string mask_path = roi_file(rdir, o.mask);
  std::map<std::string, int> name_index;
  p.roi.assign(p.voxels.size(), -1);
  for (const auto& atlas : o.rois) {
    const auto it = kAtlases.find(atlas);
    if (it == kAtlases.end())
      throw UsageError("--rois: '" + atlas + "' is not a known atlas (prf-visualrois, streams)");
    for (const auto& [label, rn] : it->second)
      if (!name_index.count(rn.name)) {
        name_index[rn.name] = int(p.roi_names.size());
        p.roi_names.emplace_back(rn.name);
        p.roi_level.push_back(rn.level);
      }
    io::NiftiHeader ah;
    const std::string apath = roi_file(rdir, atlas);
    const auto lab = io::read_nifti_volume(apath, &ah);
    if (ah.dims != mh.dims)
      throw Error(apath + ": grid " + grid_str(ah.dims) + " differs from the mask's (" + mask_path +
                  ", " + grid_str(mh.dims) + ")");
    if (!same_affine(ah.affine, mh.affine))
      throw Error(apath + ": affine differs from the mask's (" + mask_path + ")");
    for (size_t k = 0; k < p.voxels.size(); ++k) {
      if (p.roi[k] >= 0)
        continue; // an earlier atlas labelled it
      const auto l = it->second.find(int(std::lround(lab[size_t(p.voxels[k])])));
      if (l != it->second.end())
        p.roi[k] = name_index.at(l->second.name);
    }
  }
}

// Step 6: the stimulus brick holds every planned image.
void plan_brick(const fs::path& root, Plan& p) {
  const std::string stim = (root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5").string();
  {
    io::File sf = io::File::open(stim, MPI_COMM_SELF);
    const auto ds = sf.dataset("imgBrick");
    const auto shape = ds.shape();
    if (shape.size() != 4 || shape[3] != 3 || ds.dtype() != io::DType::u8)
      throw Error(ds.where() + ": expected uint8 [images, rows, columns, 3], found " +
                  io::dtype_name(ds.dtype()) + " " + grid_str(shape));
    if (p.ids.back() > shape[0])
      throw Error(ds.where() + ": holds " + std::to_string(shape[0]) +
                  " images, the design asks for 73k id " + std::to_string(p.ids.back()));
    p.brick_n = shape[0];
    p.image_h = shape[1];
    p.image_w = shape[2];
  }
}

// Design, stimulus list, voxel selection and ROI labels (identical on every rank).
Plan make_plan(const NsdOptions& o) {
  Plan p;
  plan_sessions(o, p);
  const fs::path root(o.root);
  if (!fs::is_directory(root))
    throw UsageError("--nsd-root: " + o.root + " is not a directory");
  const std::string subj = "subj" + two(o.subject);

  plan_session_files(o, root, subj, p);
  plan_design(o, root, p);
  // Mask and ROI atlases on the betas' grid.
  const fs::path rdir = root / "nsddata/ppdata" / subj / o.space / "roi";
  const io::NiftiHeader mh = plan_mask(o, rdir, p);
  plan_rois(o, rdir, mh, p);
  plan_brick(root, p);
  return p;
}

// One session's betas [750, V] for the planned voxels, as float, divided by 300 (percent signal
// change) and optionally z-scored per voxel. Returns the number of constant voxels.
std::int64_t read_session(const Plan& p, const std::string& file, bool zscore,
                          std::vector<float>& out) {
  const std::int64_t T = kTrialsPerSession, V = std::int64_t(p.voxels.size());
  const std::int64_t X = p.grid[0], Y = p.grid[1];
  out.assign(size_t(T * V), 0.0f);
  if (p.hdf5) {
    io::File bf = io::File::open(file, MPI_COMM_SELF);
    const auto ds = bf.dataset("betas");
    const auto shape = ds.shape();
    if (shape.size() != 4 || shape[0] != T || shape[1] != p.grid[2] || shape[2] != Y ||
        shape[3] != X)
      throw Error(ds.where() + ": shape " + grid_str(shape) + " differs from the first session's");
    std::int64_t v0 = 0;
    while (v0 < V) { // one z slab at a time
      const std::int64_t z = p.voxels[size_t(v0)] / (X * Y);
      std::int64_t v1 = v0;
      while (v1 < V && p.voxels[size_t(v1)] / (X * Y) == z)
        ++v1;
      const auto slab = ds.read<float>({0, z, 0, 0}, {T, 1, Y, X});
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t v = v0; v < v1; ++v)
          out[size_t(t * V + v)] = slab[size_t(t * X * Y + p.voxels[size_t(v)] - z * X * Y)];
      v0 = v1;
    }
  } else {
    io::NiftiReader r(file);
    const auto& d = r.header().dims;
    if (d.size() != 4 || d[0] != X || d[1] != Y || d[2] != p.grid[2] || d[3] != T)
      throw Error(file + ": shape " + grid_str(d) + " differs from the first session's");
    std::vector<double> vol;
    for (std::int64_t t = 0; t < T; ++t) {
      r.read_volume(vol);
      for (std::int64_t v = 0; v < V; ++v)
        out[size_t(t * V + v)] = float(vol[size_t(p.voxels[size_t(v)])]);
    }
  }
  std::int64_t constant = 0;
  for (std::int64_t v = 0; v < V; ++v) {
    double s = 0, ss = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      const double x = double(out[size_t(t * V + v)]) / 300.0;
      if (!std::isfinite(x))
        throw Error(file + ": a non-finite beta at voxel " + std::to_string(p.voxels[size_t(v)]) +
                    ", trial " + std::to_string(t));
      s += x;
      ss += x * x;
    }
    const double mean = s / double(T), var = std::max(0.0, ss / double(T) - mean * mean);
    const double sd = std::sqrt(var);
    if (sd == 0.0)
      ++constant;
    for (std::int64_t t = 0; t < T; ++t) {
      const double x = double(out[size_t(t * V + v)]) / 300.0;
      out[size_t(t * V + v)] = float(!zscore ? x : (sd > 0 ? (x - mean) / sd : 0.0));
    }
  }
  return constant;
}

} // namespace

void import_nsd(const NsdOptions& o, MPI_Comm comm) {
  const int me = mpi::rank(comm), P = mpi::size(comm);
  Plan p;
  mpi::collective_check(comm, [&] { p = make_plan(o); });
  const std::int64_t N = std::int64_t(p.ids.size()), V = std::int64_t(p.voxels.size());
  const std::int64_t S = std::int64_t(p.sessions.size()), T = S * kTrialsPerSession;
  GM_INFO("import-nsd: subject " << o.subject << ", " << S << " sessions (" << T << " trials, "
                                 << (p.hdf5 ? "HDF5" : "NIfTI") << " betas), " << N << " images ("
                                 << p.test.size() << " shared), " << V << " voxels on a "
                                 << grid_str(p.grid) << " grid");
  if (me == 0)
    io::make_directories(o.out_dir);
  GM_CHECK_MPI(MPI_Barrier(comm));

  // brain_fmri.h5: metadata, then one session per rank per round.
  const std::string brain_path = o.out_dir + "/brain_fmri.h5";
  io::OutputFile bout(brain_path, comm);
  {
    const io::File& f = bout.file();
    f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
    f.set_attr("/", "modality", std::string("fmri"));
    f.create_group("/brain");
    f.set_attr("/brain", "source", std::string("NSD"));
    f.set_attr("/brain", "subject", std::int64_t(o.subject));
    f.set_attr("/brain", "sessions",
               std::vector<std::int64_t>(p.sessions.begin(), p.sessions.end()));
    f.set_attr("/brain", "betas", o.space + "/" + o.betas + (p.hdf5 ? " (hdf5)" : " (nii.gz)"));
    f.set_attr("/brain", "units",
               std::string(o.zscore ? "z-scored within session" : "percent signal change"));
    f.set_attr("/brain", "mask", o.mask);
    f.write_small("/brain/trial_stimulus", p.trial_stimulus, {T});
    f.write_small("/brain/test_stimuli", p.test, {std::int64_t(p.test.size())});
    f.write_small("/brain/roi", p.roi, {V});
    f.write_strings("/brain/roi_names", p.roi_names);
    f.write_small("/brain/roi_level", p.roi_level, {std::int64_t(p.roi_level.size())});
    std::vector<std::int32_t> ijk(size_t(V * 3));
    for (std::int64_t v = 0; v < V; ++v) {
      const std::int64_t lin = p.voxels[size_t(v)];
      ijk[size_t(v * 3)] = std::int32_t(lin % p.grid[0]);
      ijk[size_t(v * 3 + 1)] = std::int32_t((lin / p.grid[0]) % p.grid[1]);
      ijk[size_t(v * 3 + 2)] = std::int32_t(lin / (p.grid[0] * p.grid[1]));
    }
    f.write_small("/brain/voxel_ijk", ijk, {V, 3});
    f.set_attr("/brain", "volume_shape", p.grid);
    f.set_attr("/brain", "affine", p.affine);
    const auto ds = f.create_dataset("/brain/responses", io::DType::f32, {T, V});
    const std::int64_t rounds = (S + P - 1) / P;
    Progress prog("import-nsd: betas", rounds, "sessions", double(P));
    std::vector<float> block;
    std::int64_t constant = 0;
    for (std::int64_t r = 0; r < rounds; ++r) {
      const std::int64_t s = r * P + me;
      block.clear();
      mpi::collective_check(comm, [&] {
        if (s < S)
          constant += read_session(p, p.session_files[size_t(s)], o.zscore, block);
      });
      ds.write_rows(block, s < S ? s * kTrialsPerSession : 0);
      prog.advance();
      signals::check(comm, "import-nsd (a rerun starts the import again)");
    }
    prog.finish();
    constant = mpi::sum(comm, constant);
    if (constant > 0)
      GM_WARN("import-nsd: " << constant << " (voxel, session) pairs are constant"
                             << (o.zscore ? " (set to 0 by the z-scoring)" : ""));
  }

  // stimuli.h5: the subject's images, in 73k-id order.
  const std::string stim_path = o.out_dir + "/stimuli.h5";
  const std::int64_t H = o.image_size > 0 ? o.image_size : p.image_h;
  const std::int64_t W = o.image_size > 0 ? o.image_size : p.image_w;
  io::StimuliWriter sout(stim_path, N, H, W, "NSD nsd_stimuli.hdf5 (ids are 1-based 73k ids)",
                         comm);
  {
    const auto& img = sout.images();
    io::File sf = io::File::open(o.root + "/nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", comm);
    const auto brick = sf.dataset("imgBrick");
    write_image_rows(
        img, N, 16, "import-nsd", comm, [&](std::int64_t i, std::vector<std::uint8_t>& buf) {
          const std::int64_t row = i >= 0 ? p.ids[size_t(i)] - 1 : 0;
          auto px =
              brick.read<std::uint8_t>({row, 0, 0, 0}, {i >= 0 ? 1 : 0, p.image_h, p.image_w, 3});
          if (i < 0)
            return;
          if (H != p.image_h || W != p.image_w) {
            io::RgbImage in{p.image_h, p.image_w, std::move(px)};
            px = io::resize_rgb(in, H, W).pixels;
          }
          buf.insert(buf.end(), px.begin(), px.end());
        });
    sout.write_ids(p.ids);
  }
  sout.commit();
  bout.commit();
  GM_INFO("import-nsd: wrote " << stim_path << " and " << brain_path);
}

} // namespace gradmap::importers
