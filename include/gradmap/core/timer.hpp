#pragma once
// Stage timers: each rank accumulates wall time per named stage; at the end they are reduced
// over ranks and printed (min / mean / max) by rank 0.
#include <mpi.h>

#include <chrono>
#include <string>

namespace gradmap {

class StageTimer {
public:
  /// Not collective. Starts timing `stage`; the time is added to the stage's total on stop()
  /// or destruction.
  explicit StageTimer(std::string stage);
  ~StageTimer();
  double stop();

private:
  std::string stage_;
  std::chrono::steady_clock::time_point start_;
  bool running_ = true;
};

/// Collective on comm. Prints one line per stage with min / mean / max seconds over ranks.
/// Every rank must have run the same stages (in any order).
void report_stage_times(MPI_Comm comm);

} // namespace gradmap
