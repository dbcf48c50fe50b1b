// The training sides of gradmap encode (training_sides.hpp).
#include "training_sides.hpp"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <memory>

#include "gradmap/core/error.hpp"
#include "gradmap/core/log.hpp"
#include "gradmap/core/mpi_check.hpp"
#include "gradmap/core/progress.hpp"
#include "gradmap/mpi/comm.hpp"

namespace gradmap::encoding {

namespace {

// Broadcasts integers from root.
void broadcast_ints(std::initializer_list<std::int64_t*> v, int root, MPI_Comm comm) {
  std::vector<std::int64_t> buf;
  for (auto* x : v)
    buf.push_back(*x);
  GM_CHECK_MPI(MPI_Bcast(buf.data(), int(buf.size()), MPI_INT64_T, root, comm));
  size_t i = 0;
  for (auto* x : v)
    *x = buf[i++];
}

// Broadcasts arrays from root, each resized to its size first, in pieces under 2^27 doubles.
void broadcast_arrays(std::initializer_list<std::pair<std::vector<double>*, std::int64_t>> arrays,
                      int root, MPI_Comm comm) {
  constexpr size_t piece = size_t(1) << 27;
  for (const auto& [v, size] : arrays) {
    v->resize(static_cast<size_t>(size));
    for (size_t o = 0; o < v->size(); o += piece)
      GM_CHECK_MPI(
          MPI_Bcast(v->data() + o, int(std::min(piece, v->size() - o)), MPI_DOUBLE, root, comm));
  }
}

// Broadcasts a basis from root.
void broadcast_basis(RidgeBasis& b, int root, MPI_Comm comm) {
  broadcast_ints({&b.n, &b.p, &b.r, &b.m}, root, comm);
  broadcast_arrays({{&b.u, b.n * b.r}, {&b.s, b.r}, {&b.test_v, b.m * b.r}}, root, comm);
  b.u32.assign(b.u.begin(), b.u.end());
}

// Broadcasts the all-rows part of a Gram basis from root (b.p known everywhere).
void broadcast_gram_full(GramBasis& b, int root, MPI_Comm comm) {
  broadcast_ints({&b.r, &b.m}, root, comm);
  broadcast_arrays({{&b.v, b.p * b.r}, {&b.s2, b.r}, {&b.test_v, b.m * b.r}}, root, comm);
}

// Broadcasts a Gram fold from root (p known everywhere).
void broadcast_gram_fold(GramFold& f, std::int64_t p, int root, MPI_Comm comm) {
  broadcast_ints({&f.begin, &f.end, &f.r}, root, comm);
  broadcast_arrays(
      {{&f.v, p * f.r}, {&f.s2, f.r}, {&f.mu, p}, {&f.sx, p}, {&f.vd, f.r}, {&f.tri, f.r * f.r}},
      root, comm);
  f.v32.assign(f.v.begin(), f.v.end());
  f.tri32.assign(f.tri.begin(), f.tri.end());
}

} // namespace

JobQueue::JobQueue(MPI_Comm comm) : comm_(comm), me_(mpi::rank(comm)), size_(mpi::size(comm)) {}

void JobQueue::add(bool distribute, std::function<void()> run, std::function<void(int)> share) {
  if (!distribute) {
    run();
    return;
  }
  // This rank's jobs run at once and the others' are dropped: either way the job's inputs are
  // freed here, so a batch of sides never holds all its inputs at the same time.
  const int owner = int(count_++ % size_);
  if (owner == me_)
    run();
  jobs_.push_back({owner, std::move(share)});
}

void JobQueue::run_all() {
  for (auto& j : jobs_)
    j.share(j.owner);
  jobs_.clear();
}

TrainingSides::TrainingSides(const EncodeOptions& opt, const io::File& features,
                             const io::FeaturesInfo& fi, const ImageSplit& split, const Layout& lay,
                             const std::vector<double>& joint_weights, bool cache, MPI_Comm comm)
    : opt_(opt), ff_(features), fi_(fi), split_(split), lay_(lay), cache_(cache), comm_(comm),
      n_(split.n()), m_(split.m()), nf_(opt.alpha_cv == AlphaCV::kfold ? opt.folds : 0),
      jw_(joint_weights), jobs_(comm), joint_built_(static_cast<size_t>(lay.L + 1), 0) {
  const std::int64_t K = lay.K, L = lay.L;
  if (lay.joint) {
    read_activation_block();
    std::int64_t width = lay.pa_all; // columns of a_tr / a_te so far
    if (lay.reduce_a) {
      reduce_activation_block();
      width = lay.pa_layers;
    }
    if (lay.nuisance)
      append_nuisance(width);
  }
  if (!cache)
    return;
  cached_.resize(size_t(K * L) + (lay.joint ? size_t((L + 1) * (1 + L * lay.W)) : 0));
  // Each rank builds every p-th side; with fewer primal decompositions than ranks, each one is
  // split over all ranks instead (make_basis_gram).
  collective_ = (K * L + (lay.joint ? L + 1 : 0)) * (nf_ + 1) < mpi::size(comm);
  Progress progress("encode", K * L + (lay.joint ? L + 1 : 0), "training bases");
  for (std::int64_t k = 0; k < K; ++k)
    for (std::int64_t l = 0; l < L; ++l) {
      build_kind(k, l, true, cached_[size_t(k * L + l)]);
      progress.advance();
    }
  if (lay.joint) // the joint designs of R_k are built when a target first chooses R_k
    for (std::int64_t k = 0; k <= L; ++k) {
      build_ref(k, true, cached_[size_t(K * L + k)]);
      progress.advance();
    }
  jobs_.run_all();
  collective_ = false;
  progress.finish();
  for (auto& side : cached_)
    finish(side);
}

std::int64_t TrainingSides::read_std(std::int64_t k, std::int64_t l, std::vector<double>& xtr,
                                     std::vector<double>& xte) const {
  auto ds = ff_.dataset("/features/" + fi_.kinds[k] + "/" + fi_.layers[l]);
  const std::int64_t dim = ds.shape()[1];
  const auto x = ds.read_all<float>();
  if (standardise(x, dim, split_.rows, split_.test, xtr, xte) == dim)
    GM_WARN("encode: every feature of " << fi_.kinds[k] << "/" << fi_.layers[l]
                                        << " is constant over the training images: its "
                                        << "predictions are constant and its scores NaN");
  return dim;
}

// The activation block A: every layer's standardised activations, layer l's columns scaled by
// 1 / sqrt(parts p_l) (read by every rank).
void TrainingSides::read_activation_block() {
  const std::int64_t n = n_, m = m_, pa_all = lay_.pa_all;
  a_tr_.assign(static_cast<size_t>(n * pa_all), 0.0);
  a_te_.assign(static_cast<size_t>(m * pa_all), 0.0);
  std::int64_t off = 0;
  for (std::int64_t l = 0; l < lay_.L; ++l) {
    std::vector<double> xtr, xte;
    const std::int64_t d = read_std(lay_.ka, l, xtr, xte);
    const double sc = 1.0 / std::sqrt(double(lay_.parts) * double(d));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < d; ++j)
        a_tr_[i * pa_all + off + j] = sc * xtr[i * d + j];
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < d; ++j)
        a_te_[i * pa_all + off + j] = sc * xte[i * d + j];
    off += d;
  }
}

