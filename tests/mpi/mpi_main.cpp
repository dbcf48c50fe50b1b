// GoogleTest main for MPI tests: MPI (and PETSc) initialised once through mpi::Environment; only
// rank 0 prints; the exit status is non-zero if a test failed on any rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include "gradmap/mpi/environment.hpp"

int main(int argc, char** argv) {
  gradmap::mpi::Environment env(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}
