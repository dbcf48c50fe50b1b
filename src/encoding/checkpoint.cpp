#include "checkpoint.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gradmap/core/error.hpp"

namespace gradmap::encoding {
namespace {

constexpr char kMagic[8] = {'G', 'M', 'C', 'K', 'P', 'T', '0', '1'};

template <class T> void put(std::ostream& os, const T& v) {
  os.write(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <class T> void put_vec(std::ostream& os, const std::vector<T>& v) {
  put(os, std::uint64_t(v.size()));
  os.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * sizeof(T)));
}

template <class T> bool get(std::istream& is, T& v) {
  return bool(is.read(reinterpret_cast<char*>(&v), sizeof(T)));
}

// Reads a vector saved by put_vec; `exact`: its size must equal v's (an accumulator's layout).
template <class T> bool get_vec(std::istream& is, std::vector<T>& v, bool exact = true) {
  std::uint64_t n = 0;
  if (!get(is, n) || (exact && n != v.size()) || n > (std::uint64_t(1) << 40) / sizeof(T))
    return false;
  v.resize(static_cast<size_t>(n));
  return bool(is.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T))));
}

} // namespace

std::string checkpoint_path(const std::string& out, int rank, std::int64_t rounds) {
  return out + ".partial.rank" + std::to_string(rank) + ".round" + std::to_string(rounds);
}

void save_checkpoint(const std::string& out, int rank, std::int64_t rounds, const std::string& key,
                     const RankState& s) {
  const std::string path = checkpoint_path(out, rank, rounds), tmp = path + ".tmp";
  {
    std::ofstream os(tmp, std::ios::binary | std::ios::trunc);
    os.write(kMagic, sizeof(kMagic));
    put(os, std::uint64_t(key.size()));
    os.write(key.data(), std::streamsize(key.size()));
    put(os, rounds);
    put(os, *s.constant);
    put(os, *s.nonfinite);
    put_vec(os, *s.nonfinite_examples);
    put(os, std::uint64_t(s.acc->size()));
    for (const auto& a : *s.acc) {
      put_vec(os, a.null_max);
      put_vec(os, a.perm_sum);
      put_vec(os, a.boot_sum);
      put_vec(os, a.obs_sum);
      put_vec(os, a.n);
      put_vec(os, a.above);
    }
    os.flush();
    if (!os)
      throw Error("encode: cannot write the checkpoint " + tmp + " (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

bool load_checkpoint(const std::string& out, int rank, std::int64_t rounds, const std::string& key,
                     RankState& s) {
  std::ifstream is(checkpoint_path(out, rank, rounds), std::ios::binary);
  if (!is)
    return false;
  char magic[sizeof(kMagic)];
  std::uint64_t key_size = 0, n_acc = 0;
  if (!is.read(magic, sizeof(magic)) || !std::equal(magic, magic + sizeof(magic), kMagic) ||
      !get(is, key_size) || key_size != key.size())
    return false;
  std::string saved(key_size, '\0');
  std::int64_t saved_rounds = -1;
  if (!is.read(saved.data(), std::streamsize(key_size)) || saved != key || !get(is, saved_rounds) ||
      saved_rounds != rounds || !get(is, *s.constant) || !get(is, *s.nonfinite) ||
      !get_vec(is, *s.nonfinite_examples, false) || !get(is, n_acc) || n_acc != s.acc->size())
    return false;
  for (auto& a : *s.acc)
    if (!get_vec(is, a.null_max) || !get_vec(is, a.perm_sum) || !get_vec(is, a.boot_sum) ||
        !get_vec(is, a.obs_sum) || !get_vec(is, a.n) || !get_vec(is, a.above))
      return false;
  char extra;
  return !is.read(&extra, 1); // nothing after the last accumulator
}

void remove_checkpoints(const std::string& out, int rank) {
  const std::filesystem::path p(out);
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : ".";
  const std::string prefix = p.filename().string() + ".partial.rank" + std::to_string(rank) + ".";
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().filename().string().rfind(prefix, 0) == 0)
      std::filesystem::remove(e.path(), ec);
}

} // namespace gradmap::encoding
