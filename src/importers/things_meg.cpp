// gradmap import-things-meg: see things_meg.hpp. Dataset facts: Hebart et al. 2023 (eLife),
// OpenNeuro ds004212; docs/datasets.md lists the files read here.
#include "gradmap/importers/things_meg.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/process.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/image.hpp"
#include "gradmap/io/schema.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/partition.hpp"
#include "images.hpp"

namespace gradmap::importers {

namespace fs = std::filesystem;

namespace {

// The file of an image_path from the metadata: under --images as given, or without its first
// folder (images_meg/... when --images already is that folder).
std::string resolve_image(const fs::path& dir, const std::string& rel) {
  const fs::path a = dir / rel;
  if (fs::exists(a))
    return a.string();
  const auto slash = rel.find('/');
  if (slash != std::string::npos && fs::exists(dir / rel.substr(slash + 1)))
    return (dir / rel.substr(slash + 1)).string();
  throw Error(a.string() + ": image file missing (image_path '" + rel +
              "' of the epochs' metadata)");
}

// Step 1: the converter (rank 0) streams the epochs into the partial brain file. Collective on
// comm: a failure throws on every rank with the converter's last log line.
void run_converter(const ThingsMegOptions& o, const std::string& script, const std::string& partial,
                   const std::string& log_path, MPI_Comm comm) {
  const int me = mpi::rank(comm);
  int rc = 0;
  if (me == 0) {
    GM_INFO("import-things-meg: reading " << o.epochs << " with MNE (log: " << log_path << ")");
    rc = run_program({o.python, script, "--epochs", o.epochs, "--out", partial, "--block",
                      std::to_string(o.block)},
                     log_path);
  }
  GM_CHECK_MPI(MPI_Bcast(&rc, 1, MPI_INT, 0, comm));
  if (rc != 0) {
    const std::string why = mpi::broadcast(comm, me == 0 ? last_line(log_path) : "");
    Error e("import-things-meg: " + (why.empty()
                                         ? o.python + " " + script + " failed (exit " +
                                               std::to_string(rc) + ", see " + log_path + ")"
                                         : why));
    e.collective = true;
    throw e;
  }
}

// The trials mapped to images: one image per distinct image_path (sorted), the test images
// (shown in 'test' trials), and the images' ids (things_image_nr when it is one number per
// image, else 1..N).
struct TrialMap {
  std::int64_t n = 0;                       ///< trials
  std::vector<std::string> images, files;   ///< image_path per image, and its file
  std::vector<std::int64_t> trial_stimulus; ///< [n] index into images
  std::vector<std::int64_t> test;           ///< indices into images
  std::vector<std::int64_t> ids;            ///< per image
};

// Step 2: validate the partial brain file's shapes and metadata, and map trials to images.
TrialMap map_trials(const ThingsMegOptions& o, const io::File& f, const std::string& partial) {
  TrialMap m;
  const auto shape = f.dataset("/brain/responses").shape();
  if (shape.size() != 3)
    throw Error(partial + ": /brain/responses is not [trials, sensors, times]");
  m.n = shape[0];
  const std::vector<std::string> paths = f.dataset("/things/image_path").read_strings();
  const std::vector<std::string> types = f.dataset("/things/trial_type").read_strings();
  const std::vector<std::int64_t> image_nr =
      f.dataset("/things/things_image_nr").read_all<std::int64_t>();
  if (std::int64_t(paths.size()) != m.n || std::int64_t(types.size()) != m.n ||
      std::int64_t(image_nr.size()) != m.n)
    throw Error(partial + ": metadata rows (" + std::to_string(paths.size()) +
                ") differ from the epochs (" + std::to_string(m.n) + ")");
  if (f.dataset("/brain/times").shape()[0] != shape[2] ||
      f.dataset("/brain/sensor_names").shape()[0] != shape[1])
    throw Error(partial + ": times or sensor names do not match /brain/responses " +
                std::to_string(shape[1]) + "x" + std::to_string(shape[2]));
  m.images = paths;
  std::sort(m.images.begin(), m.images.end());
  m.images.erase(std::unique(m.images.begin(), m.images.end()), m.images.end());
  std::vector<std::int64_t> nr(m.images.size(), 0); // things_image_nr per image (0: none yet)
  std::vector<char> is_test(m.images.size(), 0), is_exp(m.images.size(), 0);
  bool nr_ok = true;
  for (std::int64_t t = 0; t < m.n; ++t) {
    const auto i =
        std::lower_bound(m.images.begin(), m.images.end(), paths[size_t(t)]) - m.images.begin();
    m.trial_stimulus.push_back(i);
    (types[size_t(t)] == "test" ? is_test : is_exp)[size_t(i)] = 1;
    const std::int64_t v = image_nr[size_t(t)];
    if (v < 1 || (nr[size_t(i)] != 0 && nr[size_t(i)] != v))
      nr_ok = false;
    nr[size_t(i)] = v;
  }
  for (size_t i = 0; i < m.images.size(); ++i) {
    if (is_test[i] && is_exp[i])
      throw Error(o.epochs + ": image " + m.images[i] + " is shown in both test and exp trials");
    if (is_test[i])
      m.test.push_back(std::int64_t(i));
    m.ids.push_back(nr_ok ? nr[i] : std::int64_t(i + 1));
  }
  auto sorted = m.ids;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) // not one nr per image
    for (size_t i = 0; i < m.ids.size(); ++i)
      m.ids[i] = std::int64_t(i + 1);
  if (m.test.empty())
    throw Error(o.epochs + ": no trial has trial_type 'test' (the held-out images)");
  for (const auto& u : m.images)
    m.files.push_back(resolve_image(o.images, u));
  return m;
}

} // namespace

