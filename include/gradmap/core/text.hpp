#pragma once
// Small text-output helpers shared by the stages that write JSON and CSV.
#include <string>

namespace gradmap {

/// Not collective. `v` with `digits` significant digits, or `missing` when v is NaN or infinite
/// ("null" for JSON, "" for CSV).
std::string format_number(double v, int digits, const std::string& missing);

/// Not collective. Writes `text` to `path` through `path.partial` and a rename, so a reader never
/// sees a half-written file under the final name. Throws naming the file.
void write_file_atomically(const std::string& path, const std::string& text);

} // namespace gradmap
