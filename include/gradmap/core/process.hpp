#pragma once
// Helper programs the binary runs (tools/*.py through /usr/bin/python3): finding them and
// running them from rank 0.
#include <string>
#include <vector>

namespace gradmap {

/// Not collective. The path of tools/`file`: `given` if not empty, else $`env_var` if set, else
/// ../share/gradmap/`file` beside the binary, else the source tree's tools/. Throws naming the
/// option and variable that can point at it.
std::string find_tool(const std::string& file, const std::string& given, const char* env_var);

/// Not collective. Runs argv[0] with argv (no shell) and waits. When `log` is not empty, the
/// child's stdout and stderr go to that file (appended). Returns the exit status (128 + signal
/// when killed, 127 when it could not be started).
int run_program(const std::vector<std::string>& argv, const std::string& log = "");

/// Not collective. The last non-empty line of a text file ("" if none or unreadable).
std::string last_line(const std::string& path);

} // namespace gradmap
