#pragma once
// A reader for the numeric arrays of MATLAB Level 5 MAT-files (MATLAB v5, v6 and v7: v7 stores
// each variable as a zlib-compressed element). Real numeric and logical arrays of any class are
// read, in any stored element type, as double in MATLAB's column-major order; other variables
// (structs, cells, sparse, strings, complex) are skipped. MATLAB v7.3 files are HDF5 and are
// refused with a message saying so.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gradmap::io {

struct MatArray {
  std::vector<std::int64_t> dims; ///< MATLAB dimensions (rows, columns, ...)
  std::vector<double> values;     ///< column-major
  std::string mat_class;          ///< "double", "int16", ...
  std::int64_t numel() const;
  /// Element (r, c) of a 2-D array (0-based).
  double at(std::int64_t r, std::int64_t c) const { return values[size_t(c * dims[0] + r)]; }
};

/// Not collective. Reads the variables `names` from the MAT-file at `path`. Throws naming the
/// file: unreadable, not a Level 5 MAT-file, corrupt or truncated elements, a wanted variable
/// missing or not a real numeric array.
std::map<std::string, MatArray> read_mat(const std::string& path,
                                         const std::vector<std::string>& names);

} // namespace gradmap::io
