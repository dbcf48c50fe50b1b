// gradmap report: see report.hpp.
#include "gradmap/report/report.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/process.hpp"
#include "gradmap/core/text.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::report {

namespace {
std::string num(double v) {
  return format_number(v, 8, "");
}

} // namespace

void write_nifti(const std::string& path, const std::vector<std::int64_t>& dims,
                 const std::vector<double>& affine, const std::vector<float>& data) {
  GM_REQUIRE(dims.size() == 3 && affine.size() == 16, "write_nifti: 3 dims and a 4x4 affine");
  unsigned char h[352] = {};
  auto put = [&](size_t off, const void* v, size_t n) { std::memcpy(h + off, v, n); };
  const std::int32_t sizeof_hdr = 348;
  put(0, &sizeof_hdr, 4);
  const std::int16_t dim[8] = {
      3, std::int16_t(dims[0]), std::int16_t(dims[1]), std::int16_t(dims[2]), 1, 1, 1, 1};
  put(40, dim, 16);
  const std::int16_t datatype = 16, bitpix = 32; // float32
  put(70, &datatype, 2);
  put(72, &bitpix, 2);
  float pixdim[8] = {1, 1, 1, 1, 1, 1, 1, 1}; // qfac 1; voxel sizes = column norms
  for (int c = 0; c < 3; ++c)
    pixdim[c + 1] = float(std::sqrt(affine[0 * 4 + c] * affine[0 * 4 + c] +
                                    affine[1 * 4 + c] * affine[1 * 4 + c] +
                                    affine[2 * 4 + c] * affine[2 * 4 + c]));
  put(76, pixdim, 32);
  const float vox_offset = 352, slope = 1, inter = 0;
  put(108, &vox_offset, 4);
  put(112, &slope, 4);
  put(116, &inter, 4);
  const char xyzt_units = 2 | 8; // mm, s
  put(123, &xyzt_units, 1);
  const char descrip[] = "gradmap";
  put(148, descrip, sizeof descrip);
  const std::int16_t qform = 0, sform = 2;
  put(252, &qform, 2);
  put(254, &sform, 2);
  for (int r = 0; r < 3; ++r) {
    float row[4];
    for (int c = 0; c < 4; ++c)
      row[c] = float(affine[r * 4 + c]);
    put(280 + 16 * size_t(r), row, 16);
  }
  put(344, "n+1\0", 4);
  const std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(reinterpret_cast<const char*>(h), 352);
    f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * 4));
    if (!f)
      throw Error("cannot write " + tmp);
  }
  std::filesystem::rename(tmp, path);
}

namespace {

// NIfTI maps of one kind of an fMRI analysis: best r over layers, peak layer (1-based; 0 = not
// significant / no voxel), minimum BH q over layers (1 outside the voxels). Collective on comm
// (the reads); rank 0 (root) writes the maps.
void write_kind_maps(const io::File& sf, const std::string& base, const std::string& kind,
                     std::int64_t L, const std::string& brain_path, const std::string& maps,
                     bool root, MPI_Comm comm) {
  io::File bf = io::File::open(brain_path, comm);
  const auto shape = bf.attr_ints("/brain", "volume_shape");
  const auto affine = bf.attr_doubles("/brain", "affine");
  const auto ijk = bf.dataset("/brain/voxel_ijk").read_all<std::int64_t>();
  const auto r = sf.dataset(base + "r").read_all<float>();
  const auto q = sf.dataset(base + "q_bh").read_all<double>();
  const std::int64_t T = std::int64_t(r.size()) / L;
  GM_REQUIRE(std::int64_t(ijk.size()) == 3 * T,
             brain_path + ": /brain/voxel_ijk does not match the scored voxels");
  const auto peak = sf.exists(base + "peak_layer")
                        ? sf.dataset(base + "peak_layer").read_all<std::int32_t>()
                        : std::vector<std::int32_t>(size_t(T), -1);
  const size_t nvox = size_t(shape[0] * shape[1] * shape[2]);
  std::vector<float> best(nvox, 0.0f), pk(nvox, 0.0f), qmin(nvox, 1.0f);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t i = ijk[3 * t], j = ijk[3 * t + 1], k = ijk[3 * t + 2];
    if (i < 0 || j < 0 || k < 0 || i >= shape[0] || j >= shape[1] || k >= shape[2])
      throw Error(brain_path + ": voxel " + std::to_string(t) + " lies outside volume_shape");
    const size_t v = size_t(i + shape[0] * (j + shape[1] * k));
    float b = -INFINITY;
    double qm = 1;
    for (std::int64_t l = 0; l < L; ++l) {
      if (!std::isnan(r[l * T + t]))
        b = std::max(b, r[l * T + t]);
      if (!std::isnan(q[l * T + t]))
        qm = std::min(qm, q[l * T + t]);
    }
    best[v] = std::isfinite(b) ? b : 0.0f;
    qmin[v] = float(qm);
    pk[v] = float(peak[t] + 1);
  }
  if (root) {
    write_nifti(maps + "/best_r_" + kind + ".nii", shape, affine, best);
    write_nifti(maps + "/peak_layer_" + kind + ".nii", shape, affine, pk);
    write_nifti(maps + "/q_bh_min_" + kind + ".nii", shape, affine, qmin);
  }
}

