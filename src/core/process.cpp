// Helper programs: see process.hpp.
#include "gradmap/core/process.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "gradmap/core/error.hpp"

#ifndef GRADMAP_SOURCE_DIR
#define GRADMAP_SOURCE_DIR "."
#endif

namespace gradmap {

std::string find_tool(const std::string& file, const std::string& given, const char* env_var) {
  if (!given.empty())
    return given;
  if (const char* env = std::getenv(env_var))
    return env;
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  for (const auto& cand : {exe.parent_path() / "../share/gradmap" / file,
                           std::filesystem::path(GRADMAP_SOURCE_DIR) / "tools" / file})
    if (!ec && std::filesystem::exists(cand))
      return cand.lexically_normal().string();
  throw Error("cannot find " + file + " (tools/" + file + "); give its path with --script or set " +
              env_var);
}

int run_program(const std::vector<std::string>& argv, const std::string& log) {
  std::vector<char*> args;
  for (const auto& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    if (!log.empty()) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
    }
    execv(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) < 0)
    return 127;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string last_line(const std::string& path) {
  std::ifstream f(path);
  std::string line, last;
  while (std::getline(f, line))
    if (!line.empty())
      last = line;
  return last;
}

} // namespace gradmap
