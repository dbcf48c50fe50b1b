#pragma once
// `gradmap import-nsd`: the Natural Scenes Dataset in its published layout -> stimuli.h5 and
// brain_fmri.h5 in gradmap's schema (docs/design.md). Streams one session of betas at a time per
// rank (ranks take sessions round-robin) and the stimuli one image at a time, so memory is
// bounded by one session's [750, voxels] block whatever the subject's size.
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::importers {

struct NsdOptions {
  std::string root;                 ///< NSD root (nsddata/, nsddata_betas/, nsddata_stimuli/)
  int subject = 0;                  ///< 1..8
  std::string out_dir;              ///< writes stimuli.h5, brain_fmri.h5
  std::vector<int> sessions;        ///< 1-based; empty = all of the subject's sessions
  std::string space = "func1pt8mm"; ///< func1pt8mm | func1mm
  std::string betas = "betas_fithrf_GLMdenoise_RR";
  std::string format = "auto";     ///< auto | hdf5 | nifti
  std::string mask = "nsdgeneral"; ///< ROI file name under the subject's roi/ folder, or a path
  std::vector<std::string> rois = {"prf-visualrois", "streams"}; ///< label atlases, first wins
  bool zscore = true;          ///< z-score each voxel within each session
  std::int64_t image_size = 0; ///< 0 = keep NSD's size; else resize (antialiased)
};

/// Sessions each NSD subject completed (subjects 1..8).
int nsd_sessions(int subject);
/// Parses "1-3,5" / "all" into session numbers (throws UsageError naming --sessions).
std::vector<int> parse_sessions(const std::string& text);

/// Collective on comm. Errors (missing files, grids that disagree, subject or session out of
/// range, a corrupt file) are raised on every rank, naming the file or option.
void import_nsd(const NsdOptions& o, MPI_Comm comm);

} // namespace gradmap::importers
