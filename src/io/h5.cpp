#include "gradmap/io/h5.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>

#include "gradmap/mpi/comm.hpp"

namespace gradmap::io {
namespace {

// Silence HDF5's automatic error printing once; errors are turned into gradmap::Error instead.
struct SilenceH5 {
  SilenceH5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }
};
const SilenceH5& silence() {
  static SilenceH5 s;
  return s;
}

herr_t collect_error(unsigned n, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::string*>(data);
  if (n == 0 && err->desc)
    *out = err->desc;
  else if (err->desc && out->empty())
    *out = err->desc;
  return 0;
}

hid_t memtype_of(DType t) {
  switch (t) {
  case DType::u8: return H5T_NATIVE_UINT8;
  case DType::i32: return H5T_NATIVE_INT32;
  case DType::i64: return H5T_NATIVE_INT64;
  case DType::f32: return H5T_NATIVE_FLOAT;
  case DType::f64: return H5T_NATIVE_DOUBLE;
  case DType::string: break;
  }
  throw Error("no native memory type for strings");
}

Handle vlen_string_type() {
  Handle t(GM_CHECK_H5(H5Tcopy(H5T_C_S1)));
  GM_CHECK_H5(H5Tset_size(t.get(), H5T_VARIABLE));
  GM_CHECK_H5(H5Tset_cset(t.get(), H5T_CSET_UTF8));
  return t;
}

std::vector<hsize_t> to_hsize(const std::vector<std::int64_t>& v) {
  return std::vector<hsize_t>(v.begin(), v.end());
}

std::int64_t product(const std::vector<std::int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), std::int64_t{1}, std::multiplies<>());
}

} // namespace

void throw_h5_error(const char* what) {
  std::string desc;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_error, &desc);
  H5Eclear2(H5E_DEFAULT);
  throw Error("HDF5 error" + (desc.empty() ? std::string() : ": " + desc) + " (in " + what + ")");
}

const char* dtype_name(DType t) {
  switch (t) {
  case DType::u8: return "uint8";
  case DType::i32: return "int32";
  case DType::i64: return "int64";
  case DType::f32: return "float32";
  case DType::f64: return "float64";
  case DType::string: return "string";
  }
  return "?";
}

void Handle::reset() {
  if (id_ < 0)
    return;
  switch (H5Iget_type(id_)) {
  case H5I_FILE: H5Fclose(id_); break;
  case H5I_GROUP: H5Gclose(id_); break;
  case H5I_DATASET: H5Dclose(id_); break;
  case H5I_DATASPACE: H5Sclose(id_); break;
  case H5I_DATATYPE: H5Tclose(id_); break;
  case H5I_ATTR: H5Aclose(id_); break;
  case H5I_GENPROP_LST: H5Pclose(id_); break;
  default: break;
  }
  id_ = H5I_INVALID_HID;
}

// ----------------------------------------------------------------------------------- File

File::File(std::string path, MPI_Comm comm, Handle id)
    : path_(std::move(path)), comm_(comm), id_(std::move(id)) {}

namespace {
// Opens (flags: H5F_ACC_RDONLY / H5F_ACC_RDWR) or, with create, truncates `path` with the MPI-IO
// driver on comm; a failure on any rank is raised on every rank.
hid_t open_mpio(const std::string& path, MPI_Comm comm, unsigned flags, bool create,
                const std::string& failure) {
  silence();
  Handle fapl(GM_CHECK_H5(H5Pcreate(H5P_FILE_ACCESS)));
  GM_CHECK_H5(H5Pset_fapl_mpio(fapl.get(), comm, MPI_INFO_NULL));
  const hid_t id = create ? H5Fcreate(path.c_str(), flags, H5P_DEFAULT, fapl.get())
                          : H5Fopen(path.c_str(), flags, fapl.get());
  mpi::collective_check(comm, [&] {
    if (id < 0) {
      H5Eclear2(H5E_DEFAULT);
      throw Error(failure + path);
    }
  });
  return id;
}
} // namespace

File File::open(const std::string& path, MPI_Comm comm) {
  silence();
  mpi::collective_check(comm, [&] {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
      throw Error("file not found: " + path);
    if (!S_ISREG(st.st_mode))
      throw Error("not a regular file: " + path);
    if (H5Fis_hdf5(path.c_str()) <= 0)
      throw Error("not an HDF5 file (corrupt or wrong format): " + path);
  });
  return File(path, comm,
              Handle(open_mpio(path, comm, H5F_ACC_RDONLY, false,
                               "cannot open HDF5 file (corrupt or truncated?): ")));
}

