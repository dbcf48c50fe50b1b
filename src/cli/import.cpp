// gradmap import-nsd / import-things-meg: the real datasets -> gradmap's schema.
#include <sstream>

#include "gradmap/core/error.hpp"

#include "command.hpp"
#include "gradmap/importers/nsd.hpp"
#include "gradmap/importers/things_meg.hpp"

namespace gradmap::cli {

namespace {
std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty())
      out.push_back(item);
  return out;
}
} // namespace

Command import_nsd_command() {
  Command c;
  c.name = "import-nsd";
  c.usage = "--nsd-root DIR --subject N --out DIR [--sessions 1-40] [--mask nsdgeneral] "
            "[--rois prf-visualrois,streams]";
  c.summary =
      "Natural Scenes Dataset, in its published layout under --nsd-root, for one subject ->\n"
      "DIR/stimuli.h5 (the images the subject saw, ids = 73k ids) and DIR/brain_fmri.h5 (single-\n"
      "trial betas of the voxels in the mask, as z-scores or percent signal change; the shared "
      "images\n"
      "as /brain/test_stimuli; ROI labels, voxel coordinates and the NIfTI affine). Ranks take\n"
      "sessions round-robin; memory is one session per rank.";
  c.options = [](po::options_description& d) {
    const importers::NsdOptions def;
    d.add_options()("nsd-root", po::value<std::string>()->required(),
                    "NSD root directory")("subject", po::value<int>()->required(), "subject 1..8")(
        "out", po::value<std::string>()->required(), "output directory")(
        "sessions", po::value<std::string>()->default_value("all"),
        "sessions to import, e.g. 1-10,12 (default: all the subject completed)")(
        "space", po::value<std::string>()->default_value(def.space), "func1pt8mm or func1mm")(
        "betas", po::value<std::string>()->default_value(def.betas),
        "GLM version folder")("betas-format", po::value<std::string>()->default_value(def.format),
                              "auto (HDF5 if present, else NIfTI), hdf5 or nifti")(
        "mask", po::value<std::string>()->default_value(def.mask),
        "voxels with value > 0 in this ROI file (a name under the subject's roi/ folder, or a "
        "path to a NIfTI on the same grid)")(
        "rois", po::value<std::string>()->default_value("prf-visualrois,streams"),
        "label atlases, the first labelling a voxel wins: prf-visualrois (V1-hV4), streams "
        "(mid and high ventral/lateral/parietal)")(
        "zscore", po::value<bool>()->default_value(def.zscore),
        "z-score each voxel within each session (false: percent signal change)")(
        "image-size", po::value<std::int64_t>()->default_value(0),
        "resize the stimuli to this square size (0: keep NSD's 425)");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    importers::NsdOptions o;
    o.root = vm["nsd-root"].as<std::string>();
    o.subject = vm["subject"].as<int>();
    o.out_dir = vm["out"].as<std::string>();
    o.sessions = importers::parse_sessions(vm["sessions"].as<std::string>());
    o.space = vm["space"].as<std::string>();
    o.betas = vm["betas"].as<std::string>();
    o.format = vm["betas-format"].as<std::string>();
    o.mask = vm["mask"].as<std::string>();
    o.rois = split_list(vm["rois"].as<std::string>());
    o.zscore = vm["zscore"].as<bool>();
    o.image_size = vm["image-size"].as<std::int64_t>();
    if (o.image_size < 0)
      throw UsageError("--image-size: must be 0 (keep) or positive");
    importers::import_nsd(o, ctx.comm);
  };
  return c;
}

Command import_things_meg_command() {
  Command c;
  c.name = "import-things-meg";
  c.usage = "--epochs FILE-epo.fif --images DIR --out DIR [--image-size 224]";
  c.summary =
      "THINGS-MEG, one participant: preprocessed epochs (MNE .fif, split parts followed) and\n"
      "the THINGS image folders -> DIR/stimuli.h5 and DIR/brain_meg.h5 (catch trials dropped,\n"
      "the 200 test images as /brain/test_stimuli, MEG channels, times). The FIF is read with\n"
      "MNE by tools/things_meg_convert.py; the binary validates it, decodes the JPEGs and\n"
      "resizes them (centre square, antialiased bilinear).";
  c.options = [](po::options_description& d) {
    const importers::ThingsMegOptions def;
    d.add_options()("epochs", po::value<std::string>()->required(),
                    "preprocessed_P<N>-epo.fif")("images", po::value<std::string>()->required(),
                                                 "folder with images_meg/ and images_test_meg/")(
        "out", po::value<std::string>()->required(),
        "output directory")("image-size", po::value<std::int64_t>()->default_value(def.image_size),
                            "stimuli stored at this square size")(
        "block", po::value<std::int64_t>()->default_value(def.block),
        "epochs read per block (bounds the converter's memory)")(
        "python", po::value<std::string>()->default_value(def.python),
        "Python with MNE and h5py")("script", po::value<std::string>()->default_value(""),
                                    "things_meg_convert.py (default: found beside the binary)");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    importers::ThingsMegOptions o;
    o.epochs = vm["epochs"].as<std::string>();
    o.images = vm["images"].as<std::string>();
    o.out_dir = vm["out"].as<std::string>();
    o.image_size = vm["image-size"].as<std::int64_t>();
    o.block = vm["block"].as<std::int64_t>();
    if (o.block < 1)
      throw UsageError("--block: must be positive");
    o.python = vm["python"].as<std::string>();
    o.script = vm["script"].as<std::string>();
    importers::import_things_meg(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
