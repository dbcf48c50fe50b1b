#pragma once
// `gradmap import-things-meg`: one THINGS-MEG participant's preprocessed epochs (MNE .fif) and
// the THINGS image folders -> stimuli.h5 and brain_meg.h5 in gradmap's schema. The FIF is read
// by tools/things_meg_convert.py (MNE, streamed in blocks of epochs); this side validates what
// it wrote (shapes, finite values, times, sensors, metadata), maps trials to images, decodes the
// JPEGs (libjpeg; ranks split the images) and resizes them with antialiasing.
#include <mpi.h>

#include <cstdint>
#include <string>

namespace gradmap::importers {

struct ThingsMegOptions {
  std::string epochs;  ///< preprocessed_P1-epo.fif (its -1, -2 ... split parts follow)
  std::string images;  ///< folder holding images_meg/ and images_test_meg/
  std::string out_dir; ///< writes stimuli.h5, brain_meg.h5
  std::int64_t image_size = 224;
  std::string python = "/usr/bin/python3";
  std::string script;       ///< tools/things_meg_convert.py (found beside the binary by default)
  std::int64_t block = 256; ///< epochs per block in the converter
};

/// Collective on comm. Errors (missing file or image, FIF without metadata, inconsistent shapes)
/// are raised on every rank, naming the file.
void import_things_meg(const ThingsMegOptions& o, MPI_Comm comm);

} // namespace gradmap::importers