File File::create(const std::string& path, MPI_Comm comm) {
  return File(path, comm,
              Handle(open_mpio(path, comm, H5F_ACC_TRUNC, true, "cannot create HDF5 file: ")));
}

File::~File() {
  if (std::uncaught_exceptions() == 0) {
    try {
      close();
    } catch (const Error&) {
      // A destructor cannot report; close() explicitly where the outcome matters.
    }
  }
}

File File::open_rw(const std::string& path, MPI_Comm comm) {
  return File(
      path, comm,
      Handle(open_mpio(path, comm, H5F_ACC_RDWR, false, "cannot open HDF5 file for writing: ")));
}

void File::flush() const {
  GM_CHECK_H5(H5Fflush(id(), H5F_SCOPE_GLOBAL));
}

void File::close() {
  if (id_.get() < 0)
    return;
  // The MPI-IO driver closes files with degree SEMI: H5Fclose fails while any object of the file
  // is open. Close those first (Dataset handles still holding them then see an invalid id).
  const ssize_t n = H5Fget_obj_count(id(), H5F_OBJ_ALL & ~H5F_OBJ_FILE);
  if (n > 0) {
    std::vector<hid_t> ids(static_cast<size_t>(n));
    H5Fget_obj_ids(id(), H5F_OBJ_ALL & ~H5F_OBJ_FILE, ids.size(), ids.data());
    for (hid_t o : ids)
      Handle(o).reset();
  }
  const hid_t f = id_.get();
  const herr_t rc = H5Fclose(f);
  id_ = Handle();
  if (rc < 0)
    throw_h5_error(("H5Fclose(" + path_ + ")").c_str());
}

bool File::exists(const std::string& name) const {
  if (name == "/")
    return true;
  // Check each path component so that a missing parent is not an error.
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    size_t next = name.find('/', pos + 1);
    partial = name.substr(0, next);
    if (!partial.empty() && partial != "/") {
      htri_t e = H5Lexists(id(), partial.c_str(), H5P_DEFAULT);
      if (e <= 0) {
        H5Eclear2(H5E_DEFAULT);
        return false;
      }
    }
    pos = next;
  }
  return true;
}

void File::create_group(const std::string& name) const {
  Handle lcpl(GM_CHECK_H5(H5Pcreate(H5P_LINK_CREATE)));
  GM_CHECK_H5(H5Pset_create_intermediate_group(lcpl.get(), 1));
  Handle g(GM_CHECK_H5(H5Gcreate2(id(), name.c_str(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT)));
}

void File::remove(const std::string& name) const {
  GM_CHECK_H5(H5Ldelete(id(), name.c_str(), H5P_DEFAULT));
}

std::vector<std::string> File::members(const std::string& group) const {
  Handle g(H5Gopen2(id(), group.c_str(), H5P_DEFAULT));
  if (g.get() < 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error("group " + group + " not found in " + path_);
  }
  H5G_info_t info;
  GM_CHECK_H5(H5Gget_info(g.get(), &info));
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t n = GM_CHECK_H5(
        H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT));
    std::string s(static_cast<size_t>(n), '\0');
    GM_CHECK_H5(H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, s.data(), n + 1,
                                   H5P_DEFAULT));
    names.push_back(s);
  }
  std::sort(names.begin(), names.end());
  return names;
}

Dataset File::create_dataset(const std::string& name, DType type,
                             const std::vector<std::int64_t>& dims,
                             const std::vector<std::int64_t>& chunk) const {
  auto d = to_hsize(dims);
  Handle space(GM_CHECK_H5(H5Screate_simple(static_cast<int>(d.size()), d.data(), nullptr)));
  Handle dcpl(GM_CHECK_H5(H5Pcreate(H5P_DATASET_CREATE)));
  if (!chunk.empty() && product(dims) > 0) {
    auto c = to_hsize(chunk);
    for (size_t i = 0; i < c.size(); ++i)
      c[i] = std::max<hsize_t>(1, std::min(c[i], d[i]));
    GM_CHECK_H5(H5Pset_chunk(dcpl.get(), static_cast<int>(c.size()), c.data()));
  }
  // Fill values are never read (every element is written), so skip writing them (variable-length
  // strings need theirs).
  if (type != DType::string)
    GM_CHECK_H5(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER));
  Handle lcpl(GM_CHECK_H5(H5Pcreate(H5P_LINK_CREATE)));
  GM_CHECK_H5(H5Pset_create_intermediate_group(lcpl.get(), 1));
  Handle strtype;
  hid_t ftype;
  switch (type) {
  case DType::u8: ftype = H5T_STD_U8LE; break;
  case DType::i32: ftype = H5T_STD_I32LE; break;
  case DType::i64: ftype = H5T_STD_I64LE; break;
  case DType::f32: ftype = H5T_IEEE_F32LE; break;
  case DType::f64: ftype = H5T_IEEE_F64LE; break;
  default: strtype = vlen_string_type(); ftype = strtype.get();
  }
  Handle ds(GM_CHECK_H5(
      H5Dcreate2(id(), name.c_str(), ftype, space.get(), lcpl.get(), dcpl.get(), H5P_DEFAULT)));
  return Dataset(*this, name, std::move(ds));
}

