// Clusters on the sensor x time grid: see clusters.hpp.
#include "gradmap/encoding/clusters.hpp"

#include <boost/math/distributions/students_t.hpp>

#include <cmath>

namespace gradmap::encoding {

ClusterGraph make_cluster_graph(std::int64_t sensors, std::int64_t times,
                                const std::vector<std::int32_t>& adjacency) {
  ClusterGraph g{sensors, times, {}};
  if (adjacency.empty())
    return g;
  g.sensor_neighbours.resize(static_cast<size_t>(sensors));
  for (std::int64_t a = 0; a < sensors; ++a)
    for (std::int64_t b = 0; b < sensors; ++b)
      if (a != b && adjacency[a * sensors + b])
        g.sensor_neighbours[a].push_back(std::int32_t(b));
  return g;
}

std::vector<std::int64_t> find_clusters(const ClusterGraph& g,
                                        const std::function<bool(std::int64_t)>& above,
                                        std::vector<std::int32_t>* labels) {
  const std::int64_t T = g.sensors * g.times;
  std::vector<std::int32_t> own;
  std::vector<std::int32_t>& lab = labels ? *labels : own;
  lab.assign(static_cast<size_t>(T), -1);
  std::vector<std::int64_t> sizes, stack;
  for (std::int64_t start = 0; start < T; ++start) {
    if (lab[start] >= 0 || !above(start))
      continue;
    const auto id = std::int32_t(sizes.size());
    std::int64_t size = 0;
    lab[start] = id;
    stack.assign(1, start);
    while (!stack.empty()) { // depth-first flood fill
      const std::int64_t v = stack.back();
      stack.pop_back();
      ++size;
      const std::int64_t s = v / g.times, t = v % g.times;
      auto visit = [&](std::int64_t u) {
        if (lab[u] < 0 && above(u)) {
          lab[u] = id;
          stack.push_back(u);
        }
      };
      if (t > 0)
        visit(v - 1);
      if (t + 1 < g.times)
        visit(v + 1);
      if (!g.sensor_neighbours.empty())
        for (std::int32_t n : g.sensor_neighbours[s])
          visit(std::int64_t(n) * g.times + t);
    }
    sizes.push_back(size);
  }
  return sizes;
}

double cluster_threshold(std::int64_t m, double p) {
  const boost::math::students_t dist(double(m - 2));
  const double t = boost::math::quantile(boost::math::complement(dist, p));
  return t / std::sqrt(double(m - 2) + t * t);
}

} // namespace gradmap::encoding
