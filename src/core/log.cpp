#include "gradmap/core/log.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>

namespace gradmap::log {
namespace {
int g_rank = 0;
int g_size = 1;
Level g_level = Level::info;
std::unique_ptr<std::ofstream> g_file;
const auto g_start = std::chrono::steady_clock::now();
} // namespace

void init(int rank, int size) {
  g_rank = rank;
  g_size = size;
}
void set_level(Level l) {
  g_level = l;
}
Level level() {
  return g_level;
}
int rank() {
  return g_rank;
}

void set_file(const std::string& path) {
  g_file.reset();
  if (!path.empty() && g_rank == 0)
    g_file = std::make_unique<std::ofstream>(path, std::ios::app);
}

void write(Level l, const std::string& message, bool all_ranks) {
  if (static_cast<int>(l) < static_cast<int>(g_level))
    return;
  if (g_rank != 0 && !all_ranks)
    return;
  const double t =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  char stamp[32];
  std::snprintf(stamp, sizeof stamp, "[%8.1fs] ", t);
  const char* tag = l == Level::warn ? "warning: " : (l == Level::error ? "error: " : "");
  std::string line = std::string(stamp) + tag + message;
  if (all_ranks && g_size > 1)
    line = "(rank " + std::to_string(g_rank) + ") " + line;
  std::cerr << line << '\n' << std::flush;
  if (g_file)
    *g_file << line << '\n' << std::flush;
}

} // namespace gradmap::log