Dataset File::dataset(const std::string& name) const {
  if (!exists(name))
    throw Error("dataset " + name + " missing in " + path_);
  hid_t ds = H5Dopen2(id(), name.c_str(), H5P_DEFAULT);
  if (ds < 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error(name + " in " + path_ + " is not a dataset");
  }
  return Dataset(*this, name, Handle(ds));
}

template <class T>
void File::write_small(const std::string& name, const std::vector<T>& values,
                       const std::vector<std::int64_t>& dims) const {
  GM_REQUIRE(static_cast<std::int64_t>(values.size()) == product(dims),
             "write_small: size mismatch for " + name);
  // An existing dataset of this shape is rewritten (a resumed encode redoing its last stage).
  Dataset ds = exists(name) && dataset(name).shape() == dims
                   ? dataset(name)
                   : create_dataset(name, DTypeOf<T>::value, dims);
  if (product(dims) == 0) // nothing to write (e.g. no clusters): H5Dwrite of unallocated storage
    return;               // fails; every rank has the same dims and skips alike
  const bool root = mpi::rank(comm_) == 0;
  std::vector<std::int64_t> start(dims.size(), 0), count = dims;
  if (!root)
    std::fill(count.begin(), count.end(), 0);
  ds.write(values.data(), start, count);
}

void File::write_strings(const std::string& name, const std::vector<std::string>& values) const {
  // Parallel HDF5 cannot write variable-length data, so string datasets are fixed-length,
  // null-terminated UTF-8 (h5py reads them as bytes; gradmap's readers accept both forms).
  size_t len = 1;
  for (const auto& v : values)
    len = std::max(len, v.size() + 1);
  Handle t(GM_CHECK_H5(H5Tcopy(H5T_C_S1)));
  GM_CHECK_H5(H5Tset_size(t.get(), len));
  GM_CHECK_H5(H5Tset_strpad(t.get(), H5T_STR_NULLTERM));
  GM_CHECK_H5(H5Tset_cset(t.get(), H5T_CSET_UTF8));
  const hsize_t n = values.size();
  Handle space(GM_CHECK_H5(H5Screate_simple(1, &n, nullptr)));
  Handle lcpl(GM_CHECK_H5(H5Pcreate(H5P_LINK_CREATE)));
  GM_CHECK_H5(H5Pset_create_intermediate_group(lcpl.get(), 1));
  Handle ds(GM_CHECK_H5(
      H5Dcreate2(id(), name.c_str(), t.get(), space.get(), lcpl.get(), H5P_DEFAULT, H5P_DEFAULT)));
  std::vector<char> buf(n * len, '\0');
  for (size_t i = 0; i < n; ++i)
    std::copy(values[i].begin(), values[i].end(), buf.begin() + i * len);
  Handle dxpl(GM_CHECK_H5(H5Pcreate(H5P_DATASET_XFER)));
  GM_CHECK_H5(H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE));
  const bool root = mpi::rank(comm_) == 0;
  Handle fspace(GM_CHECK_H5(H5Dget_space(ds.get())));
  hsize_t one = std::max<hsize_t>(n, 1);
  Handle mspace(GM_CHECK_H5(H5Screate_simple(1, &one, nullptr)));
  if (!root || n == 0) {
    GM_CHECK_H5(H5Sselect_none(fspace.get()));
    GM_CHECK_H5(H5Sselect_none(mspace.get()));
  }
  GM_CHECK_H5(H5Dwrite(ds.get(), t.get(), mspace.get(), fspace.get(), dxpl.get(), buf.data()));
}

Handle File::open_object(const std::string& obj) const {
  hid_t o = H5Oopen(id(), obj.c_str(), H5P_DEFAULT);
  if (o < 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Error("object " + obj + " not found in " + path_);
  }
  return Handle(o);
}

