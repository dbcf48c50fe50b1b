#pragma once
// Resumable encode (docs/design.md, "Resume"): after every round each rank saves what it has
// accumulated beyond the rows already in OUT.partial (the null accumulators and the counts of
// excluded targets) to its own file OUT.partial.rank<R>.round<N>, written whole and then
// renamed, so a killed run finds either a complete checkpoint or none.
#include <cstdint>
#include <string>
#include <vector>

#include "gradmap/encoding/nulls.hpp"

namespace gradmap::encoding {

/// What one rank carries from round to round.
struct RankState {
  std::vector<NullAccumulator>* acc = nullptr;
  std::int64_t* constant = nullptr;
  std::int64_t* nonfinite = nullptr;
  std::vector<std::int64_t>* nonfinite_examples = nullptr;
};

/// The checkpoint file of `rank` after `rounds` completed rounds of the output `out`.
std::string checkpoint_path(const std::string& out, int rank, std::int64_t rounds);

/// Not collective. Writes the state to checkpoint_path(out, rank, rounds) (via a temporary name).
void save_checkpoint(const std::string& out, int rank, std::int64_t rounds, const std::string& key,
                     const RankState& s);

/// Not collective. Reads the state saved by save_checkpoint into s (whose accumulators must have
/// the saved sizes); false, leaving s unspecified, when the file is missing, was written under
/// another key, or does not match s's sizes.
bool load_checkpoint(const std::string& out, int rank, std::int64_t rounds, const std::string& key,
                     RankState& s);

/// Not collective. Removes this rank's checkpoint files of `out` (any round).
void remove_checkpoints(const std::string& out, int rank);

} // namespace gradmap::encoding
