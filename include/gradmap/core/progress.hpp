#pragma once
// Progress lines for long loops: "stage: done/total (pct), rate unit/s, ETA". Printed by rank 0
// from its own share of the work (ranks get equal shares), at most every `interval` seconds.
#include <chrono>
#include <cstdint>
#include <string>

namespace gradmap {

class Progress {
public:
  /// Not collective. `total` counts this rank's units; `scale` converts them to global units
  /// for display (e.g. the number of ranks when every rank has an equal share).
  Progress(std::string stage, std::int64_t total, std::string unit, double scale = 1.0,
           double interval_s = 5.0);
  void advance(std::int64_t n = 1);
  /// Prints the final line with elapsed time and mean rate.
  void finish();

private:
  void print(bool final);
  std::string stage_, unit_;
  std::int64_t total_, done_ = 0;
  double scale_, interval_;
  std::chrono::steady_clock::time_point start_, last_;
  bool finished_ = false;
};

/// Formats seconds as "1h02m", "3m05s" or "4.2s".
std::string format_duration(double seconds);

} // namespace gradmap
