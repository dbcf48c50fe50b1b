#pragma once
// The training side of every fitted feature space of gradmap encode (internal to encode.cpp):
// the SVD basis of its standardised training features and, for kfold, the bases of its folds
// (or, in the Gram form, the eigenpairs of X^T X and of each fold's training Gram). Every rank
// reads and standardises the features (collective reads); the decompositions are dealt
// round-robin to the ranks and broadcast from their owner, so the X side is computed once and
// shared. When the sides do not fit the memory budget (MemoryPlan::cache false) every chunk
// builds each side afresh on every rank.
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "gradmap/encoding/encode_plan.hpp"
#include "gradmap/encoding/ridge.hpp"
#include "gradmap/io/h5.hpp"
#include "gradmap/io/schema.hpp"

namespace gradmap::encoding {

struct Side {
  std::int64_t dim = 0;
  bool gram = false;
  RidgeBasis basis;
  std::vector<FoldBasis> folds;
  GramBasis gb;
};

/// Decompositions dealt to ranks: each rank runs the jobs it owns as they are added (and drops
/// the others' inputs), then run_all broadcasts every job from its owner, so the ranks work at
/// the same time and hold one job's inputs at a time. A job that is not distributed runs at once
/// on the calling rank.
class JobQueue {
public:
  explicit JobQueue(MPI_Comm comm);
  void add(bool distribute, std::function<void()> run, std::function<void(int)> share);
  /// Collective: shares every job from its owner (this rank's ran when added).
  void run_all();

private:
  struct Job {
    int owner;
    std::function<void(int)> share;
  };
  MPI_Comm comm_;
  int me_, size_;
  std::vector<Job> jobs_;
  std::int64_t count_ = 0; // running job counter: its owner is count_ % size
};

class TrainingSides {
public:
  /// Collective: with --joint reads the activation block (every rank) and, when cached, builds
  /// every (kind, layer) side and the activation models R_0..R_L.
  /// `joint_weights`: the band weights w (Layout::W of them).
  TrainingSides(const EncodeOptions& opt, const io::File& features, const io::FeaturesInfo& fi,
                const ImageSplit& split, const Layout& lay,
                const std::vector<double>& joint_weights, bool cache, MPI_Comm comm);
  /// The side of (kind k, layer l): cached, or built into `fresh` (on this rank alone).
  const Side& kind(std::int64_t k, std::int64_t l, Side& fresh);
  /// The activation model R_k (k = 0: all layers; k >= 1: layer k - 1 with the nuisance block).
  const Side& reference(std::int64_t k, Side& fresh);
  /// The joint design (R_k, G_l, band weight index w).
  const Side& joint(std::int64_t k, std::int64_t l, std::int64_t w, Side& fresh);
  /// Collective. Cached: builds the joint designs of every R_k present on some rank and not yet
  /// built (the feature reads are collective, so every rank builds all of them).
  void prepare_joint(const std::vector<int>& present);
  bool cached() const { return cache_; }

private:
  // The standardised training and test rows of (kind k, layer l); returns the layer's width.
  std::int64_t read_std(std::int64_t k, std::int64_t l, std::vector<double>& xtr,
                        std::vector<double>& xte) const;
  void read_activation_block();
  void reduce_activation_block();
  void append_nuisance(std::int64_t width);
  // R_k's rows; returns its width.
  std::int64_t ref_rows(std::int64_t k, std::vector<double>& xtr, std::vector<double>& xte) const;
  void svd_job(RidgeBasis& out, std::vector<double> xa, std::int64_t na, std::int64_t dim,
               std::vector<double> xb, std::int64_t nb, bool distribute);
  void gram_jobs(std::vector<double> xtr, std::vector<double> xte, bool distribute, Side& side);
  // Fills side (which must stay in place until the jobs have run) from standardised rows.
  void build_from(std::vector<double> xtr, std::vector<double> xte, std::int64_t dim,
                  bool distribute, Side& side);
  void build_kind(std::int64_t k, std::int64_t l, bool distribute, Side& side);
  void build_ref(std::int64_t k, bool distribute, Side& side);
  void build_joint(std::int64_t k, std::int64_t l, double w, bool distribute, Side& side);
  static void finish(Side& side);
  size_t joint_index(std::int64_t k, std::int64_t l, std::int64_t w) const;

  const EncodeOptions& opt_;
  const io::File& ff_;
  const io::FeaturesInfo& fi_;
  const ImageSplit& split_;
  const Layout& lay_;
  const bool cache_;
  MPI_Comm comm_;
  const std::int64_t n_, m_;
  const int nf_;                  // folds (0: LOO)
  const std::vector<double>& jw_; // band weights (the Encoder's)
  JobQueue jobs_;
  bool collective_ = false;  // svd_job splits each primal basis over all ranks (constructor only)
  std::vector<Side> cached_; // (kind, layer), then R_0..R_L, then (k, l, w)
  std::vector<std::uint8_t> joint_built_;
  // --joint: A [n, pa] and [m, pa]; the z-scored nuisance block [rows, nq]
  std::vector<double> a_tr_, a_te_, n_tr_, n_te_;
  // The last R_k and G_l rows read: the W designs of a (k, l) share them.
  struct Rows {
    std::int64_t key = -1, dim = 0;
    std::vector<double> tr, te;
  } ref_memo_, grad_memo_;
};

} // namespace gradmap::encoding