void import_things_meg(const ThingsMegOptions& o, MPI_Comm comm) {
  const int me = mpi::rank(comm);
  const std::string brain_path = o.out_dir + "/brain_meg.h5";
  const std::string partial = io::OutputFile::partial_name(brain_path);
  const std::string log_path = o.out_dir + "/import-things-meg.log";
  std::string script;
  mpi::collective_check(comm, [&] {
    if (o.image_size < 8)
      throw UsageError("--image-size: must be at least 8 pixels");
    if (!fs::exists(o.epochs))
      throw UsageError("--epochs: " + o.epochs + " is missing");
    if (!fs::is_directory(o.images))
      throw UsageError("--images: " + o.images + " is not a directory");
    script = find_tool("things_meg_convert.py", o.script, "GRADMAP_THINGS_MEG_SCRIPT");
    if (me == 0) {
      io::make_directories(o.out_dir);
      fs::remove(partial);
      fs::remove(log_path);
    }
  });

  // 1. The converter (rank 0) streams the epochs into the partial brain file.
  run_converter(o, script, partial, log_path, comm);

  // 2. Validate it and map trials to images.
  io::OutputFile bout = io::OutputFile::resume(brain_path, comm);
  const io::File& f = bout.file();
  TrialMap m;
  mpi::collective_check(comm, [&] { m = map_trials(o, f, partial); });
  const std::vector<std::string>& uniq = m.images;
  const std::int64_t n = m.n;
  const std::int64_t N = std::int64_t(uniq.size());
  f.set_attr("/", "gradmap_schema", std::int64_t{io::kSchemaVersion});
  f.set_attr("/", "modality", std::string("meg"));
  f.write_small("/brain/trial_stimulus", m.trial_stimulus, {n});
  f.write_small("/brain/test_stimuli", m.test, {std::int64_t(m.test.size())});
  const auto info = io::check_brain(f, N);
  GM_INFO("import-things-meg: " << n << " trials, " << info.sensors << " sensors x " << info.times
                                << " times, " << N << " images (" << m.test.size() << " test)");

  // 3. The images (ranks split them).
  const std::string stim_path = o.out_dir + "/stimuli.h5";
  const std::int64_t S = o.image_size;
  io::StimuliWriter sout(stim_path, N, S, S, "THINGS images (ids: things_image_nr)", comm);
  {
    sout.file().write_strings("/stimuli/paths", uniq);
    write_image_rows(sout.images(), N, 32, "import-things-meg", comm,
                     [&](std::int64_t i, std::vector<std::uint8_t>& buf) {
                       if (i < 0)
                         return;
                       const auto px =
                           io::square_resize(io::read_jpeg(m.files[size_t(i)]), S).pixels;
                       buf.insert(buf.end(), px.begin(), px.end());
                     });
    sout.write_ids(m.ids);
  }
  sout.commit();
  bout.commit();
  GM_INFO("import-things-meg: wrote " << stim_path << " and " << brain_path);
}

} // namespace gradmap::importers
