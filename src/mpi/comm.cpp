#include "gradmap/mpi/comm.hpp"

#include <algorithm>
#include <climits>

namespace gradmap::mpi {

int node_size(MPI_Comm comm) {
  MPI_Comm node;
  GM_CHECK_MPI(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank(comm), MPI_INFO_NULL, &node));
  int s = 1;
  GM_CHECK_MPI(MPI_Comm_size(node, &s));
  GM_CHECK_MPI(MPI_Comm_free(&node));
  return s;
}

void collective_check(MPI_Comm comm, const std::function<void()>& f) {
  std::string message;
  bool failed = false;
  try {
    f();
  } catch (const std::exception& e) {
    failed = true;
    message = e.what();
  }
  const int me = rank(comm);
  int first = failed ? me : INT_MAX;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm));
  if (first == INT_MAX)
    return;
  message = broadcast(comm, message, first);
  Error e(message);
  e.collective = true;
  throw e;
}

bool all_of(MPI_Comm comm, bool local) {
  int v = local ? 1 : 0;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, comm));
  return v == 1;
}

std::int64_t sum(MPI_Comm comm, std::int64_t local) {
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &local, 1, MPI_INT64_T, MPI_SUM, comm));
  return local;
}

double max(MPI_Comm comm, double local) {
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &local, 1, MPI_DOUBLE, MPI_MAX, comm));
  return local;
}

std::string broadcast(MPI_Comm comm, std::string s, int root) {
  long long n = static_cast<long long>(s.size());
  GM_CHECK_MPI(MPI_Bcast(&n, 1, MPI_LONG_LONG, root, comm));
  s.resize(static_cast<size_t>(n));
  if (n > 0)
    GM_CHECK_MPI(MPI_Bcast(s.data(), static_cast<int>(n), MPI_CHAR, root, comm));
  return s;
}

std::vector<float> allgatherv(MPI_Comm comm, const std::vector<float>& local) {
  const int p = size(comm);
  std::vector<long long> counts(p);
  long long mine = static_cast<long long>(local.size());
  GM_CHECK_MPI(MPI_Allgather(&mine, 1, MPI_LONG_LONG, counts.data(), 1, MPI_LONG_LONG, comm));
  std::vector<long long> displs(p, 0);
  for (int i = 1; i < p; ++i)
    displs[i] = displs[i - 1] + counts[i - 1];
  std::vector<float> out(static_cast<size_t>(displs[p - 1] + counts[p - 1]));
  // Broadcast each rank's piece in slices below 2^30 elements so that no count overflows int.
  constexpr long long kSlice = 1LL << 30;
  const int me = rank(comm);
  for (int src = 0; src < p; ++src) {
    if (src == me && counts[src] > 0)
      std::copy(local.begin(), local.end(), out.begin() + displs[src]);
    for (long long off = 0; off < counts[src]; off += kSlice) {
      const int n = static_cast<int>(std::min(kSlice, counts[src] - off));
      GM_CHECK_MPI(MPI_Bcast(out.data() + displs[src] + off, n, MPI_FLOAT, src, comm));
    }
  }
  return out;
}

} // namespace gradmap::mpi
