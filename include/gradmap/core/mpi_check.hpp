#pragma once
// GM_CHECK_MPI: turns a failed MPI call into a gradmap::Error naming the call (the world
// communicator returns errors instead of aborting: mpi::Environment sets MPI_ERRORS_RETURN).
#include <mpi.h>

#define GM_CHECK_MPI(call)                                                                         \
  do {                                                                                             \
    const int gm_mpi_rc_ = (call);                                                                 \
    if (gm_mpi_rc_ != MPI_SUCCESS)                                                                 \
      ::gradmap::throw_mpi_error(gm_mpi_rc_, #call);                                               \
  } while (0)

namespace gradmap {

/// Not collective. Throws gradmap::Error("MPI call failed: <what>: <MPI's error string>").
[[noreturn]] void throw_mpi_error(int rc, const char* what);

} // namespace gradmap
