#pragma once
// gradmap::Error — an exception that stacks context lines as it unwinds
// (after MRtrix3's Exception): the innermost cause first, then "while ..." lines.
#include <stdexcept>
#include <string>
#include <vector>

namespace gradmap {

class Error : public std::exception {
public:
  explicit Error(std::string message) { lines_.push_back(std::move(message)); }
  /// Adds a line of context ("while reading X"); returns *this for rethrowing.
  Error& context(std::string line) {
    lines_.push_back(std::move(line));
    joined_.clear();
    return *this;
  }
  const std::vector<std::string>& lines() const { return lines_; }
  /// All lines, innermost first, joined with newlines and indentation.
  const char* what() const noexcept override;

  /// True when every rank of the communicator raised this same error (input validation done
  /// identically on all ranks, or agreed through mpi::collective_check): main then prints it
  /// once and exits cleanly instead of aborting the job.
  bool collective = false;

private:
  std::vector<std::string> lines_;
  mutable std::string joined_;
};

/// An error in the user's command line or configuration (always collective: every rank parses
/// the same options).
class UsageError : public Error {
public:
  explicit UsageError(std::string message) : Error(std::move(message)) { collective = true; }
};

/// Runs f; if it throws, adds `line` as context and rethrows (as gradmap::Error).
template <class F> auto with_context(const std::string& line, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (Error& e) {
    e.context(line);
    throw;
  } catch (const std::exception& e) {
    Error wrapped(e.what());
    wrapped.context(line);
    throw wrapped;
  }
}

} // namespace gradmap

#define GM_THROW(msg) throw ::gradmap::Error(msg)
#define GM_REQUIRE(cond, msg)                                                                      \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      throw ::gradmap::Error(msg);                                                                 \
  } while (0)
