#include "gradmap/linalg/projection.hpp"

#include <cmath>

#include "gradmap/sim/philox.hpp"

namespace gradmap::linalg {

SparseProjection::SparseProjection(std::int64_t d, std::int64_t k, std::uint64_t seed,
                                   std::uint32_t stream)
    : d_(d), k_(k) {
  const double s = std::sqrt(double(d));
  scale_ = std::sqrt(s / double(k));
  const double p = 1.0 / (2.0 * s);
  row_start_.push_back(0);
  for (std::int64_t j = 0; j < d; ++j) {
    sim::Philox rng(seed, sim::Stream::projection, stream, std::uint32_t(j));
    for (std::int64_t c = 0; c < k; ++c) {
      const double u = rng.uniform();
      if (u < 2.0 * p) {
        col_.push_back(std::int32_t(c));
        sign_.push_back(u < p ? 1 : -1);
      }
    }
    row_start_.push_back(std::int64_t(col_.size()));
  }
}

std::vector<float> SparseProjection::apply(const float* x, std::int64_t n) const {
  std::vector<float> out(static_cast<size_t>(n * k_));
  std::vector<double> acc(static_cast<size_t>(k_));
  for (std::int64_t i = 0; i < n; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (std::int64_t j = 0; j < d_; ++j) {
      const double v = x[i * d_ + j];
      for (std::int64_t e = row_start_[j]; e < row_start_[j + 1]; ++e)
        acc[col_[e]] += sign_[e] * v;
    }
    for (std::int64_t c = 0; c < k_; ++c)
      out[i * k_ + c] = float(scale_ * acc[c]);
  }
  return out;
}

} // namespace gradmap::linalg
