// Kernel eigendecomposition with LAPACK or ScaLAPACK: see kernel_eig.hpp.
#include "gradmap/linalg/kernel_eig.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "gradmap/core/error.hpp"
#include "gradmap/core/profile.hpp"
#include "gradmap/linalg/dense.hpp"
#include "gradmap/mpi/comm.hpp"

extern "C" {
void dsyrk_(const char* uplo, const char* trans, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* beta, double* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
int Csys2blacs_handle(MPI_Comm comm);
void Cfree_blacs_system_handle(int handle);
void Cblacs_gridinit(int* ctxt, const char* order, int nprow, int npcol);
void Cblacs_gridinfo(int ctxt, int* nprow, int* npcol, int* myrow, int* mycol);
void Cblacs_gridexit(int ctxt);
int numroc_(const int* n, const int* nb, const int* iproc, const int* isrcproc, const int* nprocs);
void descinit_(int* desc, const int* m, const int* n, const int* mb, const int* nb,
               const int* irsrc, const int* icsrc, const int* ictxt, const int* lld, int* info);
void pdsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* ia,
              const int* ja, const int* desca, double* w, double* z, const int* iz, const int* jz,
              const int* descz, double* work, const int* lwork, int* iwork, const int* liwork,
              int* info);
}

namespace gradmap::linalg {

void kernel_eig(const std::vector<double>& x, std::int64_t n64, std::int64_t p64, MPI_Comm comm,
                std::vector<double>& w, std::vector<double>& z) {
  ProfileEvent ev("gm.ridge.kernel");
  GM_REQUIRE(n64 < (std::int64_t(1) << 31) / 2 && p64 < (std::int64_t(1) << 31),
             "kernel_eig: n or p beyond 32-bit LAPACK indices");
  const int n = int(n64), p = int(p64);
  ProfileEvent::add_flops(double(n) * double(n) * double(p) +
                          4.0 * double(n) * double(n) * double(n));
  const int P = mpi::size(comm);
  std::vector<double> ev_cm; // eigenvectors, column-major n x n (column k = vector k)
  std::vector<double> wa;    // ascending
  if (P == 1) {
    // K = X X^T: with X row-major [n, p] = column-major X^T [p, n], K = (X^T)^T X^T.
    ev_cm.assign(size_t(n) * size_t(n), 0.0);
    const double one = 1, zero = 0;
    dsyrk_("L", "T", &n, &p, &one, x.data(), &p, &zero, ev_cm.data(), &n);
    sym_eig(n, ev_cm, w, z); // reads the lower (column-major) triangle
    return;
  } else {
    // A 1 x P process grid from comm. (Debian 12's ScaLAPACK 2.2.1 PDSYEVD returned wrong
    // eigenvectors on a 2 x 2 grid with 32 x 32 blocks and above, in tests/mpi/test_kernel_eig.cpp
    // with any workspace size, while 1 x P grids are exact: the eigensolve is O(n^3) once per
    // feature set, so the grid shape matters little next to the per-target GEMMs.)
    const int nprow = 1, npcol = P;
    const int handle = Csys2blacs_handle(comm);
    int ctxt = handle;
    Cblacs_gridinit(&ctxt, "Row", nprow, npcol);
    int pr = 0, pc = 0, myrow = 0, mycol = 0;
    Cblacs_gridinfo(ctxt, &pr, &pc, &myrow, &mycol);
    const int nb = std::min(64, std::max(1, n / npcol));
    const int izero = 0, ione = 1;
    const int mloc = numroc_(&n, &nb, &myrow, &izero, &nprow);
    const int nloc = numroc_(&n, &nb, &mycol, &izero, &npcol);
    const int lld = std::max(1, mloc);
    int desc[9], info = 0;
    descinit_(desc, &n, &n, &nb, &nb, &izero, &izero, &ctxt, &lld, &info);
    GM_REQUIRE(info == 0, "ScaLAPACK descinit failed (info " + std::to_string(info) + ")");
    auto global = [&](int l, int me, int np) { return ((l / nb) * np + me) * nb + l % nb; };
    // This rank's tiles of K: its rows and columns of X, one GEMM.
    std::vector<double> xr(size_t(mloc) * size_t(p)), xc(size_t(nloc) * size_t(p));
    for (int i = 0; i < mloc; ++i)
      std::copy_n(&x[size_t(global(i, myrow, nprow)) * size_t(p)], p, &xr[size_t(i) * size_t(p)]);
    for (int j = 0; j < nloc; ++j)
      std::copy_n(&x[size_t(global(j, mycol, npcol)) * size_t(p)], p, &xc[size_t(j) * size_t(p)]);
    std::vector<double> a(size_t(lld) * size_t(std::max(1, nloc)), 0.0), zl(a.size(), 0.0);
    if (mloc > 0 && nloc > 0) {
      const double one = 1, zero = 0;
      dgemm_("T", "N", &mloc, &nloc, &p, &one, xr.data(), &p, xc.data(), &p, &zero, a.data(), &lld);
    }
    wa.resize(size_t(n));
    int lwork = -1, liwork = -1, iq = 0;
    double q = 0;
    pdsyevd_("V", "L", &n, a.data(), &ione, &ione, desc, wa.data(), zl.data(), &ione, &ione, desc,
             &q, &lwork, &iq, &liwork, &info);
    // The documented minima (pdsyevd.f), times 4: the workspace query and the minima both
    // undershoot (PDLASRT then rejects its LWORK on 1 x 3 grids).
    const std::int64_t trilwmin =
        3 * std::int64_t(n) + std::max<std::int64_t>(std::int64_t(nb) * (mloc + 1), 3 * nb);
    const std::int64_t lmin =
        std::max<std::int64_t>(1 + 6 * std::int64_t(n) + 2 * std::int64_t(mloc) * nloc, trilwmin) +
        2 * std::int64_t(n);
    lwork = int(std::max<std::int64_t>(std::int64_t(q) + 1, lmin) * 4);
    liwork = std::max(iq, 7 * n + 8 * npcol + 2) * 4;
    std::vector<double> work(static_cast<size_t>(lwork));
    std::vector<int> iwork(static_cast<size_t>(liwork));
    pdsyevd_("V", "L", &n, a.data(), &ione, &ione, desc, wa.data(), zl.data(), &ione, &ione, desc,
             work.data(), &lwork, iwork.data(), &liwork, &info);
    // Agree on failure before anything else collective.
    const bool ok = mpi::all_of(comm, info == 0);
    if (!ok) {
      Cblacs_gridexit(ctxt);
      Cfree_blacs_system_handle(handle);
      Error e("ScaLAPACK pdsyevd failed on the " + std::to_string(n) + "-image kernel");
      e.collective = true;
      throw e;
    }
    // Every rank places its tiles; a sum over ranks assembles Z everywhere (pieces < 2^27).
    ev_cm.assign(size_t(n) * size_t(n), 0.0);
    for (int j = 0; j < nloc; ++j)
      for (int i = 0; i < mloc; ++i)
        ev_cm[size_t(global(j, mycol, npcol)) * size_t(n) + size_t(global(i, myrow, nprow))] =
            zl[size_t(j) * size_t(lld) + size_t(i)];
    constexpr size_t piece = size_t(1) << 27;
    for (size_t o = 0; o < ev_cm.size(); o += piece)
      GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, ev_cm.data() + o,
                                 int(std::min(piece, ev_cm.size() - o)), MPI_DOUBLE, MPI_SUM,
                                 comm));
    Cblacs_gridexit(ctxt);
    Cfree_blacs_system_handle(handle);
  }
  // Decreasing order; z row-major [n, n] with column k = eigenvector k.
  w.resize(size_t(n));
  z.assign(size_t(n) * size_t(n), 0.0);
  for (int k = 0; k < n; ++k) {
    const int src = n - 1 - k;
    w[size_t(k)] = wa[size_t(src)];
    for (int i = 0; i < n; ++i)
      z[size_t(i) * size_t(n) + size_t(k)] = ev_cm[size_t(src) * size_t(n) + size_t(i)];
  }
}

} // namespace gradmap::linalg
