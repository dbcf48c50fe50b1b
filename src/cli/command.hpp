#pragma once
// The command framework: each command declares its options and calls one library function.
// Options come from the command line and from `--config FILE` (INI): keys before any section and
// keys in the section named after the command apply; the command line wins over the file.
#include <boost/program_options.hpp>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "gradmap/mpi/environment.hpp"

namespace gradmap::cli {

namespace po = boost::program_options;

struct Context {
  mpi::Environment& env;
  MPI_Comm comm;
};

struct Command {
  std::string name;
  std::string summary;
  std::string usage; ///< e.g. "--out DIR [options]"
  std::function<void(po::options_description&)> options;
  std::function<void(po::positional_options_description&)> positional; ///< may be empty
  std::function<void(const po::variables_map&, Context&)> run;
};

/// All commands, in the order `gradmap --help` lists them.
const std::vector<Command>& commands();
const Command* find_command(const std::string& name);

/// Not collective (every rank parses the same arguments). Parses `args` (after the command name)
/// and the config file they name. Returns nullopt when --help was given (help printed by rank 0).
/// Throws UsageError naming the option, or the config file and key, that is wrong.
std::optional<po::variables_map> parse(const Command& cmd, const std::vector<std::string>& args);

/// Not collective. Applies the options common to all commands (--threads, --verbose, --quiet,
/// --log-file) to this process.
void apply_common(const po::variables_map& vm, Context& ctx);
/// Threads per rank from --threads, or the node's cores divided by its ranks.
int threads_of(const po::variables_map& vm, const Context& ctx);

// Command definitions (one file each in src/cli/).
Command simulate_command();
Command extract_command();
Command encode_command();
Command validate_command();
Command stats_command();
Command aggregate_command();
Command report_command();
Command run_command();
Command import_nsd_command();
Command import_things_meg_command();

} // namespace gradmap::cli
