#!/usr/bin/python3
"""Calibration of gradmap's divergence verdicts (D_space on fMRI, D_time on MEG) on simulated
brains with a planted answer, over many noise draws, SNRs and two reference networks.

Every verdict is a claim that must hold its level:
- on `aligned` data (a brain where a biological backprop's predictions hold) every `diverges`
  verdict is false: its share must be <= alpha within Monte-Carlo error;
- on `misaligned` data every `consistent` verdict is false: same bound;
- the share of `diverges` on `misaligned` data is the power (target >= 0.8 at the default SNR).

For each network and base seed the stimuli, features and planted structure are made once
(simulate --seed S; extract), and each replicate redraws only the trial noise
(simulate --noise-seed N); one simulation serves an fMRI and a MEG cell (SNR level i of each).
Replicates run as single-rank processes, --jobs at a time.

  tools/calibrate_divergence.py --replicates 100 --jobs 2 --out calib.json [--markdown table.md]
  tools/calibrate_divergence.py --regroup a.json b.json [--out all.json]   (merge saved runs, tables)

Group inference (4 and 8 subjects) is checked on the same replicates: disjoint sets of S noise
draws of a cell play S subjects and get the verdict of `gradmap aggregate`.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = ["--images", "600", "--test-images", "100", "--image-size", "16", "--voxels", "400",
        "--sensors", "32", "--times", "36", "--repetitions", "2"]
DEFAULT_SNR = {"fmri": [0.5, 0.1, 0.05], "meg": [0.5, 0.08, 0.04]}
STAT = {"fmri": "D_space", "meg": "D_time"}


def run(gradmap, args, env_extra=None):
    # GRADMAP_HUGEPAGES=0: no re-execution at start-up (it doubles the ~0.6 s start of a process)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", GRADMAP_HUGEPAGES="0",
               **(env_extra or {}))
    p = subprocess.run([gradmap, *args, "--quiet", "--threads", "1"], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"gradmap {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")


def base(gradmap, work, network, seed):
    """Stimuli and features of one network and base seed (made once, reused by every replicate)."""
    d = os.path.join(work, f"{network}-{seed}")
    if not os.path.exists(f"{d}/features.h5"):
        run(gradmap, ["simulate", "--out", d, "--scenario", "null", "--seed", str(seed), "--modality", "fmri",
                      "--model", f"builtin:{network}", *SIZE])
        run(gradmap, ["extract", "--stimuli", f"{d}/stimuli.h5", "--model", f"builtin:{network}",
                      "--objective", "cross-entropy", "--pooling", "mean", "--out", f"{d}/features.h5"])
    return d


def replicate(gradmap, work, network, seed, noise_seed, scenario, snrs, permutations, bootstraps, alpha):
    """One noise draw of both modalities (fMRI at snrs["fmri"], MEG at snrs["meg"]) -> per
    modality the verdict, its p-values and whether its interval contains the estimate."""
    b = os.path.join(work, f"{network}-{seed}")
    d = os.path.join(work, f"r-{network}-{seed}-{noise_seed}-{scenario}-{snrs['fmri']}-{snrs['meg']}")
    try:
        run(gradmap, ["simulate", "--out", d, "--scenario", scenario, "--seed", str(seed), "--noise-seed",
                      str(noise_seed), "--modality", "both", "--model", f"builtin:{network}", "--snr",
                      str(snrs["fmri"]), "--meg-snr", str(snrs["meg"]), *SIZE])
        scores = []
        for mod in ("fmri", "meg"):
            run(gradmap, ["encode", "--features", f"{b}/features.h5", "--brain", f"{d}/brain_{mod}.h5",
                          "--out", f"{d}/scores_{mod}.h5", "--permutations", str(permutations), "--bootstraps",
                          str(bootstraps), "--seed", str(noise_seed)])
            scores += ["--scores", f"{d}/scores_{mod}.h5"]
        run(gradmap, ["stats", *scores, "--out", f"{d}/stats", "--alpha", str(alpha)])
        summ = json.load(open(f"{d}/stats/summary.json"))
        out = {}
        for mod in ("fmri", "meg"):
            st = summ[mod][STAT[mod]]
            lo, hi = st["ci"]
            out[mod] = {"verdict": st["verdict"], "p": st["p"], "p_consistent": st["p_consistent"],
                        "p_signal_activations": st["p_signal_activations"],
                        "p_signal_gradients": st["p_signal_gradients"],
                        "value": st["value"], "ci": [lo, hi], "ci_extended": st["ci_extended"]}
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wilson(k, n, z=1.96):
    if n == 0:
        return [None, None]
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, c - h), min(1.0, c + h)]


def calibrate(gradmap, networks, scenarios, snrs, replicates, bases=5, jobs=2, permutations=200,
              bootstraps=200, alpha=0.05, work=None, log=sys.stderr):
    """snrs: {"fmri": [...], "meg": [...]} of equal length; level i of both is one simulation."""
    work = work or tempfile.mkdtemp(prefix="gradmap-calib-div-")
    os.makedirs(work, exist_ok=True)
    seeds = list(range(1, bases + 1))
    tasks = []
    for net in networks:
        for s in seeds:
            base(gradmap, work, net, s)
        for sc in scenarios:
            for snr in zip(snrs["fmri"], snrs["meg"]):
                for r in range(replicates):
                    # replicate r uses base seed r mod bases and its own noise seed
                    tasks.append((net, seeds[r % bases], 1000 + r, sc, {"fmri": snr[0], "meg": snr[1]}))
    t0, done = time.time(), [0]

    def one(t):
        out = replicate(gradmap, work, *t, permutations, bootstraps, alpha)
        done[0] += 1
        if done[0] % 50 == 0 or done[0] == len(tasks):
            el = time.time() - t0
            print(f"calibrate: {done[0]}/{len(tasks)} replicates, {done[0] / el:.2f}/s, "
                  f"ETA {el / done[0] * (len(tasks) - done[0]):.0f} s", file=log, flush=True)
        return t, out

    with ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(one, tasks))
    raw = [{"network": net, "base_seed": s, "noise_seed": n, "scenario": sc, "snr": snr, **both}
           for (net, s, n, sc, snr), both in results]
    shutil.rmtree(work, ignore_errors=True)
    return {"raw": raw, "cells": summarise(raw), "alpha": alpha, "replicates_per_cell": replicates,
            "base_seeds": bases, "permutations": permutations, "bootstraps": bootstraps, "size": SIZE,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""), "seconds": round(time.time() - t0, 1)}


def summarise(raw):
    """Per (network, modality, scenario, SNR): the counts and shares of each verdict."""
    cells = {}
    for r in raw:
        for mod in ("fmri", "meg"):
            out = r[mod]
            c = cells.setdefault((r["network"], mod, r["scenario"], r["snr"][mod]),
                                 {"n": 0, "diverges": 0, "consistent": 0, "undetermined": 0, "ci_extended": 0})
            c["n"] += 1
            c[out["verdict"]] += 1
            c["ci_extended"] += bool(out["ci_extended"])
    rows = []
    for (net, mod, sc, snr), c in sorted(cells.items()):
        n = c["n"]
        row = {"network": net, "modality": mod, "statistic": STAT[mod], "scenario": sc, "snr": snr, **c}
        for v in ("diverges", "consistent", "undetermined"):
            row[f"{v}_share"] = c[v] / n
            row[f"{v}_ci95"] = wilson(c[v], n)
        rows.append(row)
    return rows


def merge(paths):
    """Several saved runs (e.g. one per scenario or network) as one result."""
    runs = [json.load(open(p)) for p in paths]
    res = dict(runs[0])
    res["raw"] = [r for run in runs for r in run["raw"]]
    res["cells"] = summarise(res["raw"])
    res["seconds"] = sum(run["seconds"] for run in runs)
    return res


def fisher(ps):
    """Fisher's combination (as gradmap aggregate): P(chi2(2S) >= -2 sum ln p)."""
    if any(p is None or not (0 <= p <= 1) for p in ps):
        return 1.0
    half = -sum(math.log(max(p, 1e-300)) for p in ps)
    term = total = 1.0
    for k in range(1, len(ps)):
        term *= half / k
        total += term
    return min(1.0, math.exp(-half) * total)


