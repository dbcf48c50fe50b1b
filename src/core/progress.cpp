#include "gradmap/core/progress.hpp"

#include <cmath>
#include <cstdio>

#include "gradmap/core/log.hpp"

namespace gradmap {

std::string format_duration(double s) {
  char buf[32];
  if (!std::isfinite(s))
    return "?";
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%dm%02ds", int(s) / 60, int(s) % 60);
  else
    std::snprintf(buf, sizeof buf, "%dh%02dm", int(s) / 3600, (int(s) % 3600) / 60);
  return buf;
}

Progress::Progress(std::string stage, std::int64_t total, std::string unit, double scale,
                   double interval_s)
    : stage_(std::move(stage)), unit_(std::move(unit)), total_(total), scale_(scale),
      interval_(interval_s), start_(std::chrono::steady_clock::now()), last_(start_) {}

void Progress::advance(std::int64_t n) {
  done_ += n;
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() >= interval_) {
    last_ = now;
    print(false);
  }
}

void Progress::finish() {
  if (!finished_)
    print(true);
  finished_ = true;
}

void Progress::print(bool final) {
  const double el =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = el > 0 ? done_ * scale_ / el : 0.0;
  char buf[256];
  if (final) {
    std::snprintf(buf, sizeof buf, "%s: done %lld %s in %s (%.4g %s/s)", stage_.c_str(),
                  static_cast<long long>(done_ * scale_), unit_.c_str(),
                  format_duration(el).c_str(), rate, unit_.c_str());
  } else {
    const double pct = total_ > 0 ? 100.0 * done_ / total_ : 100.0;
    const double eta = done_ > 0 ? el * (total_ - done_) / done_ : NAN;
    std::snprintf(buf, sizeof buf, "%s: %lld/%lld %s (%.0f%%), %.4g %s/s, ETA %s", stage_.c_str(),
                  static_cast<long long>(done_ * scale_), static_cast<long long>(total_ * scale_),
                  unit_.c_str(), pct, rate, unit_.c_str(), format_duration(eta).c_str());
  }
  log::write(log::Level::info, buf);
}

} // namespace gradmap
