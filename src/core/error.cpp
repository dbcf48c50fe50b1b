#include "gradmap/core/error.hpp"

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

} // namespace gradmap