// A's scores on its first principal axes (make_basis_gram over all ranks), rescaled to total
// variance L / parts.
void TrainingSides::reduce_activation_block() {
  const std::int64_t n = n_, m = m_, L = lay_.L, pa_layers = lay_.pa_layers;
  const RidgeBasis pb = make_basis_gram(a_tr_, n, lay_.pa_all, a_te_, m, comm_);
  const std::int64_t kk = std::min(pa_layers, pb.r);
  double var = 0;
  for (std::int64_t j = 0; j < kk; ++j)
    var += pb.s[j] * pb.s[j] / double(n);
  const double sc = var > 0 ? std::sqrt(double(L) / double(lay_.parts) / var) : 0.0;
  a_tr_.assign(static_cast<size_t>(n * pa_layers), 0.0);
  a_te_.assign(static_cast<size_t>(m * pa_layers), 0.0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < kk; ++j)
      a_tr_[i * pa_layers + j] = sc * pb.u[i * pb.r + j] * pb.s[j];
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < kk; ++j)
      a_te_[i * pa_layers + j] = sc * pb.test_v[i * pb.r + j];
}

// The nuisance block [loss, ||g_1||, ..., ||g_L||], z-scored, scaled by 1 / sqrt(parts nq),
// appended to A (whose rows have `width` columns so far).
void TrainingSides::append_nuisance(std::int64_t width) {
  const std::int64_t L = lay_.L, nq = lay_.nq, pa = lay_.pa, N = fi_.n;
  const auto loss = ff_.dataset("/nuisance/loss").read_all<float>();
  const auto gn = ff_.dataset("/nuisance/grad_norm").read_all<float>();
  if (std::int64_t(loss.size()) != N || std::int64_t(gn.size()) != N * L)
    throw UsageError(opt_.features + ": /nuisance/loss must be [images] and "
                                     "/nuisance/grad_norm [images, layers]");
  std::vector<float> x(static_cast<size_t>(N * nq));
  for (std::int64_t i = 0; i < N; ++i) {
    x[i * nq] = loss[i];
    for (std::int64_t l = 0; l < L; ++l)
      x[i * nq + 1 + l] = gn[i * L + l];
  }
  for (float v : x)
    if (!std::isfinite(v))
      throw UsageError(opt_.features + ": /nuisance holds NaN or Inf (run encode with "
                                       "--joint-nuisance false to leave it out)");
  std::vector<double> xtr, xte;
  standardise(x, nq, split_.rows, split_.test, xtr, xte);
  const double sc = 1.0 / std::sqrt(double(lay_.parts) * double(nq));
  auto append = [&](std::vector<double>& a, const std::vector<double>& q, std::int64_t r) {
    std::vector<double> out(static_cast<size_t>(r * pa));
    for (std::int64_t i = 0; i < r; ++i) {
      std::copy(a.begin() + i * width, a.begin() + (i + 1) * width, out.begin() + i * pa);
      for (std::int64_t j = 0; j < nq; ++j)
        out[i * pa + width + j] = sc * q[i * nq + j];
    }
    a.swap(out);
  };
  append(a_tr_, xtr, n_);
  append(a_te_, xte, m_);
  n_tr_ = std::move(xtr);
  n_te_ = std::move(xte);
}

