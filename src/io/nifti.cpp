// NIfTI-1 reader: see nifti.hpp. Header layout: NIfTI-1 standard (nifti1.h, 2004).
#include "gradmap/io/nifti.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "gradmap/core/error.hpp"

namespace gradmap::io {

std::int64_t NiftiHeader::volume_size() const {
  std::int64_t n = 1;
  for (size_t i = 0; i < 3; ++i)
    n *= i < dims.size() ? dims[i] : 1;
  return n;
}
std::int64_t NiftiHeader::volumes() const {
  std::int64_t n = 1;
  for (size_t i = 3; i < dims.size(); ++i)
    n *= dims[i];
  return n;
}

struct NiftiReader::Impl {
  gzFile gz = nullptr;
  ~Impl() {
    if (gz)
      gzclose(gz);
  }
};

namespace {

std::size_t dtype_size(int t) {
  switch (t) {
  case 2:
  case 256: return 1; // uint8, int8
  case 4:
  case 512: return 2; // int16, uint16
  case 8:
  case 16:
  case 768: return 4; // int32, float32, uint32
  case 64:
  case 1024:
  case 1280: return 8; // float64, int64, uint64
  default: return 0;
  }
}

template <class T> T load(const unsigned char* p, bool swap) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if (swap) {
    auto* b = reinterpret_cast<unsigned char*>(&v);
    std::reverse(b, b + sizeof v);
  }
  return v;
}

double convert(const unsigned char* p, int t, bool swap) {
  switch (t) {
  case 2: return double(*p);
  case 256: return double(static_cast<std::int8_t>(*p));
  case 4: return double(load<std::int16_t>(p, swap));
  case 512: return double(load<std::uint16_t>(p, swap));
  case 8: return double(load<std::int32_t>(p, swap));
  case 768: return double(load<std::uint32_t>(p, swap));
  case 16: return double(load<float>(p, swap));
  case 64: return load<double>(p, swap);
  case 1024: return double(load<std::int64_t>(p, swap));
  default: return double(load<std::uint64_t>(p, swap));
  }
}

std::vector<double> best_affine(const unsigned char* h, bool sw, const NiftiHeader& hd) {
  auto f32 = [&](size_t off) { return double(load<float>(h + off, sw)); };
  const int qcode = load<std::int16_t>(h + 252, sw), scode = load<std::int16_t>(h + 254, sw);
  std::vector<double> a(16, 0.0);
  a[15] = 1;
  if (scode > 0) {
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 4; ++c)
        a[size_t(r * 4 + c)] = f32(280 + size_t(16 * r + 4 * c));
    return a;
  }
  const double px = f32(80), py = f32(84), pz = f32(88);
  if (qcode > 0) {
    const double b = f32(256), c = f32(260), d = f32(264);
    double qfac = f32(76);
    qfac = qfac < 0 ? -1.0 : 1.0;
    const double w2 = 1.0 - (b * b + c * c + d * d);
    const double w = w2 < 0 ? 0.0 : std::sqrt(w2);
    const double R[3][3] = {
        {w * w + b * b - c * c - d * d, 2 * (b * c - w * d), 2 * (b * d + w * c)},
        {2 * (b * c + w * d), w * w + c * c - b * b - d * d, 2 * (c * d - w * b)},
        {2 * (b * d - w * c), 2 * (c * d + w * b), w * w + d * d - b * b - c * c}};
    const double z[3] = {px, py, pz * qfac};
    for (int r = 0; r < 3; ++r) {
      for (int k = 0; k < 3; ++k)
        a[size_t(r * 4 + k)] = R[r][k] * z[k];
      a[size_t(r * 4 + 3)] = f32(268 + size_t(4 * r));
    }
    return a;
  }
  // nibabel's base affine: x flipped, origin at the volume centre.
  const double z[3] = {-px, py, pz};
  for (int k = 0; k < 3; ++k) {
    const double n = k < int(hd.dims.size()) ? double(hd.dims[size_t(k)]) : 1.0;
    a[size_t(k * 4 + k)] = z[k];
    a[size_t(k * 4 + 3)] = -(n - 1) / 2.0 * z[k];
  }
  return a;
}

} // namespace

