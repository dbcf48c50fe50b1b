#pragma once
// Logging: rank 0 prints by default (GM_INFO / GM_WARN), GM_DEBUG only with --verbose.
// Messages go to stderr (stdout is kept for machine-readable output) and, when a log file is
// set, to that file too.
#include <sstream>
#include <string>

namespace gradmap::log {

enum class Level { debug = 0, info = 1, warn = 2, error = 3 };

/// Not collective. Sets this process's rank (only rank 0 prints unless all_ranks is set).
void init(int rank, int size);
void set_level(Level level);
Level level();
/// Not collective. Mirrors rank 0's log lines into `path` (appending); empty closes it.
void set_file(const std::string& path);
int rank();
/// Not collective. Prints `message` if this is rank 0 (or if all_ranks) at the given level.
void write(Level level, const std::string& message, bool all_ranks = false);

} // namespace gradmap::log

#define GM_LOG_(lvl, expr)                                                                         \
  do {                                                                                             \
    if (static_cast<int>(lvl) >= static_cast<int>(::gradmap::log::level())) {                      \
      std::ostringstream gm_log_os_;                                                               \
      gm_log_os_ << expr;                                                                          \
      ::gradmap::log::write(lvl, gm_log_os_.str());                                                \
    }                                                                                              \
  } while (0)
#define GM_DEBUG(expr) GM_LOG_(::gradmap::log::Level::debug, expr)
#define GM_INFO(expr) GM_LOG_(::gradmap::log::Level::info, expr)
#define GM_WARN(expr) GM_LOG_(::gradmap::log::Level::warn, expr)
