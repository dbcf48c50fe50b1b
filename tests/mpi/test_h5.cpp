// The parallel HDF5 layer: collective row- and column-block I/O, strings, attributes, and
// outputs that are only visible under their final name once complete.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "gradmap/io/h5.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "tmpdir.hpp"

using namespace gradmap;
namespace fs = std::filesystem;

namespace {
MPI_Comm world() {
  return MPI_COMM_WORLD;
}
} // namespace

TEST(H5, RowBlocksWrittenByEachRankReadBackWhole) {
  const std::string dir = shared_tmpdir(world(), "rows");
  const std::int64_t n = 37, k = 5;
  const auto b = mpi::block_of(n, mpi::size(world()), mpi::rank(world()));
  {
    io::OutputFile out(dir + "/rows.h5", world());
    auto ds = out.file().create_dataset("/x/data", io::DType::f32, {n, k}, {8, k});
    std::vector<float> mine;
    for (auto r = b.begin; r < b.end; ++r)
      for (std::int64_t c = 0; c < k; ++c)
        mine.push_back(float(r * 100 + c));
    ds.write_rows(mine, b.begin);
    out.commit();
  }
  io::File f = io::File::open(dir + "/rows.h5", world());
  auto ds = f.dataset("/x/data");
  EXPECT_EQ(ds.shape(), (std::vector<std::int64_t>{n, k}));
  EXPECT_EQ(ds.dtype(), io::DType::f32);
  const auto all = ds.read_all<double>(); // converted by HDF5
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < k; ++c)
      ASSERT_EQ(all[r * k + c], double(r * 100 + c));
  const auto part = ds.read_rows<float>(b.begin, b.end);
  ASSERT_EQ(part.size(), size_t(b.size() * k));
  if (b.size() > 0) {
    EXPECT_EQ(part[0], float(b.begin * 100));
  }
}

TEST(H5, ColumnBlocksOfARowMajorDataset) {
  const std::string dir = shared_tmpdir(world(), "cols");
  const std::int64_t t = 11, v = 9;
  const auto b = mpi::block_of(v, mpi::size(world()), mpi::rank(world()));
  {
    io::OutputFile out(dir + "/cols.h5", world());
    auto ds = out.file().create_dataset("/y", io::DType::f64, {t, v}, {4, 4});
    std::vector<double> mine;
    for (std::int64_t r = 0; r < t; ++r)
      for (auto c = b.begin; c < b.end; ++c)
        mine.push_back(r + 0.001 * c);
    ds.write(mine.data(), {0, b.begin}, {b.size() ? t : 0, b.size()});
    out.commit();
  }
  io::File f = io::File::open(dir + "/cols.h5", world());
  const auto all = f.dataset("/y").read_all<double>();
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int64_t c = 0; c < v; ++c)
      ASSERT_DOUBLE_EQ(all[r * v + c], r + 0.001 * c);
  // A column block read back by each rank.
  const auto mine = f.dataset("/y").read<double>({0, b.begin}, {t, b.size()});
  for (std::int64_t r = 0; r < t && b.size(); ++r)
    EXPECT_DOUBLE_EQ(mine[r * b.size()], r + 0.001 * b.begin);
}

TEST(H5, LargeChunksAreReadTileByTileCollectively) {
  // Chunks of 64 x 4 x 1100 floats (1.1 MB) exceed the 1 MiB chunk cache, so reads go chunk by
  // chunk: uneven boxes per rank (different tile counts, one rank empty), HDF5 conversion to
  // double, and a box inside one chunk.
  const std::string dir = shared_tmpdir(world(), "bigchunks");
  const std::int64_t a = 70, b = 9, c = 1100;
  auto value = [](std::int64_t i, std::int64_t j, std::int64_t k) {
    return float(i * 100000 + j * 2000 + k);
  };
  const int me = mpi::rank(world()), P = mpi::size(world());
  {
    io::OutputFile out(dir + "/big.h5", world());
    auto ds = out.file().create_dataset("/r", io::DType::f32, {a, b, c}, {64, 4, c});
    const auto rows = mpi::block_of(a, P, me);
    std::vector<float> mine;
    for (auto i = rows.begin; i < rows.end; ++i)
      for (std::int64_t j = 0; j < b; ++j)
        for (std::int64_t k = 0; k < c; ++k)
          mine.push_back(value(i, j, k));
    ds.write(mine.data(), {rows.begin, 0, 0}, {rows.size(), b, c});
    out.commit();
  }
  io::File f = io::File::open(dir + "/big.h5", world());
  auto ds = f.dataset("/r");
  const bool empty = P > 1 && me == P - 1;
  const auto blk = empty ? mpi::Block{} : mpi::block_of(b, std::max(1, P - 1), me);
  const std::vector<std::int64_t> start = {3, empty ? 0 : blk.begin, 5};
  const std::vector<std::int64_t> count = {65, empty ? 0 : blk.size(), c - 5};
  const auto got = ds.read<double>(start, count);
  ASSERT_EQ(got.size(), size_t(count[0] * count[1] * count[2]));
  for (std::int64_t i = 0; i < count[0]; ++i)
    for (std::int64_t j = 0; j < count[1]; ++j)
      for (std::int64_t k = 0; k < count[2]; ++k)
        ASSERT_EQ(got[size_t((i * count[1] + j) * count[2] + k)],
                  double(value(start[0] + i, start[1] + j, start[2] + k)))
            << i << " " << j << " " << k;
  const auto inside = ds.read<float>({10, 1, 100}, {2, 2, 3});
  EXPECT_EQ(inside[0], value(10, 1, 100));
  EXPECT_EQ(inside[11], value(11, 2, 102));
  const auto all = ds.read_all<float>();
  EXPECT_EQ(all.back(), value(a - 1, b - 1, c - 1));
}

