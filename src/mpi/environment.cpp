#include "gradmap/mpi/environment.hpp"

#include <omp.h>
#include <petscsys.h>

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "gradmap/core/log.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/mpi/comm.hpp"

extern "C" void openblas_set_num_threads(int);

namespace gradmap::mpi {

Environment::Environment(int& argc, char**& argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  // Errors on the world communicator (and the communicators derived from it, which inherit the
  // handler) are returned, not fatal: every MPI call is wrapped in GM_CHECK_MPI, which turns a
  // failure into a gradmap::Error naming the call; main prints it once and aborts the job.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int r = 0, s = 1;
  GM_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &r));
  GM_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &s));
  log::init(r, s);
  MPI_Comm node;
  GM_CHECK_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, r, MPI_INFO_NULL, &node));
  GM_CHECK_MPI(MPI_Comm_size(node, &local_size_));
  GM_CHECK_MPI(MPI_Comm_rank(node, &local_rank_));
  GM_CHECK_MPI(MPI_Comm_free(&node));
  // PETSc reads its options from PETSC_OPTIONS; argv belongs to gradmap's own parser.
  PETSC_COMM_WORLD = MPI_COMM_WORLD;
  if (PetscInitializeNoArguments() == 0)
    petsc_ = true;
  signals::install(); // after PETSc, whose own handlers would abort on SIGTERM
}

Environment::~Environment() {
  if (petsc_)
    PetscFinalize();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized)
    MPI_Finalize();
}

int Environment::default_threads() const {
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const int t = std::min(cores / (local_size_ > 0 ? local_size_ : 1), usable_cores());
  return t > 0 ? t : 1;
}

int Environment::usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0)
    return static_cast<int>(std::thread::hardware_concurrency());
  return CPU_COUNT(&set);
}

void Environment::set_blas_threads(int n) {
  openblas_set_num_threads(n);
  omp_set_num_threads(n);
  const std::string v = std::to_string(n);
  setenv("OMP_NUM_THREADS", v.c_str(), 1);
}

} // namespace gradmap::mpi
