#!/usr/bin/python3
"""False-positive calibration of gradmap's statistics on the `null` simulated scenario.

For each seed: simulate (no signal anywhere) -> extract -> encode (permutations) -> stats, then
record whether any target was rejected by the max-statistic FWER (p_fwer_all < alpha, the family
of all kinds x layers x targets of a modality) and by BH across all (q_bh_all < q). On null data
every rejection is false, so the realised FDR of a run is 1 if it rejects anything, else 0: both
shares must be <= alpha (q) within Monte-Carlo error.

  tools/calibrate_null.py --seeds 100 [--ranks 2] [--out DIR]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = ["--images", "240", "--test-images", "60", "--image-size", "16", "--voxels", "300",
       "--sensors", "8", "--times", "36", "--repetitions", "2"]


def run(gradmap, ranks, args):
    cmd = ["mpiexec", "-n", str(ranks), "--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
           gradmap, *args, "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")


def one_seed(gradmap, seed, ranks, work, permutations, alpha, q):
    d = os.path.join(work, f"seed{seed}")
    run(gradmap, ranks, ["simulate", "--out", d, "--scenario", "null", "--seed", str(seed), *SIM])
    run(gradmap, ranks, ["extract", "--stimuli", f"{d}/stimuli.h5", "--model", "builtin:tinycnn",
                         "--objective", "cross-entropy", "--pooling", "mean", "--out", f"{d}/features.h5"])
    scores = []
    for mod in ("fmri", "meg"):
        run(gradmap, ranks, ["encode", "--features", f"{d}/features.h5", "--brain", f"{d}/brain_{mod}.h5",
                             "--out", f"{d}/scores_{mod}.h5", "--permutations", str(permutations),
                             "--bootstraps", "10", "--seed", str(seed)])
        scores += ["--scores", f"{d}/scores_{mod}.h5"]
    run(gradmap, ranks, ["stats", *scores, "--out", f"{d}/stats", "--alpha", str(alpha), "--q", str(q)])
    out = {}
    with h5py.File(f"{d}/stats/stats.h5") as s:
        for mod in ("fmri", "meg"):
            fw = np.concatenate([s[f"/{mod}/{k}/p_fwer_all"][()].ravel() for k in ("activations", "gradients")])
            qb = np.concatenate([s[f"/{mod}/{k}/q_bh_all"][()].ravel() for k in ("activations", "gradients")])
            pp = np.concatenate([s[f"/{mod}/{k}/p"][()].ravel() for k in ("activations", "gradients")])
            out[mod] = {"fwer_reject": bool(np.nanmin(fw) < alpha), "fdr_reject": bool(np.nanmin(qb) < q),
                        "share_p_below_alpha": float(np.nanmean(pp < alpha))}
    shutil.rmtree(d)
    return out


def calibrate(gradmap, seeds, ranks=2, permutations=200, alpha=0.05, q=0.05, work=None):
    work = work or tempfile.mkdtemp(prefix="gradmap-calibrate-")
    runs = [one_seed(gradmap, s, ranks, work, permutations, alpha, q) for s in seeds]
    res = {"seeds": list(seeds), "alpha": alpha, "q": q, "permutations": permutations}
    for mod in ("fmri", "meg"):
        n = len(runs)
        for key in ("fwer_reject", "fdr_reject"):
            k = sum(r[mod][key] for r in runs)
            res[f"{mod}_{key}_share"] = k / n
            res[f"{mod}_{key}_count"] = k
        res[f"{mod}_mean_share_p_below_alpha"] = float(np.mean([r[mod]["share_p_below_alpha"] for r in runs]))
    res["mc_se_at_alpha"] = math.sqrt(alpha * (1 - alpha) / len(runs))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--gradmap", default=os.path.join(HERE, "..", "build", "src", "gradmap"))
    a = ap.parse_args()
    r = calibrate(a.gradmap, range(a.first_seed, a.first_seed + a.seeds), a.ranks, a.permutations)
    json.dump(r, sys.stdout, indent=1)
    print()