namespace {
void write_attr(hid_t obj, const std::string& name, hid_t ftype, hid_t mtype, hid_t space,
                const void* buf) {
  if (H5Aexists(obj, name.c_str()) > 0)
    GM_CHECK_H5(H5Adelete(obj, name.c_str()));
  Handle a(GM_CHECK_H5(H5Acreate2(obj, name.c_str(), ftype, space, H5P_DEFAULT, H5P_DEFAULT)));
  GM_CHECK_H5(H5Awrite(a.get(), mtype, buf));
}
Handle simple_space(hsize_t n) {
  return Handle(GM_CHECK_H5(H5Screate_simple(1, &n, nullptr)));
}
} // namespace

void File::set_attr(const std::string& obj, const std::string& name,
                    const std::string& value) const {
  Handle o = open_object(obj);
  Handle t = vlen_string_type();
  Handle space(GM_CHECK_H5(H5Screate(H5S_SCALAR)));
  const char* p = value.c_str();
  write_attr(o.get(), name, t.get(), t.get(), space.get(), &p);
}
void File::set_attr(const std::string& obj, const std::string& name, std::int64_t value) const {
  Handle o = open_object(obj);
  Handle space(GM_CHECK_H5(H5Screate(H5S_SCALAR)));
  write_attr(o.get(), name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.get(), &value);
}
void File::set_attr(const std::string& obj, const std::string& name,
                    const std::vector<double>& value) const {
  Handle o = open_object(obj);
  Handle space = simple_space(value.size());
  write_attr(o.get(), name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space.get(), value.data());
}
void File::set_attr(const std::string& obj, const std::string& name,
                    const std::vector<std::int64_t>& value) const {
  Handle o = open_object(obj);
  Handle space = simple_space(value.size());
  write_attr(o.get(), name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.get(), value.data());
}
void File::set_attr(const std::string& obj, const std::string& name,
                    const std::vector<std::string>& value) const {
  Handle o = open_object(obj);
  Handle t = vlen_string_type();
  Handle space = simple_space(value.size());
  std::vector<const char*> ptrs;
  for (const auto& s : value)
    ptrs.push_back(s.c_str());
  write_attr(o.get(), name, t.get(), t.get(), space.get(), ptrs.data());
}

bool File::has_attr(const std::string& obj, const std::string& name) const {
  if (!exists(obj))
    return false;
  Handle o = open_object(obj);
  htri_t e = H5Aexists(o.get(), name.c_str());
  if (e < 0)
    H5Eclear2(H5E_DEFAULT);
  return e > 0;
}

Handle File::open_attr(const std::string& obj, const std::string& name) const {
  if (!has_attr(obj, name))
    throw Error("attribute '" + name + "' missing on " + obj + " in " + path_);
  Handle o = open_object(obj);
  return Handle(GM_CHECK_H5(H5Aopen(o.get(), name.c_str(), H5P_DEFAULT)));
}

namespace {
hssize_t attr_npoints(hid_t a) {
  Handle space(GM_CHECK_H5(H5Aget_space(a)));
  return GM_CHECK_H5(H5Sget_simple_extent_npoints(space.get()));
}
} // namespace

std::vector<std::string> File::attr_strings(const std::string& obj, const std::string& name) const {
  Handle a = open_attr(obj, name);
  Handle ft(GM_CHECK_H5(H5Aget_type(a.get())));
  if (H5Tget_class(ft.get()) != H5T_STRING)
    throw Error("attribute '" + name + "' on " + obj + " in " + path_ + " is not a string");
  const auto n = static_cast<size_t>(attr_npoints(a.get()));
  std::vector<std::string> out;
  if (H5Tis_variable_str(ft.get()) > 0) {
    Handle t = vlen_string_type();
    std::vector<char*> ptrs(n, nullptr);
    GM_CHECK_H5(H5Aread(a.get(), t.get(), ptrs.data()));
    for (char* p : ptrs)
      out.emplace_back(p ? p : "");
    Handle space(GM_CHECK_H5(H5Aget_space(a.get())));
    H5Dvlen_reclaim(t.get(), space.get(), H5P_DEFAULT, ptrs.data());
  } else {
    const size_t len = H5Tget_size(ft.get());
    std::vector<char> buf(n * len + 1, '\0');
    GM_CHECK_H5(H5Aread(a.get(), ft.get(), buf.data()));
    for (size_t i = 0; i < n; ++i) {
      std::string s(buf.data() + i * len, len);
      s.erase(std::find(s.begin(), s.end(), '\0'), s.end());
      out.push_back(s);
    }
  }
  return out;
}