def group_verdict(subjects, alpha, permutations, bootstraps):
    """The group verdict of `gradmap aggregate` from per-subject results (p-values floored at the
    resolution of their replicates)."""
    def fl(p, f):
        return 1.0 if p is None else max(p, f)
    fb, fp = 1 / (bootstraps + 1), 1 / (permutations + 1)
    p_div = fisher([fl(s["p"], fb) for s in subjects])
    p_cons = max(fl(s["p_consistent"], 0) for s in subjects)
    p_sa = fisher([fl(s["p_signal_activations"], fp) for s in subjects])
    p_sg = fisher([fl(s["p_signal_gradients"], fp) for s in subjects])
    if not (p_sa < alpha and p_sg < alpha):
        return "undetermined"
    return "consistent" if p_cons < alpha else "diverges" if p_div < alpha else "undetermined"


def group_rates(res, sizes=(4, 8)):
    """Group inference checked by simulation: the replicates of a cell, taken S at a time
    (disjoint sets: independent noise draws as subjects), give group verdicts."""
    cells = {}
    for r in res["raw"]:
        for mod in ("fmri", "meg"):
            cells.setdefault((r["network"], mod, r["scenario"], r["snr"][mod]), []).append(r[mod])
    rows = []
    for (net, mod, sc, snr), subs in sorted(cells.items()):
        for S in sizes:
            groups = [subs[i:i + S] for i in range(0, len(subs) - S + 1, S)]
            if not groups:
                continue
            v = [group_verdict(g, res["alpha"], res["permutations"], res["bootstraps"]) for g in groups]
            row = {"network": net, "modality": mod, "statistic": STAT[mod], "scenario": sc, "snr": snr,
                   "subjects": S, "n": len(groups)}
            for name in ("diverges", "consistent", "undetermined"):
                row[name] = v.count(name)
                row[f"{name}_share"] = v.count(name) / len(groups)
                row[f"{name}_ci95"] = wilson(v.count(name), len(groups))
            rows.append(row)
    return rows


