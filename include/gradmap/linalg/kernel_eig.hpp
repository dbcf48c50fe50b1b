#pragma once
// The dual (kernel) side of ridge regression for p >> n: K = X X^T (n x n) and its symmetric
// eigendecomposition, on one rank with LAPACK (DSYRK + DSYEVD) or over a communicator with
// ScaLAPACK (a 1 x P BLACS grid made from the communicator, block-cyclic tiles of at most
// 64 x 64, PDSYEVD). Every rank holds X (the features are replicated), so each rank computes the
// kernel tiles it owns with one local GEMM (the flops of PDSYRK, without its communication); the
// eigenvectors are then gathered on every rank.
#include <mpi.h>

#include <cstdint>
#include <vector>

namespace gradmap::linalg {

/// Collective on comm (not collective when comm is MPI_COMM_SELF or has one rank). x: [n, p]
/// row-major, identical on every rank. Returns eigenvalues in decreasing order (w, n) and the
/// eigenvectors as columns of z ([n, n] row-major: z[i * n + k] is component i of vector k).
void kernel_eig(const std::vector<double>& x, std::int64_t n, std::int64_t p, MPI_Comm comm,
                std::vector<double>& w, std::vector<double>& z);

} // namespace gradmap::linalg
