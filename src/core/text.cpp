#include "gradmap/core/text.hpp"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <sstream>

#include <unistd.h>

#include "gradmap/core/error.hpp"

namespace gradmap {

double default_memory_budget(int ranks_on_node) {
  const double phys = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
  return 0.8 * phys / double(ranks_on_node > 0 ? ranks_on_node : 1);
}

std::string format_bytes(double bytes) {
  const double gib = bytes / double(1 << 30);
  char buf[64];
  if (gib < 0.1)
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / double(1 << 20));
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", gib);
  return buf;
}

std::string format_number(double v, int digits, const std::string& missing) {
  if (!std::isfinite(v))
    return missing;
  std::ostringstream s;
  s << std::setprecision(digits) << v;
  return s.str();
}

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".partial";
  {
    std::ofstream f(tmp);
    f << text;
    if (!f)
      throw Error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw Error("cannot rename " + tmp + " to " + path);
}

} // namespace gradmap
