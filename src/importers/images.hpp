#pragma once
// Shared by the importers: filling /stimuli/images in rounds over ranks.
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gradmap/io/h5.hpp"

namespace gradmap::importers {

/// Collective on comm. Fills rows [0, n) of `images` ([n, H, W, 3] uint8): ranks take contiguous
/// blocks, and in each round every rank calls load(i, buf) for up to `batch` slots, with i the
/// global image index or -1 once its block is done (so loaders that do collective reads are
/// called the same number of times on every rank); load appends the image's H x W x 3 bytes.
/// Errors in a round are agreed over ranks; a stop signal ends the import after the round.
void write_image_rows(const io::Dataset& images, std::int64_t n, std::int64_t batch,
                      const std::string& stage, MPI_Comm comm,
                      const std::function<void(std::int64_t, std::vector<std::uint8_t>&)>& load);

} // namespace gradmap::importers
