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

/// Not collective. "12.3 MiB" below 0.1 GiB, else "1.23 GiB".
std::string format_bytes(double bytes);

/// Not collective. The default memory budget of one rank: 80% of the node's physical memory
/// shared by `ranks_on_node` ranks, in bytes.
double default_memory_budget(int ranks_on_node);

} // namespace gradmap