// The activation models R_k: R_0 = A (all layers, with the nuisance block), R_k = layer k - 1
// alone with the nuisance block ([Z / sqrt(2 p), N / sqrt(2 nq)], or Z / sqrt(p) without
// nuisance).
std::int64_t TrainingSides::ref_rows(std::int64_t k, std::vector<double>& xtr,
                                     std::vector<double>& xte) const {
  if (k == 0) {
    xtr = a_tr_;
    xte = a_te_;
    return lay_.pa;
  }
  const std::int64_t nq = lay_.nq;
  std::vector<double> ztr, zte;
  const std::int64_t d = read_std(lay_.ka, k - 1, ztr, zte), q = d + nq;
  const double sz = 1.0 / std::sqrt(double(nq > 0 ? 2 : 1) * double(d)),
               sn = nq > 0 ? 1.0 / std::sqrt(2.0 * double(nq)) : 0.0;
  auto fill = [&](const std::vector<double>& z, const std::vector<double>& nu, std::int64_t r) {
    std::vector<double> x(static_cast<size_t>(r * q));
    for (std::int64_t i = 0; i < r; ++i) {
      for (std::int64_t j = 0; j < d; ++j)
        x[i * q + j] = sz * z[i * d + j];
      for (std::int64_t j = 0; j < nq; ++j) // n_ holds the z-scored nuisance features
        x[i * q + d + j] = sn * nu[i * nq + j];
    }
    return x;
  };
  xtr = fill(ztr, n_tr_, n_);
  xte = fill(zte, n_te_, m_);
  return q;
}

