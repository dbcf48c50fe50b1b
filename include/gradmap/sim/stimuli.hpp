#pragma once
// Procedural stimuli: gratings, plaids, discs, rectangles, smooth noise textures,
// checkerboards, concentric rings, and shapes over gratings, with random colours, positions,
// orientations and spatial frequencies. Image i is a pure function of (seed, i).
#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::sim {

/// Number of stimulus categories (the label of an image is its category).
constexpr int kStimulusCategories = 8;
const std::vector<std::string>& stimulus_category_names();

/// Not collective. Renders image `index` into `out` (size*size*3 bytes, row-major HWC RGB) and
/// returns its category label.
std::int64_t render_stimulus(std::uint64_t seed, std::int64_t index, int size, std::uint8_t* out);

} // namespace gradmap::sim