std::string File::attr_string(const std::string& obj, const std::string& name) const {
  auto v = attr_strings(obj, name);
  if (v.size() != 1)
    throw Error("attribute '" + name + "' on " + obj + " in " + path_ + " is not a single string");
  return v[0];
}

std::vector<double> File::attr_doubles(const std::string& obj, const std::string& name) const {
  Handle a = open_attr(obj, name);
  Handle ft(GM_CHECK_H5(H5Aget_type(a.get())));
  const auto cls = H5Tget_class(ft.get());
  if (cls != H5T_FLOAT && cls != H5T_INTEGER)
    throw Error("attribute '" + name + "' on " + obj + " in " + path_ + " is not numeric");
  std::vector<double> v(static_cast<size_t>(attr_npoints(a.get())));
  GM_CHECK_H5(H5Aread(a.get(), H5T_NATIVE_DOUBLE, v.data()));
  return v;
}

std::vector<std::int64_t> File::attr_ints(const std::string& obj, const std::string& name) const {
  Handle a = open_attr(obj, name);
  Handle ft(GM_CHECK_H5(H5Aget_type(a.get())));
  if (H5Tget_class(ft.get()) != H5T_INTEGER)
    throw Error("attribute '" + name + "' on " + obj + " in " + path_ + " is not an integer");
  std::vector<std::int64_t> v(static_cast<size_t>(attr_npoints(a.get())));
  GM_CHECK_H5(H5Aread(a.get(), H5T_NATIVE_INT64, v.data()));
  return v;
}

std::int64_t File::attr_int(const std::string& obj, const std::string& name) const {
  auto v = attr_ints(obj, name);
  if (v.size() != 1)
    throw Error("attribute '" + name + "' on " + obj + " in " + path_ + " is not a scalar");
  return v[0];
}

// -------------------------------------------------------------------------------- Dataset

Dataset::Dataset(const File& file, std::string name, Handle id)
    : file_(&file), name_(std::move(name)), id_(std::move(id)) {}

std::string Dataset::where() const {
  return name_ + " in " + file_->path();
}

std::vector<std::int64_t> Dataset::shape() const {
  Handle space(GM_CHECK_H5(H5Dget_space(id())));
  const int nd = GM_CHECK_H5(H5Sget_simple_extent_ndims(space.get()));
  std::vector<hsize_t> d(static_cast<size_t>(nd));
  GM_CHECK_H5(H5Sget_simple_extent_dims(space.get(), d.data(), nullptr));
  return std::vector<std::int64_t>(d.begin(), d.end());
}

DType Dataset::dtype() const {
  Handle t(GM_CHECK_H5(H5Dget_type(id())));
  const auto cls = H5Tget_class(t.get());
  const size_t sz = H5Tget_size(t.get());
  if (cls == H5T_STRING)
    return DType::string;
  if (cls == H5T_FLOAT && sz == 4)
    return DType::f32;
  if (cls == H5T_FLOAT && sz == 8)
    return DType::f64;
  if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(t.get()) == H5T_SGN_2;
    if (!is_signed && sz == 1)
      return DType::u8;
    if (is_signed && sz == 4)
      return DType::i32;
    if (is_signed && sz == 8)
      return DType::i64;
  }
  throw Error("unsupported element type (class " + std::to_string(int(cls)) + ", " +
              std::to_string(sz) + " bytes) for " + where());
}

std::vector<std::int64_t> Dataset::large_chunks(std::size_t elem_size,
                                                std::int64_t min_bytes) const {
  Handle dcpl(GM_CHECK_H5(H5Dget_create_plist(id())));
  if (H5Pget_layout(dcpl.get()) != H5D_CHUNKED)
    return {};
  const int rank = GM_CHECK_H5(H5Pget_chunk(dcpl.get(), 0, nullptr));
  std::vector<hsize_t> c(static_cast<size_t>(std::max(rank, 1)), 1);
  GM_CHECK_H5(H5Pget_chunk(dcpl.get(), rank, c.data()));
  std::vector<std::int64_t> chunk(c.begin(), c.begin() + rank);
  // Above 1 GiB a tile could exceed an int count in MPI-IO: such chunks take the piecewise path.
  const std::int64_t bytes = product(chunk) * std::int64_t(elem_size);
  if (bytes < min_bytes || bytes > (std::int64_t(1) << 30))
    return {};
  return chunk;
}

