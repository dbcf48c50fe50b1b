// Stop requests (see signals.hpp).
#include "gradmap/core/signals.hpp"

#include <csignal>
#include <cstring>

#include "gradmap/core/error.hpp"
#include "gradmap/core/mpi_check.hpp"

namespace gradmap::signals {

namespace {
volatile std::sig_atomic_t received = 0;
extern "C" void on_signal(int s) {
  received = s;
}
} // namespace

void install() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGTERM, SIGUSR1, SIGINT})
    sigaction(s, &sa, nullptr);
}

int pending() {
  return received;
}

void check(MPI_Comm comm, const std::string& where) {
  int s = received;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_INT, MPI_MAX, comm));
  if (s == 0)
    return;
  const char* name = s == SIGTERM   ? "SIGTERM"
                     : s == SIGUSR1 ? "SIGUSR1"
                     : s == SIGINT  ? "SIGINT"
                                    : "a signal";
  Error e(std::string("stopped by ") + name + " " + where +
          "; completed work is kept: rerun the same command to resume");
  e.collective = true;
  throw e;
}

} // namespace gradmap::signals