// The voxel-level space verdicts as a map: 0 outside / not tested, 1 undetermined,
// 2 diverges, 3 consistent (statistics.md, "Voxel level"). Collective on comm.
void write_verdict_map(const io::File& sf, const std::string& brain_path, const std::string& maps,
                       bool root, MPI_Comm comm) {
  io::File bf = io::File::open(brain_path, comm);
  const auto shape = bf.attr_ints("/brain", "volume_shape");
  const auto affine = bf.attr_doubles("/brain", "affine");
  const auto ijk = bf.dataset("/brain/voxel_ijk").read_all<std::int64_t>();
  const auto verdict = sf.dataset("/fmri/D_space_voxel/verdict").read_all<std::int32_t>();
  GM_REQUIRE(ijk.size() == 3 * verdict.size(),
             brain_path + ": /brain/voxel_ijk does not match the tested voxels");
  std::vector<float> vol(size_t(shape[0] * shape[1] * shape[2]), 0.0f);
  for (size_t t = 0; t < verdict.size(); ++t) // bounds checked with the maps above
    vol[size_t(ijk[3 * t] + shape[0] * (ijk[3 * t + 1] + shape[1] * ijk[3 * t + 2]))] =
        float(verdict[t]);
  if (root)
    write_nifti(maps + "/D_space_voxel_verdict.nii", shape, affine, vol);
}

