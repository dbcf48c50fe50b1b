#pragma once
// A streaming reader for NIfTI-1 single files (.nii or .nii.gz, little- or big-endian), volume by
// volume, so a 4-D file of any length is read in the memory of one 3-D volume. Values are
// returned through the header's scl_slope/scl_inter (when the slope is set and non-zero) as
// double; the affine is nibabel's "best affine" (sform if its code is set, else qform, else the
// centred base affine), row-major 4x4.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gradmap::io {

struct NiftiHeader {
  std::vector<std::int64_t> dims; ///< dim[1..dim[0]]
  int datatype = 0;
  double slope = 0, inter = 0;
  std::int64_t vox_offset = 352;
  std::vector<double> affine; ///< 16 values, row-major
  bool swapped = false;
  std::int64_t volume_size() const; ///< product of the first three dims
  std::int64_t volumes() const;     ///< product of dims 4..7 (1 for a 3-D file)
};

class NiftiReader {
public:
  /// Not collective. Opens `path` and reads its header; throws naming the file when it is
  /// missing, not NIfTI-1, or of an unsupported data type.
  explicit NiftiReader(const std::string& path);
  ~NiftiReader();
  NiftiReader(const NiftiReader&) = delete;
  NiftiReader& operator=(const NiftiReader&) = delete;
  const NiftiHeader& header() const { return h_; }
  const std::string& path() const { return path_; }
  /// Reads the next volume (x fastest), scaled. Throws naming the file if it is truncated.
  void read_volume(std::vector<double>& out);

private:
  std::string path_;
  NiftiHeader h_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::int64_t next_ = 0;
};

/// Not collective. Reads a whole 3-D NIfTI file (x fastest), values scaled.
std::vector<double> read_nifti_volume(const std::string& path, NiftiHeader* header = nullptr);

} // namespace gradmap::io
