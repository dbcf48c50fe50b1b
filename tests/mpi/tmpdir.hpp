#pragma once
// A scratch directory shared by the ranks of a test (named by rank 0, created, broadcast).
#include <mpi.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "gradmap/mpi/comm.hpp"

inline std::string shared_tmpdir(MPI_Comm comm, const std::string& name) {
  std::string dir;
  if (gradmap::mpi::rank(comm) == 0) {
    dir = (std::filesystem::temp_directory_path() /
           ("gradmap-test-" + name + "-" + std::to_string(::getpid())))
              .string();
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  dir = gradmap::mpi::broadcast(comm, dir);
  MPI_Barrier(comm);
  return dir;
}
