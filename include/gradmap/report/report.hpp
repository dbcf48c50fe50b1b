#pragma once
// `gradmap report`: from a stats directory, CSV tables and NIfTI-1 maps (written here, in C++),
// then figures and a self-contained HTML page (tools/report.py, matplotlib, called by the
// binary). Writes OUT/index.html, OUT/figures/*.png, OUT/tables/*.csv, OUT/maps/*.nii.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::report {

/// Not collective. Writes a NIfTI-1 single file (.nii, float32, x fastest) of shape dims with
/// the 4x4 row-major voxel-to-world affine as sform (code 2, aligned) and qform code 0.
void write_nifti(const std::string& path, const std::vector<std::int64_t>& dims,
                 const std::vector<double>& affine, const std::vector<float>& data);

struct ReportOptions {
  std::string stats; ///< directory with stats.h5 and summary.json
  std::string out;   ///< report directory
  std::string python = "/usr/bin/python3";
  std::string script; ///< tools/report.py (default: found next to the binary or in the source)
};

/// Collective on comm: every rank reads, rank 0 writes; errors are agreed.
void report(const ReportOptions& o, MPI_Comm comm);

} // namespace gradmap::report