NiftiReader::NiftiReader(const std::string& path) : path_(path), impl_(new Impl) {
  impl_->gz = gzopen(path.c_str(), "rb");
  if (!impl_->gz)
    throw Error(path + ": cannot open (missing or unreadable)");
  gzbuffer(impl_->gz, 1 << 20);
  unsigned char h[348];
  if (gzread(impl_->gz, h, 348) != 348)
    throw Error(path + ": not a NIfTI-1 file (shorter than its 348-byte header)");
  std::int32_t sz;
  std::memcpy(&sz, h, 4);
  if (sz == 348)
    h_.swapped = false;
  else if (load<std::int32_t>(h, true) == 348)
    h_.swapped = true;
  else if (sz == 540 || load<std::int32_t>(h, true) == 540)
    throw Error(path + ": a NIfTI-2 file; gradmap reads NIfTI-1 (nibabel.Nifti1Image)");
  else
    throw Error(path + ": not a NIfTI-1 file (sizeof_hdr is not 348)");
  const bool sw = h_.swapped;
  if (std::memcmp(h + 344, "n+1", 4) != 0)
    throw Error(path + ": not a single-file NIfTI-1 image (magic is not 'n+1')");
  const int ndim = load<std::int16_t>(h + 40, sw);
  if (ndim < 1 || ndim > 7)
    throw Error(path + ": bad NIfTI dim[0] = " + std::to_string(ndim));
  for (int i = 1; i <= ndim; ++i) {
    const std::int64_t d = load<std::int16_t>(h + 40 + 2 * i, sw);
    if (d < 1)
      throw Error(path + ": bad NIfTI dim[" + std::to_string(i) + "] = " + std::to_string(d));
    h_.dims.push_back(d);
  }
  h_.datatype = load<std::int16_t>(h + 70, sw);
  if (dtype_size(h_.datatype) == 0)
    throw Error(path + ": NIfTI datatype " + std::to_string(h_.datatype) +
                " is not supported (integers, float32, float64)");
  h_.vox_offset = std::int64_t(load<float>(h + 108, sw));
  if (h_.vox_offset < 348)
    throw Error(path + ": bad vox_offset " + std::to_string(h_.vox_offset));
  const double slope = load<float>(h + 112, sw), inter = load<float>(h + 116, sw);
  if (std::isfinite(slope) && slope != 0.0) {
    h_.slope = slope;
    h_.inter = std::isfinite(inter) ? inter : 0.0;
  } else {
    h_.slope = 1.0;
    h_.inter = 0.0;
  }
  h_.affine = best_affine(h, sw, h_);
  if (gzseek(impl_->gz, z_off_t(h_.vox_offset), SEEK_SET) < 0)
    throw Error(path + ": truncated before its data (vox_offset " + std::to_string(h_.vox_offset) +
                ")");
}

NiftiReader::~NiftiReader() = default;

void NiftiReader::read_volume(std::vector<double>& out) {
  if (next_ >= h_.volumes())
    throw Error(path_ + ": read past the last of its " + std::to_string(h_.volumes()) + " volumes");
  const std::size_t es = dtype_size(h_.datatype), n = std::size_t(h_.volume_size());
  std::vector<unsigned char> raw(n * es);
  std::size_t got = 0;
  while (got < raw.size()) {
    const unsigned chunk = unsigned(std::min<std::size_t>(raw.size() - got, 1u << 30));
    const int k = gzread(impl_->gz, raw.data() + got, chunk);
    if (k <= 0) {
      int err = 0;
      const char* msg = gzerror(impl_->gz, &err);
      throw Error(path_ + ": truncated or corrupt at volume " + std::to_string(next_) + " of " +
                  std::to_string(h_.volumes()) +
                  (err != Z_OK && msg ? std::string(" (") + msg + ")" : ""));
    }
    got += std::size_t(k);
  }
  out.resize(n);
  for (std::size_t i = 0; i < n; ++i)
    out[i] = convert(raw.data() + i * es, h_.datatype, h_.swapped) * h_.slope + h_.inter;
  ++next_;
}

std::vector<double> read_nifti_volume(const std::string& path, NiftiHeader* header) {
  NiftiReader r(path);
  if (r.header().volumes() != 1)
    throw Error(path + ": expected a 3-D volume, found " + std::to_string(r.header().volumes()) +
                " volumes");
  std::vector<double> v;
  r.read_volume(v);
  if (header)
    *header = r.header();
  return v;
}

} // namespace gradmap::io