void TrainingSides::svd_job(RidgeBasis& out, std::vector<double> xa, std::int64_t na,
                            std::int64_t dim, std::vector<double> xb, std::int64_t nb,
                            bool distribute) {
  if (opt_.solver == Solver::dual || (opt_.solver == Solver::automatic && dim > na)) {
    // The kernel form, computed by all ranks together (ScaLAPACK) when they are all here.
    out = make_basis_dual(xa, na, dim, xb, nb, distribute ? comm_ : MPI_COMM_SELF);
    return;
  }
  if (distribute && collective_) {
    // Fewer decompositions than ranks: each is split over all of them by rows.
    out = make_basis_gram(xa, na, dim, xb, nb, comm_);
    return;
  }
  auto xs = std::make_shared<std::pair<std::vector<double>, std::vector<double>>>(std::move(xa),
                                                                                  std::move(xb));
  jobs_.add(
      distribute,
      [&out, xs, na, dim, nb] {
        out = make_basis_gram(xs->first, na, dim, xs->second, nb, MPI_COMM_SELF);
      },
      [&out, this_comm = comm_](int owner) { broadcast_basis(out, owner, this_comm); });
}

void TrainingSides::gram_jobs(std::vector<double> xtr, std::vector<double> xte, bool distribute,
                              Side& side) {
  side.gram = true;
  GramBasis& gb = side.gb;
  gb.n = n_;
  gb.p = side.dim;
  gb.x = std::move(xtr);
  auto xt = std::make_shared<std::vector<double>>(std::move(xte));
  jobs_.add(
      distribute,
      [&gb, xt, m = m_] {
        make_gram_full(gb, *xt, m);
        xt->clear();
      },
      [&gb, this_comm = comm_](int owner) { broadcast_gram_full(gb, owner, this_comm); });
  gb.folds.resize(static_cast<size_t>(nf_));
  for (int f = 0; f < nf_; ++f)
    jobs_.add(
        distribute,
        [&gb, f, b = split_.fold_start[f], e = split_.fold_start[f + 1]] {
          gb.folds[size_t(f)] = make_gram_fold(gb, b, e);
        },
        [&gb, f, this_comm = comm_](int owner) {
          broadcast_gram_fold(gb.folds[size_t(f)], gb.p, owner, this_comm);
        });
}

void TrainingSides::build_from(std::vector<double> xtr, std::vector<double> xte, std::int64_t dim,
                               bool distribute, Side& side) {
  side.dim = dim;
  if (use_gram(opt_, split_, side.dim)) {
    gram_jobs(std::move(xtr), std::move(xte), distribute, side);
    return;
  }
  side.folds.resize(static_cast<size_t>(nf_));
  for (int f = 0; f < nf_; ++f) {
    std::vector<double> a, b;
    fold_rows(xtr, n_, side.dim, split_.row_fold, f, side.folds[f], a, b);
    const std::int64_t na = std::int64_t(side.folds[f].train.size()),
                       nb = std::int64_t(side.folds[f].valid.size());
    svd_job(side.folds[f].basis, std::move(a), na, side.dim, std::move(b), nb, distribute);
  }
  svd_job(side.basis, std::move(xtr), n_, side.dim, std::move(xte), m_, distribute);
}

void TrainingSides::build_kind(std::int64_t k, std::int64_t l, bool distribute, Side& side) {
  std::vector<double> xtr, xte;
  const std::int64_t dim = read_std(k, l, xtr, xte);
  build_from(std::move(xtr), std::move(xte), dim, distribute, side);
}

void TrainingSides::build_ref(std::int64_t k, bool distribute, Side& side) {
  std::vector<double> xtr, xte;
  const std::int64_t q = ref_rows(k, xtr, xte);
  build_from(std::move(xtr), std::move(xte), q, distribute, side);
}

