// The schema validator on files made by simulate and on broken variants: every rank must raise
// the same error, naming the file and dataset.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/sim/simulate.hpp"
#include "tmpdir.hpp"

using namespace gradmap;

namespace {
MPI_Comm world() {
  return MPI_COMM_WORLD;
}

std::string simulated(const std::string& name) {
  const std::string dir = shared_tmpdir(world(), name);
  sim::SimulateOptions o;
  o.out_dir = dir;
  o.images = 48;
  o.test_images = 8;
  o.image_size = 16;
  o.voxels = 70;
  o.sensors = 5;
  o.times = 12;
  sim::simulate(o, world());
  return dir;
}

// A minimal fMRI brain file written through the io layer; `nan_row` (if >= 0) gets a NaN.
void write_brain(const std::string& path, std::int64_t nan_row, std::int64_t bad_stimulus) {
  const std::int64_t trials = 6, voxels = 4;
  io::OutputFile out(path, world());
  const io::File& f = out.file();
  f.set_attr("/", "gradmap_schema", std::int64_t{1});
  f.set_attr("/", "modality", std::string("fmri"));
  std::vector<float> resp(trials * voxels, 1.0f);
  for (std::int64_t i = 0; i < trials * voxels; ++i)
    resp[i] = float(i % 7);
  if (nan_row >= 0)
    resp[nan_row * voxels + 2] = std::numeric_limits<float>::quiet_NaN();
  f.write_small("/brain/responses", resp, {trials, voxels});
  std::vector<std::int64_t> ts = {0, 1, 2, 0, 1, bad_stimulus >= 0 ? bad_stimulus : 2};
  f.write_small("/brain/trial_stimulus", ts, {trials});
  f.write_small("/brain/test_stimuli", std::vector<std::int64_t>{1}, {1});
  f.write_small("/brain/roi", std::vector<std::int32_t>{0, 0, 1, 1}, {voxels});
  f.write_strings("/brain/roi_names", {"V1", "V2"});
  f.write_small("/brain/roi_level", std::vector<std::int32_t>{1, 2}, {2});
  f.write_small("/brain/voxel_ijk", std::vector<std::int32_t>{0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1, 0},
                {voxels, 3});
  f.set_attr("/brain", "volume_shape", std::vector<std::int64_t>{2, 2, 1});
  f.set_attr("/brain", "affine",
             std::vector<double>{1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1});
  out.commit();
}

std::string collective_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_TRUE(e.collective) << e.what();
    return e.what();
  }
  return "";
}
} // namespace

TEST(Schema, SimulatedFilesPassTheValidator) {
  const std::string dir = simulated("schema-ok");
  io::File s = io::File::open(dir + "/stimuli.h5", world());
  const auto si = io::check_stimuli(s);
  EXPECT_EQ(si.n, 48);
  EXPECT_EQ(si.height, 16);
  EXPECT_TRUE(si.has_labels);
  io::File b = io::File::open(dir + "/brain_fmri.h5", world());
  const auto bi = io::check_brain(b, si.n);
  EXPECT_EQ(bi.modality, "fmri");
  EXPECT_EQ(bi.trials, 96);
  EXPECT_EQ(bi.targets, 70);
  io::File m = io::File::open(dir + "/brain_meg.h5", world());
  const auto mi = io::check_brain(m, si.n);
  EXPECT_EQ(mi.modality, "meg");
  EXPECT_EQ(mi.sensors, 5);
  EXPECT_EQ(mi.times, 12);
  EXPECT_EQ(mi.targets, 60);
  EXPECT_EQ(io::file_kind(m), "brain");
}

TEST(Schema, NanInOneRanksBlockIsReportedOnEveryRank) {
  const std::string dir = shared_tmpdir(world(), "schema-nan");
  write_brain(dir + "/nan.h5", /*nan_row=*/5, -1); // the last row: the last rank's block
  io::File f = io::File::open(dir + "/nan.h5", world());
  const std::string msg = collective_error([&] { io::check_brain(f); });
  EXPECT_NE(msg.find("/brain/responses in " + dir + "/nan.h5: non-finite value"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("row 5, element 2"), std::string::npos) << msg;
}

TEST(Schema, StimulusIndexOutOfRangeNamesTheTrial) {
  const std::string dir = shared_tmpdir(world(), "schema-range");
  write_brain(dir + "/range.h5", -1, /*bad_stimulus=*/9);
  io::File f = io::File::open(dir + "/range.h5", world());
  EXPECT_NO_THROW(io::check_brain(f)); // without a stimuli count only negatives are caught
  const std::string msg = collective_error([&] { io::check_brain(f, 3); });
  EXPECT_NE(msg.find("/brain/trial_stimulus in " + dir +
                     "/range.h5: trial 5 shows stimulus 9, "
                     "outside [0, 3)"),
            std::string::npos)
      << msg;
}

TEST(Schema, WrongKindOfFileIsRejected) {
  const std::string dir = simulated("schema-kind");
  io::File s = io::File::open(dir + "/stimuli.h5", world());
  const std::string msg = collective_error([&] { io::check_brain(s); });
  EXPECT_NE(msg.find("attribute modality missing"), std::string::npos) << msg;
  const std::string msg2 = collective_error([&] { io::check_features(s); });
  EXPECT_NE(msg2.find("group /features missing"), std::string::npos) << msg2;
}