void Dataset::read_by_chunks(hid_t memtype, void* buf, std::size_t elem_size,
                             const std::vector<std::int64_t>& start,
                             const std::vector<std::int64_t>& count,
                             const std::vector<std::int64_t>& chunk) const {
  const size_t nd = count.size();
  // This rank's tiles: the selection cut at the chunk grid (tile t spans [lo, lo + c)).
  std::vector<std::vector<hsize_t>> tiles_lo, tiles_c;
  if (product(count) > 0) {
    std::vector<std::int64_t> lo(start);
    auto tile_end = [&](size_t d) {
      return std::min(start[d] + count[d], (lo[d] / chunk[d] + 1) * chunk[d]);
    };
    while (true) {
      std::vector<hsize_t> l(nd), c(nd);
      for (size_t d = 0; d < nd; ++d) {
        l[d] = hsize_t(lo[d]);
        c[d] = hsize_t(tile_end(d) - lo[d]);
      }
      tiles_lo.push_back(l);
      tiles_c.push_back(c);
      size_t d = nd; // next tile: the last dimension first
      while (d-- > 0) {
        lo[d] = tile_end(d);
        if (lo[d] < start[d] + count[d])
          break;
        lo[d] = start[d];
      }
      if (d == size_t(-1))
        break;
    }
  }
  // Collective: every rank makes the same number of H5Dread calls (empty ones past its tiles).
  std::int64_t calls = std::int64_t(tiles_lo.size());
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &calls, 1, MPI_INT64_T, MPI_MAX, file_->comm()));
  std::vector<std::int64_t> stride(nd, 1); // of the destination (row-major count)
  for (size_t d = nd - 1; d > 0; --d)
    stride[d - 1] = stride[d] * count[d];
  Handle fspace(GM_CHECK_H5(H5Dget_space(id())));
  Handle dxpl(GM_CHECK_H5(H5Pcreate(H5P_DATASET_XFER)));
  GM_CHECK_H5(H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE));
  std::vector<char> tile;
  for (std::int64_t i = 0; i < calls; ++i) {
    const bool mine = i < std::int64_t(tiles_lo.size());
    Handle mspace;
    std::int64_t n = 0;
    if (mine) {
      const auto& l = tiles_lo[size_t(i)];
      const auto& c = tiles_c[size_t(i)];
      n = product(std::vector<std::int64_t>(c.begin(), c.end()));
      tile.resize(size_t(n) * elem_size);
      GM_CHECK_H5(
          H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, l.data(), nullptr, c.data(), nullptr));
      mspace = Handle(GM_CHECK_H5(H5Screate_simple(int(nd), c.data(), nullptr)));
    } else {
      GM_CHECK_H5(H5Sselect_none(fspace.get()));
      hsize_t one = 1;
      mspace = Handle(GM_CHECK_H5(H5Screate_simple(1, &one, nullptr)));
      GM_CHECK_H5(H5Sselect_none(mspace.get()));
    }
    if (H5Dread(id(), memtype, mspace.get(), fspace.get(), dxpl.get(),
                mine ? static_cast<void*>(tile.data()) : buf) < 0) {
      try {
        throw_h5_error("H5Dread");
      } catch (Error& e) {
        e.context("while reading " + where());
        throw;
      }
    }
    if (!mine)
      continue;
    // Scatter the tile's rows (runs along the last dimension) into buf.
    const auto& l = tiles_lo[size_t(i)];
    const auto& c = tiles_c[size_t(i)];
    const std::int64_t run = std::int64_t(c[nd - 1]);
    std::vector<std::int64_t> idx(nd, 0); // position inside the tile (last dim fixed at 0)
    for (std::int64_t k = 0; k < n / run; ++k) {
      std::int64_t off = 0;
      for (size_t d = 0; d < nd; ++d)
        off += (std::int64_t(l[d]) + idx[d] - start[d]) * stride[d];
      std::memcpy(static_cast<char*>(buf) + off * std::int64_t(elem_size),
                  tile.data() + k * run * std::int64_t(elem_size), size_t(run) * elem_size);
      for (size_t d = nd - 1; d-- > 0;) {
        if (++idx[d] < std::int64_t(c[d]))
          break;
        idx[d] = 0;
      }
    }
  }
}

