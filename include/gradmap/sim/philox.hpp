#pragma once
// Philox4x32-10, the counter-based generator of Salmon et al. 2011 ("Parallel random numbers:
// as easy as 1, 2, 3"), as in Random123. A draw is a pure function of (key, counter), so every
// random number gradmap uses is keyed by (seed, stream, index...) and is the same whatever the
// number of ranks or the order in which they are computed.
#include <array>
#include <cmath>
#include <cstdint>

namespace gradmap::sim {

using Counter = std::array<std::uint32_t, 4>;
using Key = std::array<std::uint32_t, 2>;

/// Not collective. One Philox4x32-10 block.
inline Counter philox4x32_10(Counter c, Key k) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t(M0) * c[0];
    const std::uint64_t p1 = std::uint64_t(M1) * c[2];
    c = {std::uint32_t(p1 >> 32) ^ c[1] ^ k[0], std::uint32_t(p1),
         std::uint32_t(p0 >> 32) ^ c[3] ^ k[1], std::uint32_t(p0)};
    k[0] += W0;
    k[1] += W1;
  }
  return c;
}

/// Random streams of gradmap, one per purpose, so that draws for different purposes never
/// share counters.
enum class Stream : std::uint32_t {
  image = 1,
  weights = 2,
  voxel = 3,
  fmri_noise = 4,
  meg_noise = 5,
  design = 6,
  sensor = 7,
  permutation = 8,
  bootstrap = 9,
  projection = 10,
  augmentation = 11,
  folds = 12,
  labels = 13 ///< the "shuffled labels" control of extract
};

/// A sequential generator over one (seed, stream, a, b) address: draw i uses counter
/// (stream, a, b, i). Cheap to construct; use one per independent unit of work.
class Philox {
public:
  Philox(std::uint64_t seed, Stream stream, std::uint32_t a = 0, std::uint32_t b = 0)
      : key_{std::uint32_t(seed), std::uint32_t(seed >> 32)}, ctr_{static_cast<std::uint32_t>(
                                                                       stream),
                                                                   a, b, 0} {}

  /// Next 32 random bits.
  std::uint32_t next_u32() {
    if (pos_ == 4) {
      buf_ = philox4x32_10(ctr_, key_);
      ++ctr_[3];
      pos_ = 0;
    }
    return buf_[pos_++];
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() {
    const std::uint64_t hi = next_u32() >> 5, lo = next_u32() >> 6; // 27 + 26 bits
    return (double(hi) * 67108864.0 + double(lo)) * (1.0 / 9007199254740992.0);
  }
  /// Uniform in (0, 1].
  double uniform_open0() { return 1.0 - uniform(); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Standard normal (Box-Muller; both values of a pair are used).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = uniform_open0(), u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }
  /// Uniform integer in [0, n) (rejection sampling, unbiased).
  std::uint32_t below(std::uint32_t n) {
    if (n <= 1)
      return 0;
    const std::uint32_t limit = std::uint32_t(-n) % n; // 2^32 mod n
    for (;;) {
      const std::uint32_t x = next_u32();
      const std::uint64_t m = std::uint64_t(x) * n;
      if (std::uint32_t(m) >= limit)
        return std::uint32_t(m >> 32);
    }
  }

private:
  Key key_;
  Counter ctr_;
  Counter buf_{};
  int pos_ = 4;
  double spare_ = 0;
  bool has_spare_ = false;
};

} // namespace gradmap::sim