// The joint design [sqrt(w) R_k, sqrt(1 - w) G_l / sqrt(p_l)].
void TrainingSides::build_joint(std::int64_t k, std::int64_t l, double w, bool distribute,
                                Side& side) {
  if (ref_memo_.key != k) {
    ref_memo_.dim = ref_rows(k, ref_memo_.tr, ref_memo_.te);
    ref_memo_.key = k;
  }
  if (grad_memo_.key != l) {
    grad_memo_.dim = read_std(lay_.kg, l, grad_memo_.tr, grad_memo_.te);
    grad_memo_.key = l;
  }
  const std::int64_t pr = ref_memo_.dim, d = grad_memo_.dim, q = pr + d;
  const double sa = std::sqrt(w), sg = std::sqrt((1 - w) / double(d));
  std::vector<double> xtr(static_cast<size_t>(n_ * q)), xte(static_cast<size_t>(m_ * q));
  auto fill = [&](const std::vector<double>& a, const std::vector<double>& g, std::int64_t rows,
                  std::vector<double>& x) {
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t j = 0; j < pr; ++j)
        x[i * q + j] = sa * a[i * pr + j];
      for (std::int64_t j = 0; j < d; ++j)
        x[i * q + pr + j] = sg * g[i * d + j];
    }
  };
  fill(ref_memo_.tr, grad_memo_.tr, n_, xtr);
  fill(ref_memo_.te, grad_memo_.te, m_, xte);
  build_from(std::move(xtr), std::move(xte), q, distribute, side);
}

void TrainingSides::finish(Side& side) {
  for (auto& fd : side.folds)
    finish_fold(fd);
}

size_t TrainingSides::joint_index(std::int64_t k, std::int64_t l, std::int64_t w) const {
  return size_t(lay_.K * lay_.L) + size_t(lay_.L + 1) + size_t((k * lay_.L + l) * lay_.W + w);
}

const Side& TrainingSides::kind(std::int64_t k, std::int64_t l, Side& fresh) {
  if (cache_)
    return cached_[size_t(k * lay_.L + l)];
  build_kind(k, l, false, fresh);
  finish(fresh);
  return fresh;
}

const Side& TrainingSides::reference(std::int64_t k, Side& fresh) {
  if (cache_)
    return cached_[size_t(lay_.K * lay_.L + k)];
  build_ref(k, false, fresh);
  finish(fresh);
  return fresh;
}

const Side& TrainingSides::joint(std::int64_t k, std::int64_t l, std::int64_t w, Side& fresh) {
  if (cache_)
    return cached_[joint_index(k, l, w)];
  build_joint(k, l, jw_[size_t(w)], false, fresh);
  finish(fresh);
  return fresh;
}

void TrainingSides::prepare_joint(const std::vector<int>& present) {
  if (!cache_)
    return;
  std::vector<size_t> fresh_sides;
  std::int64_t to_build = 0;
  for (std::int64_t k = 0; k <= lay_.L; ++k)
    to_build += present[size_t(k)] && !joint_built_[size_t(k)] ? lay_.L * lay_.W : 0;
  if (to_build == 0)
    return;
  Progress progress("encode", to_build, "joint bases"); // rank 0's place in the list
  for (std::int64_t k = 0; k <= lay_.L; ++k)
    if (present[size_t(k)] && !joint_built_[size_t(k)]) {
      joint_built_[size_t(k)] = 1;
      for (std::int64_t l = 0; l < lay_.L; ++l)
        for (std::int64_t w = 0; w < lay_.W; ++w) {
          build_joint(k, l, jw_[size_t(w)], true, cached_[joint_index(k, l, w)]);
          fresh_sides.push_back(joint_index(k, l, w));
          progress.advance();
        }
    }
  jobs_.run_all();
  progress.finish();
  for (auto i : fresh_sides)
    finish(cached_[i]);
}

} // namespace gradmap::encoding
