#pragma once
// The one RAII object in main that owns MPI and PETSc initialisation, and the thread budget.
#include <mpi.h>

namespace gradmap::mpi {

class Environment {
public:
  /// Collective on MPI_COMM_WORLD. Initialises MPI (thread level FUNNELED) and PETSc (options
  /// from the PETSC_OPTIONS environment variable, e.g. PETSC_OPTIONS=-log_view).
  Environment(int& argc, char**& argv);
  ~Environment();
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

  MPI_Comm world() const { return MPI_COMM_WORLD; }
  /// Number of ranks on this node (MPI_COMM_TYPE_SHARED).
  int local_size() const { return local_size_; }
  int local_rank() const { return local_rank_; }
  /// Threads this rank should use so that ranks x threads = cores of the node (at least 1).
  int default_threads() const;
  /// Not collective. Cores this process may run on (its CPU affinity: mpirun binds each rank to
  /// one core by default when ranks <= 2, to a socket otherwise).
  static int usable_cores();

  /// Not collective. Sets the BLAS/OpenMP thread count of this process.
  static void set_blas_threads(int n);

private:
  int local_size_ = 1, local_rank_ = 0;
  bool petsc_ = false;
};

} // namespace gradmap::mpi
