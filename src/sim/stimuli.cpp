#include "gradmap/sim/stimuli.hpp"

#include <algorithm>
#include <cmath>

#include "gradmap/sim/philox.hpp"

namespace gradmap::sim {

const std::vector<std::string>& stimulus_category_names() {
  static const std::vector<std::string> names = {"grating",    "plaid",           "discs",
                                                 "rectangles", "texture",         "checkerboard",
                                                 "rings",      "shape-on-grating"};
  return names;
}

namespace {

struct Rgb {
  double r, g, b;
};

Rgb random_colour(Philox& rng) {
  return {rng.uniform(), rng.uniform(), rng.uniform()};
}

struct Canvas {
  int n;
  std::vector<Rgb> px;
  explicit Canvas(int size) : n(size), px(size_t(size) * size, Rgb{0.5, 0.5, 0.5}) {}
  Rgb& at(int y, int x) { return px[size_t(y) * n + x]; }
};

// Blend a in (weight w in [0,1]) over b.
Rgb mix(const Rgb& a, const Rgb& b, double w) {
  return {w * a.r + (1 - w) * b.r, w * a.g + (1 - w) * b.g, w * a.b + (1 - w) * b.b};
}

void grating(Canvas& c, Philox& rng, double contrast) {
  const double theta = rng.uniform(0, M_PI), freq = rng.uniform(1.0, 6.0) / c.n;
  const double phase = rng.uniform(0, 2 * M_PI);
  const Rgb a = random_colour(rng), b = random_colour(rng);
  const double ct = std::cos(theta), st = std::sin(theta);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const double v = 0.5 + 0.5 * std::sin(2 * M_PI * freq * (x * ct + y * st) + phase);
      c.at(y, x) = mix(mix(a, b, v), c.at(y, x), contrast);
    }
}

void disc(Canvas& c, Philox& rng) {
  const double cx = rng.uniform(0, c.n), cy = rng.uniform(0, c.n);
  const double r = rng.uniform(0.1, 0.35) * c.n;
  const Rgb col = random_colour(rng);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const double d = std::hypot(x + 0.5 - cx, y + 0.5 - cy);
      const double w = std::clamp(r - d + 0.5, 0.0, 1.0); // anti-aliased edge
      c.at(y, x) = mix(col, c.at(y, x), w);
    }
}

void rectangle(Canvas& c, Philox& rng) {
  const double cx = rng.uniform(0, c.n), cy = rng.uniform(0, c.n);
  const double hw = rng.uniform(0.08, 0.3) * c.n, hh = rng.uniform(0.08, 0.3) * c.n;
  const double theta = rng.uniform(0, M_PI), ct = std::cos(theta), st = std::sin(theta);
  const Rgb col = random_colour(rng);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const double dx = x + 0.5 - cx, dy = y + 0.5 - cy;
      const double u = std::abs(dx * ct + dy * st), v = std::abs(-dx * st + dy * ct);
      const double w = std::clamp(std::min(hw - u, hh - v) + 0.5, 0.0, 1.0);
      c.at(y, x) = mix(col, c.at(y, x), w);
    }
}

void texture(Canvas& c, Philox& rng) {
  // Smooth noise: random values on a coarse lattice, bilinearly interpolated, per channel.
  const int g = 2 + static_cast<int>(rng.below(7));
  std::vector<Rgb> lattice(size_t(g + 1) * (g + 1));
  for (auto& v : lattice)
    v = random_colour(rng);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const double fy = double(y) / c.n * g, fx = double(x) / c.n * g;
      const int iy = int(fy), ix = int(fx);
      const double ty = fy - iy, tx = fx - ix;
      auto L = [&](int a, int b) { return lattice[size_t(a) * (g + 1) + b]; };
      const Rgb top = mix(L(iy, ix + 1), L(iy, ix), tx),
                bot = mix(L(iy + 1, ix + 1), L(iy + 1, ix), tx);
      c.at(y, x) = mix(bot, top, ty);
    }
}

void checkerboard(Canvas& c, Philox& rng) {
  const double cell = rng.uniform(2.0, c.n / 3.0);
  const Rgb a = random_colour(rng), b = random_colour(rng);
  const double ox = rng.uniform(0, cell), oy = rng.uniform(0, cell);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const int k = int(std::floor((x + ox) / cell)) + int(std::floor((y + oy) / cell));
      c.at(y, x) = (k & 1) ? a : b;
    }
}

void rings(Canvas& c, Philox& rng) {
  const double cx = rng.uniform(0.2, 0.8) * c.n, cy = rng.uniform(0.2, 0.8) * c.n;
  const double freq = rng.uniform(1.5, 5.0) / c.n;
  const Rgb a = random_colour(rng), b = random_colour(rng);
  for (int y = 0; y < c.n; ++y)
    for (int x = 0; x < c.n; ++x) {
      const double v = 0.5 + 0.5 * std::cos(2 * M_PI * freq * std::hypot(x - cx, y - cy));
      c.at(y, x) = mix(a, b, v);
    }
}

} // namespace

std::int64_t render_stimulus(std::uint64_t seed, std::int64_t index, int size, std::uint8_t* out) {
  Philox rng(seed, Stream::image, std::uint32_t(index), std::uint32_t(std::uint64_t(index) >> 32));
  Canvas c(size);
  const auto category = static_cast<std::int64_t>(rng.below(kStimulusCategories));
  const Rgb bg = random_colour(rng);
  std::fill(c.px.begin(), c.px.end(), bg);
  switch (category) {
  case 0: grating(c, rng, 1.0); break;
  case 1:
    grating(c, rng, 1.0);
    grating(c, rng, 0.5);
    break;
  case 2: {
    const int k = 1 + int(rng.below(4));
    for (int i = 0; i < k; ++i)
      disc(c, rng);
    break;
  }
  case 3: {
    const int k = 1 + int(rng.below(4));
    for (int i = 0; i < k; ++i)
      rectangle(c, rng);
    break;
  }
  case 4: texture(c, rng); break;
  case 5: checkerboard(c, rng); break;
  case 6: rings(c, rng); break;
  default:
    grating(c, rng, 1.0);
    if (rng.below(2))
      disc(c, rng);
    else
      rectangle(c, rng);
  }
  // Mild pixel noise, then quantise.
  const double noise = rng.uniform(0.0, 0.06);
  for (size_t i = 0; i < c.px.size(); ++i) {
    const Rgb& p = c.px[i];
    const double v[3] = {p.r, p.g, p.b};
    for (int ch = 0; ch < 3; ++ch) {
      const double q = std::clamp(v[ch] + noise * rng.normal(), 0.0, 1.0);
      out[i * 3 + ch] = static_cast<std::uint8_t>(std::lround(q * 255.0));
    }
  }
  return category;
}

} // namespace gradmap::sim
