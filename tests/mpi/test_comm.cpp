#include <gtest/gtest.h>

#include "gradmap/mpi/comm.hpp"

using namespace gradmap;

TEST(Comm, CollectiveCheckRaisesTheFailingRanksErrorOnEveryRank) {
  MPI_Comm comm = MPI_COMM_WORLD;
  const int me = mpi::rank(comm), last = mpi::size(comm) - 1;
  try {
    mpi::collective_check(comm, [&] {
      if (me == last)
        throw Error("bad value in block of rank " + std::to_string(last));
    });
    FAIL() << "rank " << me << " did not raise";
  } catch (const Error& e) {
    EXPECT_TRUE(e.collective);
    EXPECT_STREQ(e.what(), ("bad value in block of rank " + std::to_string(last)).c_str());
  }
  EXPECT_NO_THROW(mpi::collective_check(comm, [] {}));
}

TEST(Comm, AllgathervConcatenatesInRankOrder) {
  MPI_Comm comm = MPI_COMM_WORLD;
  const int me = mpi::rank(comm), p = mpi::size(comm);
  std::vector<float> mine(static_cast<size_t>(me + 1), float(me));
  const auto all = mpi::allgatherv(comm, mine);
  std::vector<float> expect;
  for (int r = 0; r < p; ++r)
    expect.insert(expect.end(), size_t(r + 1), float(r));
  EXPECT_EQ(all, expect);
}

TEST(Comm, ReductionsAndBroadcast) {
  MPI_Comm comm = MPI_COMM_WORLD;
  const int me = mpi::rank(comm), p = mpi::size(comm);
  EXPECT_EQ(mpi::sum(comm, me + 1), std::int64_t(p) * (p + 1) / 2);
  EXPECT_EQ(mpi::max(comm, double(me)), double(p - 1));
  EXPECT_FALSE(mpi::all_of(comm, me != p - 1));
  EXPECT_TRUE(mpi::all_of(comm, true));
  EXPECT_EQ(mpi::broadcast(comm, me == 0 ? "from root" : "x"), "from root");
}

TEST(Comm, FailedMpiCallsThrowAnErrorNamingTheCall) {
  // The world communicator returns errors (mpi::Environment): GM_CHECK_MPI can fire. An invalid
  // root is caught by argument checking on every rank alike, before any communication.
  MPI_Comm comm = MPI_COMM_WORLD;
  int x = 0;
  try {
    GM_CHECK_MPI(MPI_Bcast(&x, 1, MPI_INT, mpi::size(comm) + 5, comm));
    FAIL() << "MPI_Bcast with an invalid root succeeded";
  } catch (const gradmap::Error& e) {
    EXPECT_NE(std::string(e.what()).find("MPI call failed: MPI_Bcast"), std::string::npos)
        << e.what();
  }
  GM_CHECK_MPI(MPI_Barrier(comm)); // the communicator still works
}
