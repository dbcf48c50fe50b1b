// Image decoding and resampling: see image.hpp.
#include "gradmap/io/image.hpp"

// clang-format off
#include <cstdio>
#include <csetjmp>
#include <jpeglib.h>
// clang-format on

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>

#include "gradmap/core/error.hpp"

namespace gradmap::io {

namespace {

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_jpeg_error(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegError*>(c->err);
  (*c->err->format_message)(c, e->message);
  std::longjmp(e->jump, 1);
}

} // namespace

RgbImage read_jpeg(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f)
    throw Error(path + ": image file missing or unreadable");
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(f)),
                                         std::istreambuf_iterator<char>());
  if (bytes.size() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8)
    throw Error(path + ": not a JPEG file");
  jpeg_decompress_struct cinfo{};
  JpegError err{};
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_jpeg_error;
  RgbImage img;
  // Nothing with a destructor is created between setjmp and a longjmp back to it.
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw Error(path + ": corrupt JPEG (" + std::string(err.message) + ")");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    throw Error(path + ": CMYK JPEGs are not supported (convert it to RGB)");
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  img.height = cinfo.output_height;
  img.width = cinfo.output_width;
  img.pixels.resize(std::size_t(img.height * img.width * 3));
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row =
        img.pixels.data() + std::size_t(cinfo.output_scanline) * std::size_t(img.width) * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return img;
}

namespace {

// Pillow's precomputed coefficients for one axis (ImagingResample, "bilinear" filter).
struct Coeffs {
  std::vector<std::int64_t> start, count;
  std::vector<double> w; // [out, max_count]
  std::int64_t max_count = 0;
};

Coeffs coefficients(std::int64_t in, std::int64_t out) {
  const double scale = double(in) / double(out);
  const double fscale = std::max(scale, 1.0);
  const double support = 1.0 * fscale;
  Coeffs c;
  c.max_count = std::int64_t(std::ceil(support)) * 2 + 1;
  c.w.assign(std::size_t(out * c.max_count), 0.0);
  for (std::int64_t x = 0; x < out; ++x) {
    const double center = (double(x) + 0.5) * scale;
    std::int64_t xmin = std::int64_t(center - support + 0.5);
    if (xmin < 0)
      xmin = 0;
    std::int64_t xmax = std::int64_t(center + support + 0.5);
    if (xmax > in)
      xmax = in;
    xmax -= xmin;
    double ww = 0;
    double* k = &c.w[std::size_t(x * c.max_count)];
    for (std::int64_t i = 0; i < xmax; ++i) {
      const double t = std::abs((double(i + xmin) - center + 0.5) / fscale);
      k[i] = t < 1.0 ? 1.0 - t : 0.0;
      ww += k[i];
    }
    for (std::int64_t i = 0; i < xmax; ++i)
      k[i] = ww != 0.0 ? k[i] / ww : 0.0;
    c.start.push_back(xmin);
    c.count.push_back(xmax);
  }
  return c;
}

std::uint8_t clip8(double v) {
  return static_cast<std::uint8_t>(std::clamp(std::floor(v + 0.5), 0.0, 255.0));
}

} // namespace

RgbImage resize_rgb(const RgbImage& in, std::int64_t out_h, std::int64_t out_w) {
  if (out_h < 1 || out_w < 1)
    throw Error("resize: output size must be positive");
  RgbImage tmp;
  tmp.height = in.height;
  tmp.width = out_w;
  const RgbImage* src = &in;
  if (out_w != in.width) {
    const Coeffs c = coefficients(in.width, out_w);
    tmp.pixels.resize(std::size_t(in.height * out_w * 3));
    for (std::int64_t y = 0; y < in.height; ++y)
      for (std::int64_t x = 0; x < out_w; ++x)
        for (int ch = 0; ch < 3; ++ch) {
          double s = 0;
          const double* k = &c.w[std::size_t(x * c.max_count)];
          for (std::int64_t i = 0; i < c.count[size_t(x)]; ++i)
            s += k[i] * in.pixels[std::size_t(((y * in.width) + c.start[size_t(x)] + i) * 3 + ch)];
          tmp.pixels[std::size_t((y * out_w + x) * 3 + ch)] = clip8(s);
        }
    src = &tmp;
  }
  if (out_h == in.height)
    return src == &in ? in : tmp;
  RgbImage out;
  out.height = out_h;
  out.width = out_w;
  out.pixels.resize(std::size_t(out_h * out_w * 3));
  const Coeffs c = coefficients(in.height, out_h);
  for (std::int64_t y = 0; y < out_h; ++y) {
    const double* k = &c.w[std::size_t(y * c.max_count)];
    for (std::int64_t x = 0; x < out_w * 3; ++x) {
      double s = 0;
      for (std::int64_t i = 0; i < c.count[size_t(y)]; ++i)
        s += k[i] * src->pixels[std::size_t((c.start[size_t(y)] + i) * out_w * 3 + x)];
      out.pixels[std::size_t(y * out_w * 3 + x)] = clip8(s);
    }
  }
  return out;
}

RgbImage square_resize(const RgbImage& in, std::int64_t size) {
  const std::int64_t side = std::min(in.height, in.width);
  const RgbImage* src = &in;
  RgbImage crop;
  if (in.height != in.width) {
    const std::int64_t y0 = (in.height - side) / 2, x0 = (in.width - side) / 2;
    crop.height = crop.width = side;
    crop.pixels.resize(std::size_t(side * side * 3));
    for (std::int64_t y = 0; y < side; ++y)
      std::copy_n(&in.pixels[std::size_t(((y + y0) * in.width + x0) * 3)], side * 3,
                  &crop.pixels[std::size_t(y * side * 3)]);
    src = &crop;
  }
  if (src->height == size)
    return *src;
  return resize_rgb(*src, size, size);
}

} // namespace gradmap::io
