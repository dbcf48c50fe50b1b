#include "gradmap/core/text.hpp"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "gradmap/core/error.hpp"

namespace gradmap {

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
