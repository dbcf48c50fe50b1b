#pragma once
// Image decoding and resampling for the importers: JPEG files through libjpeg(-turbo), and an
// antialiased bilinear resize that is the algorithm of Pillow's Image.resize(BILINEAR) (and of
// torch's interpolate(antialias=True)): a triangle filter whose support widens with the
// downscaling factor, horizontal pass then vertical, each rounded to uint8.
#include <cstdint>
#include <string>
#include <vector>

namespace gradmap::io {

struct RgbImage {
  std::int64_t height = 0, width = 0;
  std::vector<std::uint8_t> pixels; ///< [height, width, 3]
};

/// Not collective. Decodes a JPEG file to RGB (grayscale is expanded). Throws naming the file.
RgbImage read_jpeg(const std::string& path);

/// Not collective. Antialiased bilinear resize of an [h, w, 3] image to [out_h, out_w, 3].
RgbImage resize_rgb(const RgbImage& in, std::int64_t out_h, std::int64_t out_w);

/// Not collective. The central square of `in` (the larger side cropped evenly), then resized to
/// size x size (no resampling when it already has that size).
RgbImage square_resize(const RgbImage& in, std::int64_t size);

} // namespace gradmap::io