// One modality of stats.h5 (fmri or meg): its group and significance tables, its headline rows
// and (fMRI) its maps. Collective on comm; rank 0 (root) writes the files.
void report_modality(const io::File& sf, const std::string& mod, const std::string& tables,
                     const std::string& maps, bool root, std::ostringstream& headline,
                     MPI_Comm comm) {
  const char* kinds[2] = {"activations", "gradients"};
  const bool meg = mod == "meg";
  const auto layers = sf.attr_strings("/" + mod, "layers");
  const auto value = sf.dataset("/" + mod + "/groups/value").read_all<double>();
  const std::int64_t L = std::int64_t(layers.size()), G = std::int64_t(value.size());
  std::vector<std::string> names;
  std::string brain_path;
  if (!meg) { // ROI names and the voxel grid from the brain file behind the scores
    const std::string scores = sf.attr_string("/" + mod, "scores");
    io::File scf = io::File::open(scores, comm);
    brain_path = scf.attr_string("/", "brain");
    names = scf.dataset("/groups/names").read_strings();
  }
  std::ostringstream group_csv, sig_csv;
  group_csv << (meg ? "kind,layer,time_s,mean_r\n" : "kind,layer,roi,level,mean_r\n");
  sig_csv << "kind,layer,n_significant_bh,n_significant_fwer\n";
  for (const char* kind : kinds) {
    const std::string base = "/" + mod + "/" + kind + "/";
    if (!sf.exists(base + "r"))
      continue;
    const auto g = sf.dataset(base + "group_r").read_all<double>();
    for (std::int64_t l = 0; l < L; ++l)
      for (std::int64_t j = 0; j < G; ++j)
        group_csv << kind << "," << layers[l] << ","
                  << (meg ? num(value[j]) : names[j] + "," + num(value[j])) << ","
                  << num(g[l * G + j]) << "\n";
    const auto nb = sf.dataset(base + "n_significant_bh").read_all<std::int64_t>();
    const auto nf = sf.dataset(base + "n_significant_fwer").read_all<std::int64_t>();
    for (std::int64_t l = 0; l < L; ++l)
      sig_csv << kind << "," << layers[l] << "," << nb[l] << "," << nf[l] << "\n";
    const std::string rho = meg ? "rho_time" : "rho_space";
    const auto s = sf.dataset(base + rho).read_all<double>();
    headline << mod << "," << rho << "," << kind << "," << num(s[0]) << "," << num(s[1]) << ","
             << num(s[2]) << "," << num(s[3]) << "\n";
    if (!meg)
      write_kind_maps(sf, base, kind, L, brain_path, maps, root, comm);
  }
  if (!meg && sf.exists("/fmri/D_space_voxel/verdict"))
    write_verdict_map(sf, brain_path, maps, root, comm);
  if (sf.exists("/" + mod + (meg ? "/D_time" : "/D_space"))) {
    const auto d = sf.dataset("/" + mod + (meg ? "/D_time" : "/D_space")).read_all<double>();
    headline << mod << "," << (meg ? "D_time" : "D_space") << ",," << num(d[0]) << "," << num(d[1])
             << "," << num(d[2]) << "," << num(d[3]) << "\n";
  }
  if (root) {
    write_file_atomically(tables + "/" + (meg ? "latency_curves.csv" : "roi_layer_scores.csv"),
                          group_csv.str());
    write_file_atomically(tables + "/significant_" + mod + ".csv", sig_csv.str());
  }
}

} // namespace

void report(const ReportOptions& o, MPI_Comm comm) {
  if (o.stats.empty())
    throw UsageError("--stats: a stats directory is required");
  if (o.out.empty())
    throw UsageError("--out: a report directory is required");
  const bool root = mpi::rank(comm) == 0;
  io::File sf = io::File::open(o.stats + "/stats.h5", comm);
  std::string script;
  mpi::collective_check(comm, [&] {
    script = find_tool("report.py", o.script, "GRADMAP_REPORT_SCRIPT");
    if (!std::filesystem::exists(o.stats + "/summary.json"))
      throw UsageError(o.stats + "/summary.json is missing (an incomplete stats run?)");
  });
  const std::string tables = o.out + "/tables", maps = o.out + "/maps";
  if (root) {
    io::make_directories(tables);
    io::make_directories(maps);
  }
  GM_CHECK_MPI(MPI_Barrier(comm));
  std::ostringstream headline;
  headline << "modality,statistic,kind,value,ci_low,ci_high,p\n";
  for (const std::string mod : {"fmri", "meg"})
    if (sf.exists("/" + mod))
      report_modality(sf, mod, tables, maps, root, headline, comm);
  if (root)
    write_file_atomically(tables + "/headline.csv", headline.str());

  // Figures and the HTML page (rank 0 runs the script; its exit status is shared).
  int rc = 0;
  if (root)
    rc = run_program({o.python, script, o.stats, o.out});
  GM_CHECK_MPI(MPI_Bcast(&rc, 1, MPI_INT, 0, comm));
  if (rc != 0)
    throw UsageError("report: " + o.python + " " + script + " failed (exit " + std::to_string(rc) +
                     "); it needs python3-matplotlib, python3-h5py");
  GM_INFO("report: wrote " << o.out << "/index.html");
}

} // namespace gradmap::report