void Dataset::transfer(bool write, hid_t memtype, void* buf, std::size_t elem_size,
                       const std::vector<std::int64_t>& start,
                       const std::vector<std::int64_t>& count) const {
  const auto dims = shape();
  GM_REQUIRE(start.size() == dims.size() && count.size() == dims.size(),
             "hyperslab rank mismatch for " + where());
  for (size_t i = 0; i < dims.size(); ++i)
    GM_REQUIRE(start[i] >= 0 && count[i] >= 0 && start[i] + count[i] <= dims[i],
               "hyperslab out of range for " + where());
  // Chunks above the 1 MiB chunk cache: read chunk by chunk (decided by the dataset alone, so
  // every rank takes the same branch).
  if (!write && !dims.empty()) {
    const auto chunk = large_chunks(elem_size, std::int64_t(1) << 20);
    if (!chunk.empty()) {
      read_by_chunks(memtype, buf, elem_size, start, count, chunk);
      return;
    }
  }
  // Cut along the first dimension into pieces of at most ~1 GiB; every rank must make the same
  // number of collective calls, so the piece count is agreed over the communicator.
  std::int64_t row_elems = 1;
  for (size_t i = 1; i < count.size(); ++i)
    row_elems *= count[i];
  const std::int64_t row_bytes = std::max<std::int64_t>(1, row_elems * std::int64_t(elem_size));
  const std::int64_t rows_per_piece =
      std::max<std::int64_t>(1, (std::int64_t(1) << 30) / row_bytes);
  const std::int64_t rows = dims.empty() ? 1 : count[0];
  const bool empty = product(count) == 0;
  std::int64_t pieces = empty ? 0 : (rows + rows_per_piece - 1) / rows_per_piece;
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, &pieces, 1, MPI_INT64_T, MPI_MAX, file_->comm()));
  pieces = std::max<std::int64_t>(pieces, 1);

  Handle fspace(GM_CHECK_H5(H5Dget_space(id())));
  Handle dxpl(GM_CHECK_H5(H5Pcreate(H5P_DATASET_XFER)));
  GM_CHECK_H5(H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE));
  for (std::int64_t p = 0; p < pieces; ++p) {
    std::vector<hsize_t> s = to_hsize(start), c = to_hsize(count);
    std::int64_t r0 = 0, r1 = 0;
    if (!empty && !dims.empty()) {
      r0 = std::min(rows, p * rows_per_piece);
      r1 = std::min(rows, r0 + rows_per_piece);
      s[0] = hsize_t(start[0] + r0);
      c[0] = hsize_t(r1 - r0);
    }
    const hsize_t n = hsize_t(product(std::vector<std::int64_t>(c.begin(), c.end())));
    Handle mspace;
    if (n == 0 || empty) {
      GM_CHECK_H5(H5Sselect_none(fspace.get()));
      hsize_t one = 1;
      mspace = Handle(GM_CHECK_H5(H5Screate_simple(1, &one, nullptr)));
      GM_CHECK_H5(H5Sselect_none(mspace.get()));
    } else {
      if (dims.empty())
        GM_CHECK_H5(H5Sselect_all(fspace.get()));
      else
        GM_CHECK_H5(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, s.data(), nullptr, c.data(),
                                        nullptr));
      mspace = Handle(GM_CHECK_H5(H5Screate_simple(1, &n, nullptr)));
    }
    char* ptr = static_cast<char*>(buf) + (empty ? 0 : r0 * row_elems * std::int64_t(elem_size));
    herr_t rc = write ? H5Dwrite(id(), memtype, mspace.get(), fspace.get(), dxpl.get(), ptr)
                      : H5Dread(id(), memtype, mspace.get(), fspace.get(), dxpl.get(), ptr);
    if (rc < 0) {
      try {
        throw_h5_error(write ? "H5Dwrite" : "H5Dread");
      } catch (Error& e) {
        e.context(std::string("while ") + (write ? "writing " : "reading ") + where());
        throw;
      }
    }
  }
}

template <class T>
std::vector<T> Dataset::read(const std::vector<std::int64_t>& start,
                             const std::vector<std::int64_t>& count) const {
  std::vector<T> out(static_cast<size_t>(product(count)));
  transfer(false, memtype_of(DTypeOf<T>::value), out.data(), sizeof(T), start, count);
  return out;
}

template <class T> std::vector<T> Dataset::read_all() const {
  const auto dims = shape();
  if (product(dims) == 0) // no storage is allocated: H5Dread would fail ("addr overflow");
    return {};            // every rank sees the same shape, so all skip the collective alike
  return read<T>(std::vector<std::int64_t>(dims.size(), 0), dims);
}

template <class T> std::vector<T> Dataset::read_rows(std::int64_t begin, std::int64_t end) const {
  auto dims = shape();
  GM_REQUIRE(!dims.empty(), "read_rows on a scalar dataset " + where());
  std::vector<std::int64_t> start(dims.size(), 0);
  start[0] = begin;
  dims[0] = end - begin;
  return read<T>(start, dims);
}

