// MAT-file Level 5 reader: see matfile.hpp. Format: MathWorks, "MAT-File Format" (R2024a), ch. 1.
#include "gradmap/io/matfile.hpp"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>

#include "gradmap/core/error.hpp"

namespace gradmap::io {

std::int64_t MatArray::numel() const {
  std::int64_t n = 1;
  for (auto d : dims)
    n *= d;
  return n;
}

namespace {

enum : std::uint32_t {
  miINT8 = 1,
  miUINT8 = 2,
  miINT16 = 3,
  miUINT16 = 4,
  miINT32 = 5,
  miUINT32 = 6,
  miSINGLE = 7,
  miDOUBLE = 9,
  miINT64 = 12,
  miUINT64 = 13,
  miMATRIX = 14,
  miCOMPRESSED = 15
};

const char* class_name(int c) {
  static const char* names[] = {"",       "cell",   "struct", "object", "char",  "sparse",
                                "double", "single", "int8",   "uint8",  "int16", "uint16",
                                "int32",  "uint32", "int64",  "uint64"};
  return c >= 0 && c < 16 ? names[c] : "unknown";
}

std::size_t type_size(std::uint32_t t) {
  switch (t) {
  case miINT8:
  case miUINT8: return 1;
  case miINT16:
  case miUINT16: return 2;
  case miINT32:
  case miUINT32:
  case miSINGLE: return 4;
  case miDOUBLE:
  case miINT64:
  case miUINT64: return 8;
  default: return 0;
  }
}

// A cursor over a byte range, with the file's byte order.
struct Reader {
  const std::uint8_t* p;
  std::size_t n, pos = 0;
  bool swap;
  const std::string& path;

  [[noreturn]] void corrupt(const std::string& what) const {
    throw Error(path + ": corrupt MAT-file (" + what + " at byte " + std::to_string(pos) + ")");
  }
  void need(std::size_t k) const {
    if (k > n - pos)
      corrupt("element runs past the end");
  }
  template <class T> T get(std::size_t at) const {
    T v;
    std::memcpy(&v, p + at, sizeof v);
    if (swap) {
      auto* b = reinterpret_cast<std::uint8_t*>(&v);
      std::reverse(b, b + sizeof v);
    }
    return v;
  }
  // One data element: its type, its data range, and the position after it.
  struct Element {
    std::uint32_t type;
    std::size_t begin, size;
  };
  Element next(bool pad = true) {
    need(8);
    std::uint32_t type = get<std::uint32_t>(pos);
    if ((type >> 16) != 0) { // small data element: 2-byte size, 2-byte type, 4 bytes of data
      Element e{type & 0xffffu, pos + 4, type >> 16};
      if (e.size > 4)
        corrupt("small element larger than 4 bytes");
      pos += 8;
      return e;
    }
    const std::uint32_t bytes = get<std::uint32_t>(pos + 4);
    Element e{type, pos + 8, bytes};
    pos += 8;
    need(bytes);
    pos += bytes;
    if (pad && type != miCOMPRESSED)
      pos = std::min(n, (pos + 7) & ~std::size_t(7));
    return e;
  }
};

double value_at(const Reader& r, std::uint32_t type, std::size_t at) {
  switch (type) {
  case miINT8: return double(r.get<std::int8_t>(at));
  case miUINT8: return double(r.get<std::uint8_t>(at));
  case miINT16: return double(r.get<std::int16_t>(at));
  case miUINT16: return double(r.get<std::uint16_t>(at));
  case miINT32: return double(r.get<std::int32_t>(at));
  case miUINT32: return double(r.get<std::uint32_t>(at));
  case miSINGLE: return double(r.get<float>(at));
  case miDOUBLE: return r.get<double>(at);
  case miINT64: return double(r.get<std::int64_t>(at));
  case miUINT64: return double(r.get<std::uint64_t>(at));
  default: return 0;
  }
}

std::vector<std::uint8_t> inflate_all(const std::uint8_t* src, std::size_t n,
                                      const std::string& path) {
  std::vector<std::uint8_t> out(std::max<std::size_t>(n * 4, 1024));
  z_stream z{};
  if (inflateInit(&z) != Z_OK)
    throw Error(path + ": zlib initialisation failed");
  z.next_in = const_cast<Bytef*>(src);
  z.avail_in = uInt(n);
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    if (z.total_out == out.size())
      out.resize(out.size() * 2);
    z.next_out = out.data() + z.total_out;
    z.avail_out = uInt(out.size() - z.total_out);
    rc = inflate(&z, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) {
      inflateEnd(&z);
      throw Error(path + ": corrupt MAT-file (a compressed variable does not inflate: " +
                  std::string(z.msg ? z.msg : "zlib error") + ")");
    }
    if (rc == Z_OK && z.avail_in == 0 && z.avail_out != 0) {
      inflateEnd(&z);
      throw Error(path + ": corrupt MAT-file (a compressed variable is truncated)");
    }
  }
  out.resize(z.total_out);
  inflateEnd(&z);
  return out;
}

// Parses one miMATRIX element's contents; stores it if its name is wanted.
void parse_matrix(Reader r, const std::set<std::string>& wanted,
                  std::map<std::string, MatArray>& out) {
  const auto flags = r.next();
  if (flags.type != miUINT32 || flags.size != 8)
    r.corrupt("array flags");
  const std::uint32_t f = r.get<std::uint32_t>(flags.begin);
  const int cls = int(f & 0xff);
  const bool complex = (f & 0x0800) != 0;
  const auto dims_el = r.next();
  if (dims_el.type != miINT32 || dims_el.size % 4 != 0)
    r.corrupt("dimensions");
  MatArray a;
  for (std::size_t i = 0; i < dims_el.size / 4; ++i)
    a.dims.push_back(r.get<std::int32_t>(dims_el.begin + 4 * i));
  const auto name_el = r.next();
  if (name_el.type != miINT8)
    r.corrupt("array name");
  const std::string name(reinterpret_cast<const char*>(r.p + name_el.begin), name_el.size);
  if (!wanted.count(name))
    return;
  a.mat_class = class_name(cls);
  if (cls < 6 || cls > 15 || complex)
    throw Error(r.path + ": variable '" + name + "' is a " +
                (complex ? std::string("complex ") : std::string()) + a.mat_class +
                " array, not a real numeric array");
  const auto data = r.next();
  const std::size_t es = type_size(data.type);
  if (es == 0)
    r.corrupt("element type " + std::to_string(data.type) + " of variable '" + name + "'");
  if (std::int64_t(data.size / es) != a.numel())
    throw Error(r.path + ": variable '" + name + "' holds " + std::to_string(data.size / es) +
                " values for " + std::to_string(a.numel()) + " elements");
  a.values.resize(size_t(a.numel()));
  for (std::size_t i = 0; i < a.values.size(); ++i)
    a.values[i] = value_at(r, data.type, data.begin + i * es);
  out[name] = std::move(a);
}

} // namespace

