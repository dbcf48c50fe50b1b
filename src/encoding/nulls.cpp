// Permutation and bootstrap replicates of test-set Pearson r (see nulls.hpp).
//
// Kernel: a block of TB targets is standardised (population std over the m test rows) and stored
// in float, in strips of SW targets ([m][SW] each), so that a replicate is m fused multiply-adds
// over SW contiguous lanes per strip, one strip (m x SW floats) reused across a group of
// replicates:
//   permutation  r_b = (1/m) sum_i zp[perm_b(i)] zy[i]   (means and variances do not move)
//   bootstrap    r_b = (m Sxy - Sx Sy) / sqrt((m Sxx - Sx^2)(m Syy - Sy^2)), S weighted by c_{b,i}
// A kernel call takes GP permutations (or GB bootstraps) together: the zy row (the count-weighted
// rows) is read once for all of them and the accumulators stay in registers. On a Zen 5 core that
// is about 45 GFLOP/s for the permutations, still bound by one gathered row load per FMA, and 90
// for the bootstraps, against 15 and 9.5 of the previous one-replicate kernel (bench/README.md).
// The observed r used for the exceedance count is computed by the same kernel (identity
// permutation), so r_b >= r compares like with like. Replicates are split over OpenMP threads;
// every per-(group, replicate) sum is accumulated in target order by the thread that owns the
// replicate, so results do not depend on the thread count.
#include "gradmap/encoding/nulls.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "gradmap/core/profile.hpp"
#include "gradmap/encoding/clusters.hpp"
#include "gradmap/mpi/comm.hpp"
#include "gradmap/sim/philox.hpp"

