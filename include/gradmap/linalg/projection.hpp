#pragma once
// Very sparse random projection (Li, Hastie & Church 2006): R (d x k) with entries
// +sqrt(s/k) with probability 1/(2s), -sqrt(s/k) with probability 1/(2s), 0 otherwise, s = sqrt(d),
// so that E||x R||^2 = ||x||^2. Row j of R is drawn from Philox(seed, projection, stream, j): R is
// never stored densely and is the same on every rank.
#include <cstdint>
#include <vector>

namespace gradmap::linalg {

class SparseProjection {
public:
  /// Not collective.
  SparseProjection(std::int64_t d, std::int64_t k, std::uint64_t seed, std::uint32_t stream);
  std::int64_t input_dim() const { return d_; }
  std::int64_t output_dim() const { return k_; }
  /// Not collective. x [n, d] row-major -> x R [n, k] (accumulated in double).
  std::vector<float> apply(const float* x, std::int64_t n) const;

private:
  std::int64_t d_, k_;
  double scale_;
  std::vector<std::int64_t> row_start_; // CSR over input dimensions
  std::vector<std::int32_t> col_;
  std::vector<std::int8_t> sign_;
};

} // namespace gradmap::linalg
