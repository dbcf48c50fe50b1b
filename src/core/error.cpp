#include "gradmap/core/error.hpp"

#include "gradmap/core/mpi_check.hpp"

namespace gradmap {

const char* Error::what() const noexcept {
  if (joined_.empty()) {
    for (size_t i = 0; i < lines_.size(); ++i) {
      if (i)
        joined_ += "\n  ";
      joined_ += lines_[i];
    }
  }
  return joined_.c_str();
}

void throw_mpi_error(int rc, const char* what) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(std::string("MPI call failed: ") + what + ": " + std::string(msg, len));
}

} // namespace gradmap