namespace gradmap::encoding {

namespace {
constexpr std::int64_t TB = 64; // targets per block
constexpr std::int64_t SW = 8;  // lanes per strip: a block is TB / SW strips [m][SW]
constexpr int GP = 8;           // permutations per kernel call
constexpr int GB = 4;           // bootstraps per kernel call
typedef float lanes __attribute__((vector_size(SW * sizeof(float))));

// The inner kernels are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and chosen at
// load time by the CPU (GCC function multi-versioning): a Debian build runs on any x86-64 and
// still uses the wide registers where they exist. Every lane is its own target and sums its m
// terms in row order with one fused multiply-add each, so the AVX-512 and AVX2 versions give
// identical bits (the baseline one, without FMA, rounds each product).
#define GM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))

// Permutations. GP permutations walk one strip of the block at a time (m x SW floats, 32 KB at
// m = 1000: about the L1 cache); the test responses zy are read once per row for all GP of them.
// a[g * TB + j] = sum_i zp[perm_g[i]][j] zy[i][j].
GM_MULTIVERSION void permuted_dots(const float* zp, const float* zy,
                                   const std::uint32_t* const* perm, std::int64_t m, float* a) {
  for (std::int64_t s = 0; s < TB / SW; ++s) {
    const float* xs = zp + s * m * SW;
    const float* ys = zy + s * m * SW;
    lanes acc[GP];
    for (int g = 0; g < GP; ++g)
      acc[g] = lanes{};
    for (std::int64_t i = 0; i < m; ++i) {
      lanes y;
      std::memcpy(&y, ys + i * SW, sizeof y);
      for (int g = 0; g < GP; ++g) {
        lanes x;
        std::memcpy(&x, xs + std::int64_t(perm[g][i]) * SW, sizeof x);
        acc[g] += x * y;
      }
    }
    for (int g = 0; g < GP; ++g)
      std::memcpy(a + g * TB + s * SW, &acc[g], sizeof acc[g]);
  }
}

// Bootstraps: the weighted sums of the correlation, weights cnt_g[i], for GB resamples at once.
// zq holds per strip and row the five lanes x, y, x^2, y^2, xy ([TB / SW][m][5][SW]), so the sums
// are a product of the counts with them: out[(g * 5 + q) * TB + j], q = sx, sy, sxx, syy, sxy.
GM_MULTIVERSION void weighted_sums(const float* zq, const float* const* cnt, std::int64_t m,
                                   float* out) {
  for (std::int64_t s = 0; s < TB / SW; ++s) {
    const float* qs = zq + s * m * 5 * SW;
    lanes acc[GB][5];
    for (int g = 0; g < GB; ++g)
      for (int q = 0; q < 5; ++q)
        acc[g][q] = lanes{};
    for (std::int64_t i = 0; i < m; ++i) {
      lanes v[5];
      std::memcpy(v, qs + i * 5 * SW, sizeof v);
      for (int g = 0; g < GB; ++g) {
        const float k = cnt[g][i];
        for (int q = 0; q < 5; ++q)
          acc[g][q] += k * v[q];
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int q = 0; q < 5; ++q)
        std::memcpy(out + (g * 5 + q) * TB + s * SW, &acc[g][q], sizeof acc[g][q]);
  }
}
} // namespace

Resamples make_resamples(std::int64_t m, int permutations, int bootstraps, std::uint64_t seed) {
  Resamples rs;
  rs.m = m;
  rs.permutations = permutations;
  rs.bootstraps = bootstraps;
  rs.perm.resize(static_cast<size_t>(std::int64_t(permutations) * m));
  rs.count.assign(static_cast<size_t>(std::int64_t(bootstraps) * m), 0);
  for (int b = 0; b < permutations; ++b) {
    std::uint32_t* p = &rs.perm[static_cast<size_t>(std::int64_t(b) * m)];
    for (std::int64_t i = 0; i < m; ++i)
      p[i] = std::uint32_t(i);
    sim::Philox rng(seed, sim::Stream::permutation, std::uint32_t(b));
    for (std::int64_t i = m - 1; i > 0; --i)
      std::swap(p[i], p[rng.below(std::uint32_t(i + 1))]);
  }
  for (int b = 0; b < bootstraps; ++b) {
    std::uint32_t* c = &rs.count[static_cast<size_t>(std::int64_t(b) * m)];
    sim::Philox rng(seed, sim::Stream::bootstrap, std::uint32_t(b));
    for (std::int64_t i = 0; i < m; ++i)
      ++c[rng.below(std::uint32_t(m))];
  }
  return rs;
}

NullAccumulator::NullAccumulator(const Resamples& rs, int g, std::int64_t clusters_over,
                                 float threshold)
    : groups(g),
      null_max(static_cast<size_t>(rs.permutations), -std::numeric_limits<float>::infinity()),
      perm_sum(static_cast<size_t>(g) * static_cast<size_t>(rs.permutations), 0.0),
      boot_sum(static_cast<size_t>(g) * static_cast<size_t>(rs.bootstraps), 0.0),
      obs_sum(static_cast<size_t>(g), 0.0), n(static_cast<size_t>(g), 0),
      cluster_threshold(threshold), words((clusters_over + 63) / 64),
      above(static_cast<size_t>(words * rs.permutations), 0) {}

void accumulate_nulls(const Resamples& rs, const std::vector<double>& pred,
                      const std::vector<double>& y, std::int64_t t, const std::int32_t* group,
                      NullAccumulator& acc, std::int32_t* exceed, std::int64_t t0, float* boot_r) {
  const bool clusters = acc.words > 0;
  const std::int64_t m = rs.m;
  const int B = rs.permutations, Bb = rs.bootstraps;
  ProfileEvent ev("gm.nulls");
  ProfileEvent::add_flops(2.0 * double(m) * double(t) * (double(B) + 5.0 * double(Bb)));
  const float inv_m = 1.0f / float(m);
  // Strip layouts of the block (see the kernels): zp, zy [TB / SW][m][SW]; zq [TB / SW][m][5][SW].
  std::vector<float> zp(static_cast<size_t>(m * TB)), zy(static_cast<size_t>(m * TB)),
      zq(static_cast<size_t>(Bb > 0 ? 5 * m * TB : 0));
  auto at = [m](std::int64_t i, std::int64_t j) { return (j / SW) * m * SW + i * SW + j % SW; };
  auto at5 = [m](std::int64_t i, std::int64_t j, int q) { // zq: lane j of quantity q, row i
    return ((j / SW) * m * 5 + i * 5 + q) * SW + j % SW;
  };
  std::vector<std::uint32_t> identity(static_cast<size_t>(m));
  for (std::int64_t i = 0; i < m; ++i)
    identity[i] = std::uint32_t(i);
  // Per kernel call the replicates' rows; a last partial group repeats its last replicate.
  const int np = (B + GP - 1) / GP, nb = (Bb + GB - 1) / GB;
  std::vector<const std::uint32_t*> perm_rows(static_cast<size_t>(np * GP));
  for (int b = 0; b < np * GP; ++b)
    perm_rows[size_t(b)] = &rs.perm[static_cast<size_t>(std::int64_t(std::min(b, B - 1)) * m)];
  std::vector<float> counts(rs.count.begin(), rs.count.end());
  std::vector<const float*> count_rows(static_cast<size_t>(nb * GB));
  for (int b = 0; b < nb * GB; ++b)
    count_rows[size_t(b)] = counts.data() + std::int64_t(std::min(b, Bb - 1)) * m;
  for (std::int64_t c0 = 0; c0 < t; c0 += TB) {
    const std::int64_t w = std::min(TB, t - c0);
    // Standardise the block (double), store as float lanes; lanes past w and undefined targets
    // are zero.
    bool valid[TB] = {};
    std::fill(zp.begin(), zp.end(), 0.0f);
    std::fill(zy.begin(), zy.end(), 0.0f);
    std::fill(zq.begin(), zq.end(), 0.0f);
    for (std::int64_t j = 0; j < w; ++j) {
      const std::int64_t c = c0 + j;
      double mp = 0, my = 0;
      for (std::int64_t i = 0; i < m; ++i) {
        mp += pred[i * t + c];
        my += y[i * t + c];
      }
      mp /= double(m);
      my /= double(m);
      double vp = 0, vy = 0;
      for (std::int64_t i = 0; i < m; ++i) {
        vp += (pred[i * t + c] - mp) * (pred[i * t + c] - mp);
        vy += (y[i * t + c] - my) * (y[i * t + c] - my);
      }
      const double sp = std::sqrt(vp / double(m)), sy = std::sqrt(vy / double(m));
      // Relative tolerance: a prediction that is constant up to rounding is constant.
      valid[j] = sp > 1e-12 * (std::abs(mp) + 1e-300) && sy > 1e-12 * (std::abs(my) + 1e-300) &&
                 std::isfinite(sp) && std::isfinite(sy);
      if (!valid[j])
        continue;
      for (std::int64_t i = 0; i < m; ++i) {
        const float xp = float((pred[i * t + c] - mp) / sp), xy = float((y[i * t + c] - my) / sy);
        zp[at(i, j)] = xp;
        zy[at(i, j)] = xy;
        if (Bb == 0)
          continue;
        zq[at5(i, j, 0)] = xp;
        zq[at5(i, j, 1)] = xy;
        zq[at5(i, j, 2)] = xp * xp;
        zq[at5(i, j, 3)] = xy * xy;
        zq[at5(i, j, 4)] = xp * xy;
      }
    }
    // The observed r by the same kernel as the permutations: r_b >= r compares like with like.
    float obs[GP * TB];
    {
      const std::uint32_t* id[GP];
      std::fill(id, id + GP, identity.data());
      permuted_dots(zp.data(), zy.data(), id, m, obs);
    }
    for (std::int64_t j = 0; j < TB; ++j)
      obs[j] *= inv_m;
    std::int32_t g[TB];
    for (std::int64_t j = 0; j < TB; ++j)
      g[j] = (j < w && valid[j]) ? group[c0 + j] : -1;
    for (std::int64_t j = 0; j < w; ++j)
      if (valid[j] && g[j] >= 0) {
        acc.obs_sum[g[j]] += obs[j];
        ++acc.n[g[j]];
      }
    std::int64_t exc[TB] = {};
#pragma omp parallel
    {
      std::int64_t mine[TB] = {};
#pragma omp for schedule(static) nowait
      for (int q = 0; q < np; ++q) {
        float a[GP * TB];
        permuted_dots(zp.data(), zy.data(), &perm_rows[size_t(q) * GP], m, a);
        for (int k = 0; k < GP && q * GP + k < B; ++k) {
          const int b = q * GP + k;
          float mx = acc.null_max[b];
          std::uint64_t* bits = clusters ? &acc.above[static_cast<size_t>(b * acc.words)] : nullptr;
          for (std::int64_t j = 0; j < w; ++j) {
            if (!valid[j])
              continue;
            const float rb = a[k * TB + j] * inv_m;
            mine[j] += rb >= obs[j] ? 1 : 0;
            mx = std::max(mx, rb);
            if (bits && rb > acc.cluster_threshold) { // replicate b is this thread's alone
              const std::int64_t target = t0 + c0 + j;
              bits[target / 64] |= std::uint64_t(1) << (target % 64);
            }
            if (g[j] >= 0)
              acc.perm_sum[static_cast<size_t>(g[j]) * B + b] += rb;
          }
          acc.null_max[b] = mx;
        }
      }
#pragma omp for schedule(static) nowait
      for (int q = 0; q < nb; ++q) {
        float s[GB * 5 * TB];
        weighted_sums(zq.data(), &count_rows[size_t(q) * GB], m, s);
        for (int k = 0; k < GB && q * GB + k < Bb; ++k) {
          const int b = q * GB + k;
          const float* sx = s + k * 5 * TB;
          const float *sy = sx + TB, *sxx = sx + 2 * TB, *syy = sx + 3 * TB, *sxy = sx + 4 * TB;
          for (std::int64_t j = 0; j < w; ++j) {
            if (!valid[j] || (g[j] < 0 && !boot_r)) {
              if (boot_r)
                boot_r[std::int64_t(b) * t + c0 + j] = std::numeric_limits<float>::quiet_NaN();
              continue;
            }
            const double fm = double(m);
            const double num = fm * sxy[j] - double(sx[j]) * sy[j];
            const double den =
                (fm * sxx[j] - double(sx[j]) * sx[j]) * (fm * syy[j] - double(sy[j]) * sy[j]);
            // A resample of identical rows has no variance: it adds r = 0 (rare for m >= 10).
            const double rb = den > 0 ? num / std::sqrt(den) : 0.0;
            if (g[j] >= 0)
              acc.boot_sum[static_cast<size_t>(g[j]) * Bb + b] += rb;
            if (boot_r)
              boot_r[std::int64_t(b) * t + c0 + j] = float(rb);
          }
        }
      }
#pragma omp critical
      for (std::int64_t j = 0; j < TB; ++j)
        exc[j] += mine[j];
    }
    for (std::int64_t j = 0; j < w; ++j)
      exceed[c0 + j] = valid[j] ? std::int32_t(exc[j]) : -1;
  }
}

void reduce_nulls(NullAccumulator& acc, MPI_Comm comm) {
  constexpr size_t piece = size_t(1) << 26; // elements per message (< 2 GiB for 8-byte types)
  auto all = [&](void* data, size_t count, MPI_Datatype type, size_t bytes, MPI_Op op) {
    for (size_t o = 0; o < count; o += piece)
      GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, static_cast<char*>(data) + o * bytes,
                                 int(std::min(piece, count - o)), type, op, comm));
  };
  all(acc.null_max.data(), acc.null_max.size(), MPI_FLOAT, 4, MPI_MAX);
  all(acc.perm_sum.data(), acc.perm_sum.size(), MPI_DOUBLE, 8, MPI_SUM);
  all(acc.boot_sum.data(), acc.boot_sum.size(), MPI_DOUBLE, 8, MPI_SUM);
  all(acc.obs_sum.data(), acc.obs_sum.size(), MPI_DOUBLE, 8, MPI_SUM);
  all(acc.n.data(), acc.n.size(), MPI_INT64_T, 8, MPI_SUM);
  all(acc.above.data(), acc.above.size(), MPI_UINT64_T, 8, MPI_BOR);
}