TEST(H5, StringsAndAttributesRoundTrip) {
  const std::string dir = shared_tmpdir(world(), "attrs");
  {
    io::OutputFile out(dir + "/a.h5", world());
    const io::File& f = out.file();
    f.set_attr("/", "gradmap_schema", std::int64_t{1});
    f.create_group("/g/h");
    f.set_attr("/g", "name", std::string("hello"));
    f.set_attr("/g", "affine", std::vector<double>{1.5, 2.5});
    f.set_attr("/g", "shape", std::vector<std::int64_t>{3, 4, 5});
    f.set_attr("/g", "layers", std::vector<std::string>{"conv1", "conv2"});
    f.write_strings("/g/names", {"V1", "hV4", "parietal"});
    f.write_small("/g/h/v", std::vector<std::int32_t>{7, 8, 9}, {3});
    out.commit();
  }
  io::File f = io::File::open(dir + "/a.h5", world());
  EXPECT_EQ(f.attr_int("/", "gradmap_schema"), 1);
  EXPECT_EQ(f.attr_string("/g", "name"), "hello");
  EXPECT_EQ(f.attr_doubles("/g", "affine"), (std::vector<double>{1.5, 2.5}));
  EXPECT_EQ(f.attr_ints("/g", "shape"), (std::vector<std::int64_t>{3, 4, 5}));
  EXPECT_EQ(f.attr_strings("/g", "layers"), (std::vector<std::string>{"conv1", "conv2"}));
  EXPECT_EQ(f.dataset("/g/names").read_strings(),
            (std::vector<std::string>{"V1", "hV4", "parietal"}));
  EXPECT_EQ(f.dataset("/g/h/v").read_all<std::int64_t>(), (std::vector<std::int64_t>{7, 8, 9}));
  EXPECT_EQ(f.members("/g"), (std::vector<std::string>{"h", "names"}));
  EXPECT_TRUE(f.exists("/g/h/v"));
  EXPECT_FALSE(f.exists("/g/nope/v"));
  EXPECT_FALSE(f.has_attr("/g", "missing"));
  EXPECT_THROW(f.attr_string("/g", "missing"), Error);
  EXPECT_THROW(f.dataset("/g/none"), Error);
}

TEST(H5, OutputIsPartialUntilCommitted) {
  const std::string dir = shared_tmpdir(world(), "partial");
  const std::string path = dir + "/out.h5";
  io::OutputFile out(path, world());
  out.file().write_small("/v", std::vector<double>{1, 2}, {2});
  MPI_Barrier(world());
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::exists(io::OutputFile::partial_name(path)));
  MPI_Barrier(world());
  out.commit();
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(io::OutputFile::partial_name(path)));
}

TEST(H5, OpeningMissingOrCorruptFilesNamesThemOnEveryRank) {
  const std::string dir = shared_tmpdir(world(), "bad");
  try {
    io::File::open(dir + "/absent.h5", world());
    FAIL() << "no error for a missing file";
  } catch (const Error& e) {
    EXPECT_TRUE(e.collective);
    EXPECT_NE(std::string(e.what()).find("file not found: " + dir + "/absent.h5"),
              std::string::npos);
  }
  if (mpi::rank(world()) == 0)
    std::ofstream(dir + "/junk.h5") << "this is not HDF5";
  MPI_Barrier(world());
  try {
    io::File::open(dir + "/junk.h5", world());
    FAIL() << "no error for a corrupt file";
  } catch (const Error& e) {
    EXPECT_TRUE(e.collective);
    EXPECT_NE(std::string(e.what()).find("not an HDF5 file"), std::string::npos) << e.what();
  }
}
