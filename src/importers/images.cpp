// Image rows over ranks: see images.hpp.
#include "images.hpp"

#include <algorithm>

#include "gradmap/core/progress.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"

namespace gradmap::importers {

void write_image_rows(const io::Dataset& images, std::int64_t n, std::int64_t batch,
                      const std::string& stage, MPI_Comm comm,
                      const std::function<void(std::int64_t, std::vector<std::uint8_t>&)>& load) {
  const int me = mpi::rank(comm), P = mpi::size(comm);
  const mpi::Block mine = mpi::block_of(n, P, me);
  const std::int64_t most = mpi::block_of(n, P, 0).size();
  Progress prog(stage + ": images", most, "images", double(P));
  std::vector<std::uint8_t> buf;
  for (std::int64_t b0 = 0; b0 < most; b0 += batch) {
    buf.clear();
    const std::int64_t b1 = std::min(most, b0 + batch);
    mpi::collective_check(comm, [&] {
      for (std::int64_t i = b0; i < b1; ++i)
        load(i < mine.size() ? mine.begin + i : -1, buf);
    });
    images.write_rows(buf, mine.begin + std::min(b0, mine.size()));
    prog.advance(b1 - b0);
    signals::check(comm, stage + " (a rerun starts the import again)");
  }
  prog.finish();
}

} // namespace gradmap::importers
