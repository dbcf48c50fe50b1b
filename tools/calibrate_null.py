#!/usr/bin/python3
"""False-positive calibration of gradmap's statistics on the `null` simulated scenario.

On null data (no signal anywhere) every rejection is false. For each replicate: simulate a null
brain (both modalities) -> encode (permutations) -> stats, then record per modality
- `fwer_all`: any target rejected by the max-statistic FWER over all kinds x layers x targets
  (p_fwer_all < alpha): share <= alpha;
- `fwer_family`: per (kind, layer) family, any p_fwer < alpha (each family's share <= alpha; the
  table gives the largest family share and the mean);
- `fdr_all`: any BH rejection over all kinds x layers (q_bh_all < q): the realised FDR of a null
  run is 1 if it rejects anything, else 0, so the share must be <= q;
- `share_p`: the share of per-target p-values below alpha (expected alpha);
- MEG `cluster_family`: per (kind, layer) family (the family of the cluster test), any cluster with
  p < alpha;
- the divergence verdicts (D_space, D_time): `undetermined` expected, `diverges` at most alpha;
- `min_p_fwer_all`: the smallest p_fwer_all of the run, i.e. (1 + rank of the observed maximum
  among the B permutation maxima) / (B + 1). Under H0 that rank is uniform on {0..B}, so the
  whole distribution is checked (Kolmogorov-Smirnov against the discrete uniform, and the shares
  below 0.01, 0.05, 0.10), not only the count below alpha.
Shares are compared with alpha by their Wilson 95% interval and by the binomial tail
P(Binomial(n, alpha) >= k).

Stimuli and features are made once per base seed (simulate --seed S; extract) and each replicate
redraws only the brain's noise (simulate --noise-seed N), so hundreds of replicates fit this
machine. Replicates run as single-rank processes, --jobs at a time.

  tools/calibrate_null.py --replicates 500 --bases 5 --jobs 2 --out null.json [--markdown t.md]
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from calibrate_divergence import run, run_tasks, save_result, wilson  # noqa: E402

SIM = ["--images", "240", "--test-images", "60", "--image-size", "16", "--voxels", "300",
       "--sensors", "8", "--times", "36", "--repetitions", "2"]
KINDS = ("activations", "gradients")
STAT = {"fmri": "D_space", "meg": "D_time"}
MODALITIES = ("fmri", "meg")


def base(gradmap, work, seed):
    d = os.path.join(work, f"base-{seed}")
    if not os.path.exists(f"{d}/features.h5"):
        run(gradmap, ["simulate", "--out", d, "--scenario", "null", "--seed", str(seed), "--modality", "fmri", *SIM])
        run(gradmap, ["extract", "--stimuli", f"{d}/stimuli.h5", "--model", "builtin:tinycnn",
                      "--objective", "cross-entropy", "--pooling", "mean", "--out", f"{d}/features.h5"])
    return d


def replicate(gradmap, work, seed, noise_seed, permutations, bootstraps, alpha, q, modalities=MODALITIES):
    b = os.path.join(work, f"base-{seed}")
    d = os.path.join(work, f"r-{seed}-{noise_seed}")
    try:
        run(gradmap, ["simulate", "--out", d, "--scenario", "null", "--seed", str(seed), "--noise-seed",
                      str(noise_seed), "--modality", "both" if len(modalities) == 2 else modalities[0], *SIM])
        scores = []
        for mod in modalities:
            run(gradmap, ["encode", "--features", f"{b}/features.h5", "--brain", f"{d}/brain_{mod}.h5",
                          "--out", f"{d}/scores_{mod}.h5", "--permutations", str(permutations),
                          "--bootstraps", str(bootstraps), "--seed", str(noise_seed)])
            scores += ["--scores", f"{d}/scores_{mod}.h5"]
        run(gradmap, ["stats", *scores, "--out", f"{d}/stats", "--alpha", str(alpha), "--q", str(q)])
        summ = json.load(open(f"{d}/stats/summary.json"))
        out = {}
        with h5py.File(f"{d}/stats/stats.h5") as s:
            for mod in modalities:
                fam = []  # per (kind, layer): any p_fwer < alpha
                fw, qb, pp = [], [], []
                clus = []
                for k in KINDS:
                    g = s[f"/{mod}/{k}"]
                    fam += [bool(np.nanmin(row) < alpha) for row in g["p_fwer"][()]]
                    fw.append(g["p_fwer_all"][()].ravel())
                    qb.append(g["q_bh_all"][()].ravel())
                    pp.append(g["p"][()].ravel())
                    if "clusters" in g:
                        t = g["clusters"][()].reshape(-1, 5)
                        L = g["p"].shape[0]
                        clus += [bool(np.any((t[:, 0] == layer) & (t[:, 2] < alpha))) for layer in range(L)]
                pp = np.concatenate(pp)
                out[mod] = {"fwer_all": bool(np.nanmin(np.concatenate(fw)) < alpha),
                            "min_p_fwer_all": float(np.nanmin(np.concatenate(fw))),
                            "fdr_all": bool(np.nanmin(np.concatenate(qb)) < q),
                            "fwer_family": fam,
                            "share_p": float(np.mean(pp[np.isfinite(pp)] < alpha)),
                            "verdict": summ[mod][STAT[mod]]["verdict"]}
                if clus:
                    out[mod]["cluster_family"] = clus
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def binom_tail(k, n, p):
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    # in log space: the binomial coefficients of n in the thousands overflow a float
    lg = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
          + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(lg)
    return float(min(1.0, math.exp(top) * sum(math.exp(x - top) for x in lg)))


def rank_uniformity(min_p, permutations):
    """The ranks k = (B + 1) p - 1 of the observed maxima, tested against the discrete uniform on
    {0..B}: the KS distance sup |F_n - F| over the support and its asymptotic p-value (slightly
    conservative for a discrete law), and the shares of p <= 0.01, 0.05, 0.10 (expected: those
    levels rounded down to the grid of 1/(B + 1))."""
    B = permutations
    k = np.rint(np.asarray(min_p) * (B + 1) - 1).astype(int)
    n = len(k)
    grid = np.arange(B + 1)
    emp = np.searchsorted(np.sort(k), grid, side="right") / n
    d = float(np.max(np.abs(emp - (grid + 1) / (B + 1))))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p_ks = float(min(1.0, 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))))
    levels = {}
    for a in (0.01, 0.05, 0.10):
        c = int(np.sum(np.asarray(min_p) <= a))
        levels[str(a)] = {"count": c, "share": c / n, "expected": math.floor(a * (B + 1)) / (B + 1),
                          "ci95": wilson(c, n)}
    return {"n": n, "ks_d": d, "ks_p": p_ks, "levels": levels}


def summarise(raw, alpha, permutations=None):
    res = {}
    n = len(raw)
    for mod in MODALITIES:
        if mod not in raw[0]:
            continue
        rs = [r[mod] for r in raw]
        row = {"n": n}
        for key in ("fwer_all", "fdr_all"):
            if key in rs[0]:
                k = sum(r[key] for r in rs)
                row[key] = {"count": k, "share": k / n, "ci95": wilson(k, n), "p_binom": binom_tail(k, n, alpha)}
        for key in ("fwer_family", "cluster_family"):
            if key in rs[0]:
                counts = np.sum([r[key] for r in rs], axis=0)
                kmax = int(counts.max())
                row[key] = {"counts": counts.tolist(), "max_share": kmax / n, "mean_share": float(counts.mean() / n),
                            "max_ci95": wilson(kmax, n),
                            # the largest of F families: compare with the F-fold Bonferroni tail
                            "p_binom_max": min(1.0, len(counts) * binom_tail(kmax, n, alpha))}
        row["mean_share_p"] = float(np.mean([r["share_p"] for r in rs]))
        if permutations and all("min_p_fwer_all" in r for r in rs):
            row["rank_uniformity"] = rank_uniformity([r["min_p_fwer_all"] for r in rs], permutations)
        v = [r["verdict"] for r in rs]
        row["verdicts"] = {x: v.count(x) for x in ("diverges", "consistent", "undetermined")}
        res[mod] = row
    return res


def calibrate(gradmap, replicates, bases=5, jobs=2, permutations=200, bootstraps=200, alpha=0.05, q=0.05,
              work=None, first_noise_seed=1000, log=sys.stderr, checkpoint=None, modalities=MODALITIES):
    work = work or tempfile.mkdtemp(prefix="gradmap-calibrate-null-")
    os.makedirs(work, exist_ok=True)
    seeds = list(range(1, bases + 1))
    for s in seeds:
        base(gradmap, work, s)
    tasks = [(seeds[r % bases], first_noise_seed + r) for r in range(replicates)]
    t0 = time.time()
    results = run_tasks(tasks, lambda t: replicate(gradmap, work, *t, permutations, bootstraps, alpha, q, modalities),
                        jobs, "calibrate_null", log, checkpoint)
    raw = [{"base_seed": s, "noise_seed": n, **out} for (s, n), out in results]
    shutil.rmtree(work, ignore_errors=True)
    return {"raw": raw, "summary": summarise(raw, alpha, permutations), "alpha": alpha, "q": q, "replicates": replicates,
            "base_seeds": bases, "permutations": permutations, "bootstraps": bootstraps, "size": SIM,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""), "seconds": round(time.time() - t0, 1)}


def markdown(res):
    a = res["alpha"]
    out = [f"| modality | test (false rejection on null data) | n | rejecting | share [95% CI] | P(Bin(n, {a}) >= k) |",
           "|---|---|---|---|---|---|"]
    names = {"fwer_all": "any target, max-statistic FWER over all kinds x layers",
             "fdr_all": "any target, BH over all kinds x layers (realised FDR)"}
    for mod in MODALITIES:
        if mod not in res["summary"]:
            continue
        row = res["summary"][mod]
        n = row["n"]
        for key, name in names.items():
            if key in row:
                r = row[key]
                out.append(f"| {mod} | {name} | {n} | {r['count']} | {r['share']:.3f} [{r['ci95'][0]:.3f}, "
                           f"{r['ci95'][1]:.3f}] | {r['p_binom']:.3f} |")
        for key, name in (("fwer_family", "FWER within (kind, layer)"), ("cluster_family", "cluster within (kind, layer)")):
            if key in row:
                r = row[key]
                out.append(f"| {mod} | {name}: worst of {len(r['counts'])} families (mean share "
                           f"{r['mean_share']:.3f}) | {n} | {max(r['counts'])} | {r['max_share']:.3f} "
                           f"[{r['max_ci95'][0]:.3f}, {r['max_ci95'][1]:.3f}] | {r['p_binom_max']:.3f} (x families) |")
        v = row["verdicts"]
        out.append(f"| {mod} | {STAT[mod]} verdict `diverges` (consistent {v['consistent']}, undetermined "
                   f"{v['undetermined']}) | {n} | {v['diverges']} | {v['diverges'] / n:.3f} | "
                   f"{binom_tail(v['diverges'], n, a):.3f} |")
        out.append(f"| {mod} | per-target p < alpha (mean share; expected {a}) | {n} | | {row['mean_share_p']:.4f} | |")
        if "rank_uniformity" in row:
            u = row["rank_uniformity"]
            for lev, c in u["levels"].items():
                out.append(f"| {mod} | min p_fwer_all <= {lev} (expected {c['expected']:.4f}) | {n} | {c['count']} | "
                           f"{c['share']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | "
                           f"{binom_tail(c['count'], n, c['expected']):.3f} |")
            out.append(f"| {mod} | rank of the observed maximum among the permutation maxima: KS vs uniform | {n} | | "
                       f"D = {u['ks_d']:.4f} | KS p = {u['ks_p']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=500)
    ap.add_argument("--bases", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--bootstraps", type=int, default=200)
    ap.add_argument("--first-noise-seed", type=int, default=1000)
    ap.add_argument("--gradmap", default=os.path.join(HERE, "..", "build", "src", "gradmap"))
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--markdown", help="the table as markdown")
    ap.add_argument("--modalities", default="fmri,meg", help="fmri, meg or both (comma-separated)")
    a = ap.parse_args()
    res = calibrate(a.gradmap, a.replicates, a.bases, a.jobs, a.permutations, a.bootstraps,
                    first_noise_seed=a.first_noise_seed, checkpoint=a.out + ".partial.jsonl" if a.out else None,
                    modalities=tuple(m for m in MODALITIES if m in a.modalities.split(",")))
    save_result(res, a.out)
    print(markdown(res))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(res) + "\n")
