// gradmap simulate: the built-in dataset with a planted answer (sim::simulate).
#include "gradmap/sim/simulate.hpp"
#include "command.hpp"

namespace gradmap::cli {

Command simulate_command() {
  Command c;
  c.name = "simulate";
  c.usage = "--out DIR [--scenario misaligned|aligned|activations-only|null] [--seed N] "
            "[--modality fmri|meg|both] "
            "[sizes...]";
  c.summary = "Writes DIR/stimuli.h5 and DIR/brain_fmri.h5 and/or DIR/brain_meg.h5: procedural\n"
              "images and fMRI/MEG responses generated from the activations and gradients of the\n"
              "built-in reference network, with the planted answer under /truth. The files are\n"
              "identical for any number of ranks.";
  c.options = [](po::options_description& d) {
    const sim::SimulateOptions def;
    d.add_options()("out", po::value<std::string>()->required(), "output directory")(
        "scenario", po::value<std::string>()->default_value(def.scenario),
        "misaligned (gradients only in high-level areas, late, forward order), aligned "
        "(gradients follow activations in space, top-down in time), activations-only (no "
        "learning signal anywhere: the confound control for raw gradient scores), or null (no "
        "signal)")("modality", po::value<std::string>()->default_value(def.modality),
                   "fmri, meg or both")("seed", po::value<std::uint64_t>()->default_value(def.seed),
                                        "random seed")(
        "noise-seed", po::value<std::uint64_t>()->default_value(def.noise_seed),
        "seed of the trial noise alone (0: --seed); the stimuli and the planted structure stay")(
        "images", po::value<std::int64_t>()->default_value(def.images),
        "distinct images")("test-images", po::value<std::int64_t>()->default_value(def.test_images),
                           "held-out test images")(
        "image-size", po::value<std::int64_t>()->default_value(def.image_size), "pixels (square)")(
        "repetitions", po::value<std::int64_t>()->default_value(def.repetitions),
        "trials per image")("test-repetitions",
                            po::value<std::int64_t>()->default_value(def.test_repetitions),
                            "trials per test image (0: --repetitions)")(
        "voxels", po::value<std::int64_t>()->default_value(def.voxels), "fMRI voxels")(
        "sensors", po::value<std::int64_t>()->default_value(def.sensors), "MEG sensors")(
        "times", po::value<std::int64_t>()->default_value(def.times), "MEG samples per epoch")(
        "tmin", po::value<double>()->default_value(def.tmin), "MEG epoch start (s)")(
        "sfreq", po::value<double>()->default_value(def.sfreq),
        "MEG sampling rate (Hz)")("snr", po::value<double>()->default_value(def.snr),
                                  "fMRI single-trial signal-to-noise variance ratio")(
        "meg-snr", po::value<double>()->default_value(def.meg_snr),
        "MEG single-trial signal-to-noise variance ratio at the response peak")(
        "noise-fraction", po::value<double>()->default_value(def.noise_fraction),
        "share of voxels/sensors that are pure noise")(
        "gradient-share", po::value<double>()->default_value(def.gradient_share),
        "variance share of the gradient component in targets driven by both kinds")(
        "gradient-shift", po::value<int>()->default_value(def.gradient_shift),
        "aligned only (calibration of the space verdicts): each voxel's gradient layer this many "
        "layers from its activation layer")(
        "gradient-timing", po::value<std::string>()->default_value(def.gradient_timing),
        "aligned only (calibration of the time verdicts): top-down, flat (one latency for "
        "every layer) or gap0 (top-down, the top layer's gradient at its activation's latency)")(
        "model", po::value<std::string>()->default_value(def.model), "reference network")(
        "voxel-chunk", po::value<std::int64_t>()->default_value(def.voxel_chunk),
        "voxels generated per round (bounds memory)")(
        "memory-gb", po::value<double>()->default_value(def.memory_gb),
        "memory budget per rank in GiB; a configuration that needs more is refused before any "
        "work (default: 80% of the node's memory divided by its ranks)");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    sim::SimulateOptions o;
    o.out_dir = vm["out"].as<std::string>();
    o.scenario = vm["scenario"].as<std::string>();
    o.modality = vm["modality"].as<std::string>();
    o.seed = vm["seed"].as<std::uint64_t>();
    o.noise_seed = vm["noise-seed"].as<std::uint64_t>();
    o.images = vm["images"].as<std::int64_t>();
    o.test_images = vm["test-images"].as<std::int64_t>();
    o.image_size = vm["image-size"].as<std::int64_t>();
    o.repetitions = vm["repetitions"].as<std::int64_t>();
    o.test_repetitions = vm["test-repetitions"].as<std::int64_t>();
    o.voxels = vm["voxels"].as<std::int64_t>();
    o.sensors = vm["sensors"].as<std::int64_t>();
    o.times = vm["times"].as<std::int64_t>();
    o.tmin = vm["tmin"].as<double>();
    o.sfreq = vm["sfreq"].as<double>();
    o.snr = vm["snr"].as<double>();
    o.meg_snr = vm["meg-snr"].as<double>();
    o.noise_fraction = vm["noise-fraction"].as<double>();
    o.gradient_share = vm["gradient-share"].as<double>();
    o.gradient_shift = vm["gradient-shift"].as<int>();
    o.gradient_timing = vm["gradient-timing"].as<std::string>();
    o.model = vm["model"].as<std::string>();
    o.voxel_chunk = vm["voxel-chunk"].as<std::int64_t>();
    o.memory_gb = vm["memory-gb"].as<double>();
    o.threads = threads_of(vm, ctx);
    sim::simulate(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