template <class T>
void Dataset::write(const T* data, const std::vector<std::int64_t>& start,
                    const std::vector<std::int64_t>& count) const {
  transfer(true, memtype_of(DTypeOf<T>::value), const_cast<T*>(data), sizeof(T), start, count);
}

template <class T> void Dataset::write_rows(const std::vector<T>& data, std::int64_t begin) const {
  auto dims = shape();
  std::int64_t row = 1;
  for (size_t i = 1; i < dims.size(); ++i)
    row *= dims[i];
  GM_REQUIRE(row > 0 || data.empty(), "write_rows: empty rows in " + where());
  std::vector<std::int64_t> start(dims.size(), 0);
  start[0] = begin;
  dims[0] = row > 0 ? static_cast<std::int64_t>(data.size()) / row : 0;
  GM_REQUIRE(dims[0] * row == static_cast<std::int64_t>(data.size()),
             "write_rows: buffer is not a whole number of rows for " + where());
  write(data.data(), start, dims);
}

std::vector<std::string> Dataset::read_strings() const {
  if (dtype() != DType::string)
    throw Error(where() + " is not a string dataset");
  const auto dims = shape();
  const size_t n = dims.empty() ? 1 : static_cast<size_t>(dims[0]);
  Handle ft(GM_CHECK_H5(H5Dget_type(id())));
  std::vector<std::string> out;
  if (H5Tis_variable_str(ft.get()) > 0) {
    Handle t = vlen_string_type();
    std::vector<char*> ptrs(n, nullptr);
    if (n)
      GM_CHECK_H5(H5Dread(id(), t.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()));
    for (char* p : ptrs)
      out.emplace_back(p ? p : "");
    Handle space(GM_CHECK_H5(H5Dget_space(id())));
    if (n)
      H5Dvlen_reclaim(t.get(), space.get(), H5P_DEFAULT, ptrs.data());
  } else {
    const size_t len = H5Tget_size(ft.get());
    std::vector<char> buf(n * len + 1, '\0');
    if (n)
      GM_CHECK_H5(H5Dread(id(), ft.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()));
    for (size_t i = 0; i < n; ++i) {
      std::string s(buf.data() + i * len, len);
      s.erase(std::find(s.begin(), s.end(), '\0'), s.end());
      out.push_back(s);
    }
  }
  return out;
}

#define GM_INSTANTIATE(T)                                                                          \
  template std::vector<T> Dataset::read<T>(const std::vector<std::int64_t>&,                       \
                                           const std::vector<std::int64_t>&) const;                \
  template std::vector<T> Dataset::read_all<T>() const;                                            \
  template std::vector<T> Dataset::read_rows<T>(std::int64_t, std::int64_t) const;                 \
  template void Dataset::write<T>(const T*, const std::vector<std::int64_t>&,                      \
                                  const std::vector<std::int64_t>&) const;                         \
  template void Dataset::write_rows<T>(const std::vector<T>&, std::int64_t) const;                 \
  template void File::write_small<T>(const std::string&, const std::vector<T>&,                    \
                                     const std::vector<std::int64_t>&) const;
GM_INSTANTIATE(std::uint8_t)
GM_INSTANTIATE(std::int32_t)
GM_INSTANTIATE(std::int64_t)
GM_INSTANTIATE(float)
GM_INSTANTIATE(double)
#undef GM_INSTANTIATE

// ---------------------------------------------------------------------------- OutputFile

void make_directories(const std::string& dir) {
  if (dir.empty())
    return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    throw Error("cannot create directory " + dir + ": " + ec.message());
}

OutputFile::OutputFile(const std::string& path, MPI_Comm comm)
    : path_(path), file_([&] {
        mpi::collective_check(comm, [&] {
          if (mpi::rank(comm) == 0) {
            make_directories(std::filesystem::path(path).parent_path().string());
            std::remove(path.c_str()); // never leave a stale complete-looking output behind
          }
        });
        return File::create(partial_name(path), comm);
      }()) {}

OutputFile OutputFile::resume(const std::string& path, MPI_Comm comm) {
  return OutputFile(path, File::open_rw(partial_name(path), comm));
}

bool OutputFile::has_partial(const std::string& path) {
  return std::filesystem::exists(partial_name(path));
}

void OutputFile::commit() {
  file_.close();
  MPI_Comm comm = file_.comm();
  mpi::collective_check(comm, [&] {
    if (mpi::rank(comm) == 0 && std::rename(partial_name(path_).c_str(), path_.c_str()) != 0)
      throw Error("cannot rename " + partial_name(path_) + " to " + path_ + ": " +
                  std::strerror(errno));
  });
}

} // namespace gradmap::io