def markdown_groups(rows):
    out = ["| network | statistic | scenario | SNR | subjects | groups | diverges | consistent | undetermined |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['network']} | {r['statistic']} | {r['scenario']} | {r['snr']} | {r['subjects']} | "
                   f"{r['n']} | {r['diverges']} | {r['consistent']} | {r['undetermined']} |")
    return "\n".join(out)


def markdown(res):
    out = ["| network | statistic | scenario | SNR | n | diverges | consistent | undetermined | BC interval extended |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["cells"]:
        def f(v):
            lo, hi = r[f"{v}_ci95"]
            return f"{r[v + '_share']:.3f} [{lo:.3f}, {hi:.3f}]"
        out.append(f"| {r['network']} | {r['statistic']} | {r['scenario']} | {r['snr']} | {r['n']} | "
                   f"{f('diverges')} | {f('consistent')} | {f('undetermined')} | {r['ci_extended']}/{r['n']} |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gradmap", default=os.path.join(HERE, "..", "build", "src", "gradmap"))
    ap.add_argument("--networks", default="tinycnn,deepcnn")
    ap.add_argument("--scenarios", default="aligned,misaligned")
    ap.add_argument("--fmri-snr", default=",".join(map(str, DEFAULT_SNR["fmri"])))
    ap.add_argument("--meg-snr", default=",".join(map(str, DEFAULT_SNR["meg"])))
    ap.add_argument("--replicates", type=int, default=100, help="noise draws per cell")
    ap.add_argument("--bases", type=int, default=5, help="base seeds (stimuli + planted structure)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--bootstraps", type=int, default=200)
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--markdown", help="the table as markdown")
    ap.add_argument("--regroup", nargs="+", help="saved JSON results: merge them, print the tables (with "
                    "the group rates) and exit")
    a = ap.parse_args()
    if a.regroup:
        res = merge(a.regroup)
        res["groups"] = group_rates(res)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        print(markdown(res))
        print()
        print(markdown_groups(res["groups"]))
        sys.exit(0)
    snrs = {"fmri": [float(x) for x in a.fmri_snr.split(",")], "meg": [float(x) for x in a.meg_snr.split(",")]}
    if len(snrs["fmri"]) != len(snrs["meg"]):
        sys.exit("--fmri-snr and --meg-snr need the same number of levels (one simulation each)")
    res = calibrate(a.gradmap, a.networks.split(","), a.scenarios.split(","), snrs,
                    a.replicates, a.bases, a.jobs, a.permutations, a.bootstraps)
    res["groups"] = group_rates(res)
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(markdown(res))
    print()
    print(markdown_groups(res["groups"]))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(res) + "\n\n" + markdown_groups(res["groups"]) + "\n")
