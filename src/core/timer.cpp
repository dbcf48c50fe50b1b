#include "gradmap/core/timer.hpp"

#include <cstdio>
#include <map>
#include <vector>

#include "gradmap/core/log.hpp"
#include "gradmap/core/mpi_check.hpp"

namespace gradmap {
namespace {
std::map<std::string, double>& totals() {
  static std::map<std::string, double> t;
  return t;
}
} // namespace

StageTimer::StageTimer(std::string stage)
    : stage_(std::move(stage)), start_(std::chrono::steady_clock::now()) {}

StageTimer::~StageTimer() {
  if (running_)
    stop();
}

double StageTimer::stop() {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (running_)
    totals()[stage_] += s;
  running_ = false;
  return s;
}

void report_stage_times(MPI_Comm comm) {
  int p = 1;
  GM_CHECK_MPI(MPI_Comm_size(comm, &p));
  // std::map iterates in sorted order, so every rank reduces the stages in the same order.
  for (const auto& [name, secs] : totals()) {
    double mn = secs, mx = secs, sm = secs;
    GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &mn, 1, MPI_DOUBLE, MPI_MIN, comm));
    GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &mx, 1, MPI_DOUBLE, MPI_MAX, comm));
    GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &sm, 1, MPI_DOUBLE, MPI_SUM, comm));
    char buf[200];
    std::snprintf(buf, sizeof buf, "time %-24s min %8.2fs  mean %8.2fs  max %8.2fs", name.c_str(),
                  mn, sm / p, mx);
    log::write(log::Level::info, buf);
  }
}

} // namespace gradmap
