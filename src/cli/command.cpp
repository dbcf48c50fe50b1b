#include "command.hpp"

#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::cli {

const std::vector<Command>& commands() {
  static const std::vector<Command> all = {
      simulate_command(),   extract_command(),          encode_command(),   stats_command(),
      aggregate_command(),  report_command(),           validate_command(), run_command(),
      import_nsd_command(), import_things_meg_command()};

  return all;
}

const Command* find_command(const std::string& name) {
  for (const auto& c : commands())
    if (c.name == name)
      return &c;
  return nullptr;
}

namespace {

void add_common(po::options_description& d) {
  d.add_options()("help,h", "show this help and exit")(
      "config", po::value<std::string>(),
      "INI file of options (keys before any section, or in the section [<command>]); "
      "command-line options override it")("threads", po::value<int>(),
                                          "threads per rank (default: cores / ranks on the node)")(
      "verbose,v", po::bool_switch(), "print debug messages")("quiet,q", po::bool_switch(),
                                                              "print warnings and errors only")(
      "log-file", po::value<std::string>(), "also append rank 0's log lines to this file");
}

// Keeps the options of the command's own section (renamed to their bare key) and the keys
// before any section; rejects keys the command does not know.
po::parsed_options filter_config(const po::parsed_options& in, const po::options_description& d,
                                 const std::string& section, const std::string& file) {
  po::parsed_options out(&d);
  for (const auto& o : in.options) {
    std::string key = o.string_key;
    const auto dot = key.find('.');
    if (dot != std::string::npos) {
      if (key.substr(0, dot) != section)
        continue; // another command's section
      key = key.substr(dot + 1);
    }
    if (key == "config")
      throw UsageError(file + ": 'config' cannot be set inside a config file");
    if (!d.find_nothrow(key, false))
      throw UsageError(file + ": unknown option '" + key + "'" +
                       (dot != std::string::npos ? " in section [" + section + "]" : "") +
                       " for gradmap " + section);
    po::option opt(key, o.value);
    opt.original_tokens = o.original_tokens;
    out.options.push_back(opt);
  }
  return out;
}

} // namespace

std::optional<po::variables_map> parse(const Command& cmd, const std::vector<std::string>& args) {
  po::options_description own(cmd.name + " options");
  cmd.options(own);
  po::options_description common("common options");
  add_common(common);
  po::options_description all;
  all.add(own).add(common);
  po::positional_options_description pos;
  if (cmd.positional)
    cmd.positional(pos);

  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
  } catch (const po::error& e) {
    throw UsageError("gradmap " + cmd.name + ": " + e.what() + " (see gradmap " + cmd.name +
                     " --help)");
  }
  if (vm.count("help")) {
    if (log::rank() == 0)
      std::cout << "usage: gradmap " << cmd.name << " " << cmd.usage << "\n\n"
                << cmd.summary << "\n\n"
                << own << "\n"
                << common << std::endl;
    return std::nullopt;
  }
  if (vm.count("config")) {
    const std::string file = vm["config"].as<std::string>();
    std::ifstream in(file);
    if (!in)
      throw UsageError("--config: cannot read config file " + file);
    try {
      auto parsed = po::parse_config_file(in, all, /*allow_unregistered=*/true);
      po::store(filter_config(parsed, all, cmd.name, file), vm);
    } catch (const po::error& e) {
      throw UsageError(file + ": " + e.what());
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError("gradmap " + cmd.name + ": " + e.what() + " (see gradmap " + cmd.name +
                     " --help)");
  }
  return vm;
}

void apply_common(const po::variables_map& vm, Context& ctx) {
  if (vm["verbose"].as<bool>())
    log::set_level(log::Level::debug);
  if (vm["quiet"].as<bool>())
    log::set_level(log::Level::warn);
  if (vm.count("log-file"))
    log::set_file(vm["log-file"].as<std::string>());
  const int threads = threads_of(vm, ctx);
  if (threads < 1)
    throw UsageError("--threads: must be at least 1");
  // More threads than the node has cores only oversubscribes (and thread pools of that size can
  // take minutes to start): refused, on every rank alike.
  const int node_cores = int(std::thread::hardware_concurrency());
  if (node_cores > 0 && threads > node_cores)
    throw UsageError("--threads: " + std::to_string(threads) + " exceeds the " +
                     std::to_string(node_cores) + " cores of this node");
  const int usable = mpi::Environment::usable_cores();
  if (threads > usable)
    GM_WARN("--threads " << threads << " but this rank is bound to " << usable
                         << " core(s): the threads share them. Unbind (mpirun --bind-to none) "
                            "or give each rank its cores (mpirun --map-by slot:PE="
                         << threads << ", srun --cpus-per-task=" << threads << ")");
  mpi::Environment::set_blas_threads(threads);
}

int threads_of(const po::variables_map& vm, const Context& ctx) {
  return vm.count("threads") ? vm["threads"].as<int>() : ctx.env.default_threads();
}

} // namespace gradmap::cli
