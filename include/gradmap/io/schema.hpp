#pragma once
// The data schema (docs/design.md) and its validator. Every reader calls these before using a file:
// they check the `gradmap_schema` attribute, the presence, dtype and shape of each dataset, index
// ranges and NaN/Inf, and name the file and dataset that is wrong. Metadata checks run
// identically on every rank; data checks are split over ranks (row blocks) and agreed with
// mpi::collective_check, so an error is raised on every rank, never on one alone.
#include <cstdint>
#include <string>
#include <vector>

#include "gradmap/io/h5.hpp"

namespace gradmap::io {

constexpr std::int64_t kSchemaVersion = 1;

struct StimuliInfo {
  std::int64_t n = 0, height = 0, width = 0;
  bool has_labels = false;
};

struct BrainInfo {
  std::string modality; ///< "fmri" | "meg"
  std::int64_t trials = 0;
  std::int64_t targets = 0;            ///< voxels, or sensors x times (flattened sensor-major)
  std::int64_t sensors = 0, times = 0; ///< MEG only
  std::int64_t max_stimulus = -1;      ///< largest index in trial_stimulus
};

struct FeaturesInfo {
  std::int64_t n = 0;
  std::vector<std::string> kinds;  ///< e.g. activations, gradients
  std::vector<std::string> layers; ///< network order (attribute `layers`) or sorted names
  std::vector<std::int64_t> dims;  ///< per layer (same for every kind)
};

/// Which kind of gradmap file this is: "stimuli", "brain" or "features" (throws otherwise).
/// Not collective.
std::string file_kind(const File& f);

/// Collective on the file's comm.
StimuliInfo check_stimuli(const File& f);
/// Collective on the file's comm. When n_stimuli >= 0, trial and test indices must be below it.
/// scan_values = false leaves the NaN/Inf scan of /brain/responses to a caller that reads
/// them anyway (encode checks each chunk as it reads it).
BrainInfo check_brain(const File& f, std::int64_t n_stimuli = -1, bool scan_values = true);
/// Collective on the file's comm.
FeaturesInfo check_features(const File& f);

/// The one writer of stimuli.h5 (simulate and the importers): creates `<path>.partial` with the
/// schema attribute, /stimuli (attribute `source`), /stimuli/images u8 [n, height, width, 3]
/// (chunks of up to 64 images) and /stimuli/ids i64 [n]; the caller writes the image rows
/// (images()), may add attributes or datasets (file()), and commits. Collective on comm.
class StimuliWriter {
public:
  StimuliWriter(const std::string& path, std::int64_t n, std::int64_t height, std::int64_t width,
                const std::string& source, MPI_Comm comm);
  const File& file() { return out_.file(); }
  const Dataset& images() const { return images_; }
  /// Collective. Every rank passes all n ids; each writes its block of rows.
  void write_ids(const std::vector<std::int64_t>& ids);
  /// Collective. Checks the file against the schema, then renames it to its final name.
  void commit();

private:
  OutputFile out_;
  Dataset images_;
  std::int64_t n_;
  MPI_Comm comm_;
};

} // namespace gradmap::io