std::vector<std::int64_t> null_cluster_max(const NullAccumulator& acc, const ClusterGraph& g,
                                           int permutations, MPI_Comm comm) {
  std::vector<std::int64_t> mx(static_cast<size_t>(permutations), 0);
  const int me = mpi::rank(comm), p = mpi::size(comm);
  for (int b = me; b < permutations; b += p) {
    const std::uint64_t* bits = &acc.above[static_cast<size_t>(std::int64_t(b) * acc.words)];
    const auto sizes =
        find_clusters(g, [bits](std::int64_t v) { return (bits[v / 64] >> (v % 64)) & 1U; });
    for (auto s : sizes)
      mx[b] = std::max(mx[b], s);
  }
  GM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, mx.data(), permutations, MPI_INT64_T, MPI_MAX, comm));
  return mx;
}

} // namespace gradmap::encoding

namespace gradmap::encoding {

std::vector<std::uint32_t> null_bootstrap_counts(std::int64_t m, int replicates,
                                                 std::uint64_t seed) {
  std::vector<std::uint32_t> count(static_cast<size_t>(std::int64_t(replicates) * m), 0);
  for (int b = 0; b < replicates; ++b) {
    std::uint32_t* c = &count[static_cast<size_t>(std::int64_t(b) * m)];
    sim::Philox rng(seed, sim::Stream::bootstrap, 0x80000000U + std::uint32_t(b));
    for (std::int64_t i = 0; i < m; ++i)
      ++c[rng.below(std::uint32_t(m))];
  }
  return count;
}

void accumulate_unique(const Resamples& rs, const std::vector<std::uint32_t>& null_counts,
                       const std::vector<double>& y, const std::vector<double>& e,
                       const std::vector<double>& d, std::int64_t t, const std::int32_t* group,
                       const std::uint8_t* defined, NullAccumulator* acc, std::int32_t* exceed,
                       float* stat, float* dr2_out, float* ci_lo, float* ci_hi, float* boot) {
  const std::int64_t m = rs.m;
  const int Bb = rs.bootstraps;
  const int B = int(null_counts.size() / static_cast<size_t>(std::max<std::int64_t>(m, 1)));
  ProfileEvent ev("gm.nulls.unique");
  ProfileEvent::add_flops(8.0 * double(m) * double(t) * (double(B) + double(Bb)));
  std::vector<double> l(static_cast<size_t>(m)), yc(static_cast<size_t>(m)),
      dboot(static_cast<size_t>(Bb));
  for (std::int64_t c = 0; c < t; ++c) {
    double ybar = 0;
    for (std::int64_t i = 0; i < m; ++i)
      ybar += y[i * t + c];
    ybar /= double(m);
    double sst = 0, sl = 0;
    bool zero = true;
    for (std::int64_t i = 0; i < m; ++i) {
      const double di = d[i * t + c], ei = e[i * t + c];
      l[i] = 2 * ei * di - di * di; // e^2 - (e - d)^2: the joint model's gain on image i
      zero = zero && di == 0;
      yc[i] = y[i * t + c];
      sst += (yc[i] - ybar) * (yc[i] - ybar);
      sl += l[i];
    }
    if (!defined[c] || !(sst > 0)) {
      exceed[c] = -1;
      stat[c] = dr2_out[c] = ci_lo[c] = ci_hi[c] = NAN;
      for (int b = 0; boot && b < Bb; ++b)
        boot[std::int64_t(b) * t + c] = NAN;
      continue;
    }
    const double mean = sl / double(m), dr2 = sl / sst;
    double ss = 0;
    for (std::int64_t i = 0; i < m; ++i)
      ss += (l[i] - mean) * (l[i] - mean);
    const double se = std::sqrt(ss / double(m - 1) / double(m));
    const double tobs = zero || !(se > 0) ? 0.0 : mean / se;
    stat[c] = float(tobs);
    dr2_out[c] = float(dr2);
    const std::int32_t g = acc ? group[c] : -1;
    if (g >= 0) {
      acc->obs_sum[g] += dr2;
      ++acc->n[g];
    }
    // One resample's weighted mean and se of l and its dR^2 (counts k, sum k = m).
    auto resample = [&](const std::uint32_t* k, double& mb, double& seb, double& dr2b) {
      double s = 0, sy = 0, syy = 0;
      for (std::int64_t i = 0; i < m; ++i) {
        s += k[i] * l[i];
        sy += k[i] * yc[i];
        syy += k[i] * yc[i] * yc[i];
      }
      mb = s / double(m);
      double v = 0;
      for (std::int64_t i = 0; i < m; ++i)
        v += k[i] * (l[i] - mb) * (l[i] - mb);
      seb = std::sqrt(v / double(m - 1) / double(m));
      const double sstb = syy - sy * sy / double(m);
      dr2b = sstb > 0 ? s / sstb : 0.0;
    };
    std::int64_t ge = 0;
#pragma omp parallel for schedule(static) reduction(+ : ge)
    for (int b = 0; b < B; ++b) {
      double mb = 0, seb = 0, dr2b = 0;
      resample(&null_counts[static_cast<size_t>(std::int64_t(b) * m)], mb, seb, dr2b);
      // bootstrap-t: the resampled t centred at the observed mean (H0 holds in the resample
      // world); 0 where l is constant (the activation model kept) or the resample has no spread
      const double tb = zero || !(seb > 0) ? 0.0 : (mb - mean) / seb;
      ge += tb >= tobs ? 1 : 0;
      if (acc)
        acc->null_max[b] = std::max(acc->null_max[b], float(tb));
      if (g >= 0)
        acc->perm_sum[static_cast<size_t>(g) * B + b] += zero ? 0.0 : dr2b - dr2;
    }
    exceed[c] = std::int32_t(ge);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < Bb; ++b) {
      double mb = 0, seb = 0, dr2b = 0;
      resample(&rs.count[static_cast<size_t>(std::int64_t(b) * m)], mb, seb, dr2b);
      dboot[size_t(b)] = zero ? 0.0 : dr2b;
    }
    for (int b = 0; b < Bb; ++b) {
      if (g >= 0)
        acc->boot_sum[static_cast<size_t>(g) * Bb + b] += dboot[size_t(b)];
      if (boot)
        boot[std::int64_t(b) * t + c] = float(dboot[size_t(b)]);
    }
    if (Bb > 0 && !zero) { // 95% percentile interval (numpy's linear interpolation)
      std::sort(dboot.begin(), dboot.end());
      auto quantile = [&](double q) {
        const double h = q * double(Bb - 1);
        const auto lo = std::int64_t(std::floor(h));
        const auto hi = std::min<std::int64_t>(lo + 1, Bb - 1);
        return dboot[size_t(lo)] + (h - double(lo)) * (dboot[size_t(hi)] - dboot[size_t(lo)]);
      };
      ci_lo[c] = float(quantile(0.025));
      ci_hi[c] = float(quantile(0.975));
    } else {
      ci_lo[c] = ci_hi[c] = NAN; // kept activation model: no interval (dR^2 = 0 by choice)
    }
  }
}

} // namespace gradmap::encoding
