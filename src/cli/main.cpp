// gradmap: one binary, subcommands, run under mpirun. main owns MPI/PETSc (mpi::Environment),
// dispatches to the command, and turns any error into one clear message and a non-zero exit on
// every rank: errors raised identically on all ranks are printed once by rank 0 and end the
// job cleanly; an error on some ranks only is printed with its rank and aborts the job
// (MPI_Abort), so that no rank is left waiting in a collective.
#include <mpi.h>

#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <new>
#include <string>

#include "command.hpp"
#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/signals.hpp"
#include "gradmap/core/timer.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/model/features.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/mpi/environment.hpp"

#ifndef GRADMAP_VERSION
#define GRADMAP_VERSION "unknown"
#endif

namespace {

void print_usage() {
  std::cout << "gradmap " << GRADMAP_VERSION
            << " - maps per-layer activations and backpropagated gradients of vision networks\n"
               "onto fMRI and MEG responses.\n\n"
               "usage: [mpirun -n N] gradmap <command> [options]   (gradmap <command> --help)\n\n"
               "commands:\n";
  for (const auto& c : gradmap::cli::commands()) {
    const auto first_line = c.summary.substr(0, c.summary.find('\n'));
    std::cout << "  " << c.name << std::string(12 - std::min<size_t>(11, c.name.size()), ' ')
              << first_line << "\n";
  }
  std::cout << "\nglobal: gradmap --version | gradmap --help\n";
}

// Whether this process runs with glibc's huge-page malloc (see reexec_with_huge_pages below).
std::string huge_pages_line() {
  const char* t = std::getenv("GLIBC_TUNABLES");
  const std::string v = t ? t : "";
  if (v.find("glibc.malloc.hugetlb=1") != std::string::npos)
    return "malloc: huge pages on (GLIBC_TUNABLES=" + v + ")";
  return std::string("malloc: huge pages off (") +
         (t ? "GLIBC_TUNABLES=" + v + " set by the caller" : "GRADMAP_HUGEPAGES=0") + ")";
}

void print_version() {
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  GM_CHECK_MPI(MPI_Get_library_version(mpi_version, &len));
  std::string mpi(mpi_version, len);
  mpi = mpi.substr(0, mpi.find_first_of(",\n"));
  std::cout << "gradmap " << GRADMAP_VERSION << "\n  HDF5 " << maj << "." << min << "." << rel
            << " (parallel)\n  " << mpi << "\n  LibTorch " << gradmap::model::torch_version()
            << "\n  data schema " << 1 << "\n  " << huge_pages_line() << std::endl;
}

int dispatch(int argc, char** argv, gradmap::mpi::Environment& env) {
  using namespace gradmap;
  const bool root = mpi::rank(env.world()) == 0;
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    if (root)
      print_usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  if (name == "--version") {
    if (root)
      print_version();
    return 0;
  }
  const cli::Command* cmd = cli::find_command(name);
  if (!cmd)
    throw UsageError("unknown command '" + name + "' (see gradmap --help)");
  std::vector<std::string> args(argv + 2, argv + argc);
  auto vm = cli::parse(*cmd, args);
  if (!vm)
    return 0; // --help
  cli::Context ctx{env, env.world()};
  cli::apply_common(*vm, ctx);
  cmd->run(*vm, ctx);
  report_stage_times(ctx.comm);
  return 0;
}

} // namespace

// glibc (>= 2.35) backs large malloc'd buffers with transparent huge pages when the tunable
// glibc.malloc.hugetlb=1 is set. gradmap's working arrays are GiB-sized and touched once per
// pass: on 4 KiB pages the page faults alone cost more than a third of encode's time (measured:
// 67 s -> 47 s on the encode benchmark). Tunables are read at process start, so the process
// re-executes itself once with the tunable added. It does so from the executable's
// .preinit_array, which runs before any shared library's initialisers: the first image then
// never pays LibTorch's and PETSc's start-up (measured: `gradmap encode --help` 2.2-2.7 s with
// the re-execution in main, 1.5 s without it). Opt out with GRADMAP_HUGEPAGES=0, or by setting
// GLIBC_TUNABLES yourself. Only the environment block and execve are used here (libc is not
// initialised yet); on failure the process carries on without huge pages.
namespace {

bool starts_with(const char* s, const char* prefix) {
  while (*prefix)
    if (*s++ != *prefix++)
      return false;
  return true;
}

void reexec_with_huge_pages(int, char** argv, char** envp) {
  static char tunable[] = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1";
  static char* env[4096];
  size_t n = 0;
  for (char** e = envp; e && *e; ++e) {
    if (starts_with(*e, "GLIBC_TUNABLES=") || starts_with(*e, "GRADMAP_HUGEPAGES=0"))
      return;
    if (n + 2 >= sizeof(env) / sizeof(env[0]))
      return; // an environment this large is left as it is
    env[n++] = *e;
  }
  env[n++] = tunable;
  env[n] = nullptr;
  execve("/proc/self/exe", argv, env); // returns only on failure
}

} // namespace

__attribute__((section(".preinit_array"),
               used)) static void (*const gradmap_preinit)(int, char**,
                                                           char**) = reexec_with_huge_pages;

int main(int argc, char** argv) {
  gradmap::signals::install(); // a stop request during start-up is honoured at the first block
  gradmap::mpi::Environment env(argc, argv);
  const int me = gradmap::mpi::rank(env.world());
  const int ranks = gradmap::mpi::size(env.world());
  auto fail = [&](const std::string& msg, bool collective) {
    if (collective) {
      if (me == 0)
        std::cerr << "gradmap: error: " << msg << std::endl;
      return 1; // every rank returns: clean finalisation, exit status 1
    }
    std::cerr << "gradmap: error" << (ranks > 1 ? " (rank " + std::to_string(me) + ")" : "") << ": "
              << msg << std::endl;
    MPI_Abort(env.world(), 1);
    return 1;
  };
  try {
    return dispatch(argc, argv, env);
  } catch (const gradmap::Error& e) {
    return fail(e.what(), e.collective);
  } catch (const std::bad_alloc&) {
    return fail("out of memory (try fewer images per batch, a smaller --voxel-chunk, or more "
                "ranks/nodes)",
                false);
  } catch (const std::exception& e) {
    return fail(e.what(), false);
  }
}
