#pragma once
// Stop requests from the batch system. Slurm sends SIGTERM at the wall-time limit (or the
// signal of `--signal=B:USR1@120` ahead of it), then SIGKILL after KillWait: long loops check
// for a request at block boundaries, finish the block, flush it, and stop every rank with one
// message; a rerun of the same command resumes from the completed blocks.
#include <mpi.h>

#include <string>

namespace gradmap::signals {

/// Not collective. Installs handlers for SIGTERM, SIGUSR1 and SIGINT that record the request.
void install();

/// Not collective. The signal received (0 if none).
int pending();

/// Collective on comm. If any rank has received a stop request, throws on every rank a
/// collective Error naming the signal and `where`.
void check(MPI_Comm comm, const std::string& where);

} // namespace gradmap::signals
