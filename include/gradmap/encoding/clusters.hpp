#pragma once
// Clusters of supra-threshold targets on the MEG sensor x time grid, for cluster-based permutation
// tests (Maris & Oostenveld 2007; MNE-Python's permutation_cluster_test). Targets are flattened
// sensor-major (target = sensor * times + time, as in scores.h5); two targets are neighbours when
// they are the same sensor at adjacent time samples, or adjacent sensors (sensor_neighbours) at the
// same time sample. Without sensor positions the clusters are time-only (no sensor neighbours).
// The cluster statistic is the extent (number of targets), MNE's t_power = 0.
#include <cstdint>
#include <functional>
#include <vector>

namespace gradmap::encoding {

struct ClusterGraph {
  std::int64_t sensors = 0, times = 0;
  std::vector<std::vector<std::int32_t>> sensor_neighbours; ///< empty: time-only clusters
};

/// Not collective. The graph of `sensors` x `times` targets; `adjacency` is [sensors, sensors]
/// (non-zero = neighbours, the diagonal ignored), or empty for time-only clusters.
ClusterGraph make_cluster_graph(std::int64_t sensors, std::int64_t times,
                                const std::vector<std::int32_t>& adjacency);

/// Not collective. Connected components of {target : above(target)}; returns their sizes in the
/// order of their smallest target, and (when labels is given) labels[target] = component index
/// or -1.
std::vector<std::int64_t> find_clusters(const ClusterGraph& g,
                                        const std::function<bool(std::int64_t)>& above,
                                        std::vector<std::int32_t>* labels = nullptr);

/// Not collective. The cluster-forming threshold on r for m test images: the r whose one-sided
/// Student-t p-value (m - 2 degrees of freedom) is p, r = t / sqrt(m - 2 + t^2).
double cluster_threshold(std::int64_t m, double p);

} // namespace gradmap::encoding