std::map<std::string, MatArray> read_mat(const std::string& path,
                                         const std::vector<std::string>& names) {
  std::ifstream f(path, std::ios::binary);
  if (!f)
    throw Error(path + ": cannot open (missing or unreadable)");
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)),
                                  std::istreambuf_iterator<char>());
  if (bytes.size() < 128)
    throw Error(path + ": not a MAT-file (shorter than the 128-byte header)");
  const std::string text(bytes.begin(), bytes.begin() + 116);
  if (text.rfind("MATLAB 7.3", 0) == 0)
    throw Error(path + ": a MATLAB v7.3 (HDF5) MAT-file; gradmap reads Level 5 MAT-files "
                       "(save with -v7 or scipy.io.savemat)");
  if (text.rfind("MATLAB", 0) != 0)
    throw Error(path + ": not a MATLAB Level 5 MAT-file (no 'MATLAB' header text)");
  const char e0 = char(bytes[126]), e1 = char(bytes[127]);
  bool swap;
  if (e0 == 'I' && e1 == 'M')
    swap = false;
  else if (e0 == 'M' && e1 == 'I')
    swap = true;
  else
    throw Error(path + ": not a Level 5 MAT-file (endian indicator missing)");
  const std::set<std::string> wanted(names.begin(), names.end());
  std::map<std::string, MatArray> out;
  Reader r{bytes.data(), bytes.size(), 128, swap, path};
  while (r.pos + 8 <= r.n) {
    const auto e = r.next();
    if (e.type == miCOMPRESSED) {
      const auto raw = inflate_all(r.p + e.begin, e.size, path);
      Reader inner{raw.data(), raw.size(), 0, swap, path};
      const auto m = inner.next(false);
      if (m.type == miMATRIX)
        parse_matrix(Reader{raw.data() + m.begin, m.size, 0, swap, path}, wanted, out);
    } else if (e.type == miMATRIX && e.size > 0) {
      parse_matrix(Reader{r.p + e.begin, e.size, 0, swap, path}, wanted, out);
    }
  }
  for (const auto& n : names)
    if (!out.count(n))
      throw Error(path + ": variable '" + n + "' not found");
  return out;
}

} // namespace gradmap::io
