#pragma once
// Value-returning helpers over an explicit communicator (after heFFTe's mpi:: helpers), and the
// error agreement that keeps one rank's failure from leaving others blocked in a collective.
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gradmap/core/error.hpp"
#include "gradmap/core/mpi_check.hpp"

namespace gradmap::mpi {

/// Collective on comm. The number of ranks of comm on this rank's node (shared memory).
int node_size(MPI_Comm comm);

inline int rank(MPI_Comm comm) {
  int r = 0;
  GM_CHECK_MPI(MPI_Comm_rank(comm, &r));
  return r;
}
inline int size(MPI_Comm comm) {
  int s = 1;
  GM_CHECK_MPI(MPI_Comm_size(comm, &s));
  return s;
}

/// Collective on comm. Runs f on every rank; if it throws on any rank, every rank throws the
/// same gradmap::Error (the message of the lowest failing rank, marked collective). Use it
/// around validation done before the first collective that depends on its result.
void collective_check(MPI_Comm comm, const std::function<void()>& f);

/// Collective on comm. Logical AND / sum / max over ranks.
bool all_of(MPI_Comm comm, bool local);
std::int64_t sum(MPI_Comm comm, std::int64_t local);
double max(MPI_Comm comm, double local);

/// Collective on comm. Broadcasts a string from root.
std::string broadcast(MPI_Comm comm, std::string s, int root = 0);

/// Collective on comm. Concatenates every rank's `local` in rank order on all ranks. Counts may
/// exceed INT_MAX elements in total: the transfer is split into pieces under 2^30 elements.
std::vector<float> allgatherv(MPI_Comm comm, const std::vector<float>& local);

} // namespace gradmap::mpi
