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

--joint: encode --joint too; the verdicts on the gradients' unique variance (D_space_unique,
D_time_unique) get their own rows, and the significance table adds the runs with any target of
significant unique gradient variance (BH across its layers), which on `activations-only` brains
are all false (<= q expected), beside the raw-gradient rate (the confound).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import h5py
import numpy as np
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = ["--images", "600", "--test-images", "100", "--image-size", "16", "--voxels", "400",
        "--sensors", "32", "--times", "36", "--repetitions", "2"]
DEFAULT_SNR = {"fmri": [0.5, 0.1, 0.05], "meg": [0.5, 0.08, 0.04]}
STAT = {"fmri": "D_space", "meg": "D_time"}


def MODS(r):
    """The modalities a replicate (raw row) has."""
    return [m for m in ("fmri", "meg") if m in r]


def run(gradmap, args, env_extra=None):
    # GRADMAP_HUGEPAGES=0: no re-execution at start-up (it doubles the ~0.6 s start of a process)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", GRADMAP_HUGEPAGES="0",
               **(env_extra or {}))
    p = subprocess.run([gradmap, *args, "--quiet", "--threads", "1"], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"gradmap {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")


def save_result(res, out):
    """The JSON result at `out` (if given); its checkpoint is then no longer needed."""
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        if os.path.exists(out + ".partial.jsonl"):
            os.remove(out + ".partial.jsonl")


def run_tasks(tasks, fn, jobs, label, log, checkpoint=None):
    """[(task, fn(task))] with `jobs` at a time; progress (done/total, rate, ETA) every 50.
    checkpoint: a JSON-lines file of finished tasks, appended as they finish and read back at
    the start, so that a killed run resumes where it stopped."""
    key = lambda t: json.dumps(t, sort_keys=True)  # noqa: E731
    finished = {}
    if checkpoint and os.path.exists(checkpoint):
        for line in open(checkpoint):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            finished[key(rec["task"])] = rec["out"]
        with open(checkpoint, "rb+") as f:  # end a line cut by the kill before appending
            f.seek(0, 2)
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    todo = [t for t in tasks if key(list(t)) not in finished]
    if finished:
        print(f"{label}: resuming, {len(tasks) - len(todo)} of {len(tasks)} replicates done", file=log, flush=True)
    t0, done, lock = time.time(), [0], threading.Lock()

    def one(t):
        out = fn(t)
        with lock:
            done[0] += 1
            if checkpoint:
                with open(checkpoint, "a") as f:
                    f.write(json.dumps({"task": list(t), "out": out}) + "\n")
            if done[0] % 50 == 0 or done[0] == len(todo):
                el = time.time() - t0
                print(f"{label}: {done[0]}/{len(todo)} replicates, {done[0] / el:.2f}/s, "
                      f"ETA {el / done[0] * (len(todo) - done[0]):.0f} s", file=log, flush=True)
        finished[key(list(t))] = out
        return out

    with ThreadPoolExecutor(jobs) as ex:
        list(ex.map(one, todo))
    return [(t, finished[key(list(t))]) for t in tasks]


def test_images(size):
    return int(size[size.index("--test-images") + 1])


def base_dir(work, network, seed, size):
    return os.path.join(work, f"{network}-{seed}-m{test_images(size)}-{zlib.crc32(' '.join(size).encode())}")


def base(gradmap, work, network, seed, size=SIZE):
    """Stimuli and features of one network and base seed (made once, reused by every replicate)."""
    d = base_dir(work, network, seed, size)
    if not os.path.exists(f"{d}/features.h5"):
        run(gradmap, ["simulate", "--out", d, "--scenario", "null", "--seed", str(seed), "--modality", "fmri",
                      "--model", f"builtin:{network}", *size])
        run(gradmap, ["extract", "--stimuli", f"{d}/stimuli.h5", "--model", f"builtin:{network}",
                      "--objective", "cross-entropy", "--pooling", "mean", "--out", f"{d}/features.h5"])
    return d


def scenario_args(scenario):
    """simulate's options for a scenario name; boundary brains of aligned are written
    aligned+shiftK (each voxel's gradient layer K layers from its activation layer) and
    aligned+flat / aligned+gap0 (the gradients' timing), e.g. aligned+shift1+flat."""
    parts = scenario.split("+")
    args = ["--scenario", parts[0]]
    for x in parts[1:]:
        if x.startswith("shift"):
            args += ["--gradient-shift", x[5:]]
        elif x in ("flat", "gap0"):
            args += ["--gradient-timing", x]
        else:
            raise ValueError(f"unknown scenario part {x!r} in {scenario!r}")
    return args


def replicate(gradmap, work, network, seed, noise_seed, scenario, snrs, permutations, bootstraps, alpha,
              size=SIZE, modalities=("fmri", "meg"), joint=False):
    """One noise draw of the modalities (fMRI at snrs["fmri"], MEG at snrs["meg"]) -> per
    modality the verdict, its p-values and whether its interval contains the estimate."""
    b = base_dir(work, network, seed, size)
    d = os.path.join(work, f"r-{os.path.basename(b)}-{noise_seed}-{scenario}-{snrs['fmri']}-{snrs['meg']}")
    both = len(modalities) == 2
    try:
        run(gradmap, ["simulate", "--out", d, *scenario_args(scenario), "--seed", str(seed), "--noise-seed",
                      str(noise_seed), "--modality", "both" if both else modalities[0], "--model",
                      f"builtin:{network}", "--snr", str(snrs["fmri"]), "--meg-snr", str(snrs["meg"]), *size])
        scores = []
        for mod in modalities:
            run(gradmap, ["encode", "--features", f"{b}/features.h5", "--brain", f"{d}/brain_{mod}.h5",
                          "--out", f"{d}/scores_{mod}.h5", "--permutations", str(permutations), "--bootstraps",
                          str(bootstraps), "--seed", str(noise_seed), *(["--joint"] if joint else [])])
            scores += ["--scores", f"{d}/scores_{mod}.h5"]
        run(gradmap, ["stats", *scores, "--out", f"{d}/stats", "--alpha", str(alpha)])
        summ = json.load(open(f"{d}/stats/summary.json"))
        out = {}
        for mod in modalities:
            st = summ[mod][STAT[mod]]
            lo, hi = st["ci"]
            out[mod] = {"verdict": st["verdict"], "p": st["p"], "p_consistent": st["p_consistent"],
                        "p_signal_activations": st["p_signal_activations"],
                        "p_signal_gradients": st["p_signal_gradients"],
                        "value": st["value"], "ci": [lo, hi], "ci_extended": st["ci_extended"]}
            if "D_space_voxels" in summ[mod]:  # voxel level: counts of tested / diverges / consistent
                out[mod]["voxels"] = summ[mod]["D_space_voxels"]["all"]
            if STAT[mod] + "_unique" in summ[mod]:
                su = summ[mod][STAT[mod] + "_unique"]
                out[mod]["unique"] = {"verdict": su["verdict"], "p": su["p"], "p_consistent": su["p_consistent"],
                                      "ci_extended": su["ci_extended"]}
        with h5py.File(f"{d}/stats/stats.h5") as s:  # targets significant anywhere (BH across all)
            for mod in modalities:
                out[mod]["significant"] = {k: int((np.nanmin(s[f"/{mod}/{k}/q_bh_all"][()], 0) < 0.05).sum())
                                           for k in ("activations", "gradients", "unique_gradients")
                                           if f"/{mod}/{k}/q_bh_all" in s}
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
              bootstraps=200, alpha=0.05, work=None, log=sys.stderr, size=SIZE, modalities=("fmri", "meg"),
              checkpoint=None, joint=False):
    """snrs: {"fmri": [...], "meg": [...]} of equal length; level i of both is one simulation
    (of the modalities asked for; the other's level is then ignored)."""
    work = work or tempfile.mkdtemp(prefix="gradmap-calib-div-")
    os.makedirs(work, exist_ok=True)
    seeds = list(range(1, bases + 1))
    tasks = []
    for net in networks:
        for s in seeds:
            base(gradmap, work, net, s, size)
        for sc in scenarios:
            for snr in zip(snrs["fmri"], snrs["meg"]):
                for r in range(replicates):
                    # replicate r uses base seed r mod bases and its own noise seed
                    tasks.append((net, seeds[r % bases], 1000 + r, sc, {"fmri": snr[0], "meg": snr[1]}))
    t0 = time.time()
    results = run_tasks(tasks, lambda t: replicate(gradmap, work, *t, permutations, bootstraps, alpha, size,
                                                   modalities, joint), jobs, "calibrate", log, checkpoint)
    raw = [{"network": net, "test_images": test_images(size), "base_seed": s, "noise_seed": n, "scenario": sc,
            "snr": snr, **both}
           for (net, s, n, sc, snr), both in results]
    shutil.rmtree(work, ignore_errors=True)
    return {"raw": raw, "cells": summarise(raw), "alpha": alpha, "replicates_per_cell": replicates,
            "base_seeds": bases, "permutations": permutations, "bootstraps": bootstraps, "size": size,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""), "seconds": round(time.time() - t0, 1)}


def summarise(raw):
    """Per (network, test images, modality, scenario, SNR): the counts and shares of each verdict."""
    cells = {}
    for r in raw:
        for mod in MODS(r):
            for stat, out in ((STAT[mod], r[mod]), (STAT[mod] + "_unique", r[mod].get("unique"))):
                if out is None:
                    continue
                c = cells.setdefault((r["network"], r.get("test_images", 100), mod, stat, r["scenario"],
                                      r["snr"][mod]),
                                     {"n": 0, "diverges": 0, "consistent": 0, "undetermined": 0, "ci_extended": 0})
                c["n"] += 1
                c[out["verdict"]] += 1
                c["ci_extended"] += bool(out["ci_extended"])
    rows = []
    for (net, m, mod, stat, sc, snr), c in sorted(cells.items()):
        n = c["n"]
        row = {"network": net, "test_images": m, "modality": mod, "statistic": stat, "scenario": sc,
               "snr": snr, **c}
        for v in ("diverges", "consistent", "undetermined"):
            row[f"{v}_share"] = c[v] / n
            row[f"{v}_ci95"] = wilson(c[v], n)
        rows.append(row)
    return rows


def voxel_rates(res):
    """Voxel-level space verdicts (BH at q across the voxels tested): per cell the share of
    replicates with any voxel `diverges` / `consistent` (on aligned brains every diverging voxel
    is false, so that share is the realised FDR and must be <= q; on misaligned brains every
    consistent voxel in an ROI whose gradients are elsewhere is false) and the mean counts."""
    cells = {}
    for r in res["raw"]:
        v = r.get("fmri", {}).get("voxels")
        if v is not None:
            cells.setdefault((r["network"], r.get("test_images", 100), r["scenario"], r["snr"]["fmri"]), []).append(v)
    rows = []
    for (net, m, sc, snr), vs in sorted(cells.items()):
        n = len(vs)
        row = {"network": net, "test_images": m, "scenario": sc, "snr": snr, "n": n,
               "mean_tested": sum(v["tested"] for v in vs) / n}
        for name in ("diverges", "consistent"):
            k = sum(v[name] > 0 for v in vs)
            row[f"any_{name}"] = k
            row[f"any_{name}_ci95"] = wilson(k, n)
            row[f"mean_{name}"] = sum(v[name] for v in vs) / n
        rows.append(row)
    return rows


def markdown_voxels(rows):
    out = ["| network | test images | scenario | SNR | n | voxels tested (mean) | runs with a voxel `diverges` "
           "[95% CI] | mean voxels `diverges` | runs with a voxel `consistent` | mean voxels `consistent` |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["any_diverges_ci95"]
        out.append(f"| {r['network']} | {r['test_images']} | {r['scenario']} | {r['snr']} | {r['n']} | "
                   f"{r['mean_tested']:.0f} | {r['any_diverges']} [{lo:.3f}, {hi:.3f}] | {r['mean_diverges']:.1f} | "
                   f"{r['any_consistent']} | {r['mean_consistent']:.1f} |")
    return "\n".join(out)


def tables(res):
    text = markdown(res) + "\n\n" + markdown_groups(res["groups"])
    if res.get("voxels"):
        text += "\n\n" + markdown_voxels(res["voxels"])
    sig = significance_rates(res)
    if sig:
        text += "\n\n" + markdown_significance(sig)
    return text


def significance_rates(res):
    """Per cell: the share of replicates with any target significant (BH at 0.05 across all kinds
    and layers) for each kind. On `activations-only` brains every significant gradient target is
    a raw gradient score re-encoding the activations (the confound of the unique-variance issue)."""
    cells = {}
    for r in res["raw"]:
        for mod in MODS(r):
            if "significant" in r[mod]:
                cells.setdefault((r["network"], r.get("test_images", 100), mod, r["scenario"], r["snr"][mod]),
                                 []).append(r[mod]["significant"])
    rows = []
    for (net, m, mod, sc, snr), v in sorted(cells.items()):
        row = {"network": net, "test_images": m, "modality": mod, "scenario": sc, "snr": snr, "n": len(v)}
        for k in ("activations", "gradients", "unique_gradients"):
            if all(k in x for x in v):
                row[f"any_{k}"] = sum(x[k] > 0 for x in v)
                row[f"mean_{k}"] = sum(x[k] for x in v) / len(v)
                row[f"any_{k}_ci95"] = wilson(row[f"any_{k}"], len(v))
        rows.append(row)
    return rows


def markdown_significance(rows):
    out = ["| network | test images | modality | scenario | SNR | n | runs with significant activations | "
           "runs with significant raw gradients | mean significant gradient targets | runs with significant "
           "unique gradient variance [95% CI] | mean targets with unique variance |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "any_unique_gradients" in r:
            lo, hi = r["any_unique_gradients_ci95"]
            u = (f"{r['any_unique_gradients']} ({r['any_unique_gradients'] / r['n']:.3f} [{lo:.3f}, {hi:.3f}]) | "
                 f"{r['mean_unique_gradients']:.1f}")
        else:
            u = "- | -"
        out.append(f"| {r['network']} | {r['test_images']} | {r['modality']} | {r['scenario']} | {r['snr']} | "
                   f"{r['n']} | {r['any_activations']} | {r['any_gradients']} | {r['mean_gradients']:.1f} | {u} |")
    return "\n".join(out)


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
    """Group inference checked by simulation: within one base seed (the same stimuli, network
    features and planted structure, as real subjects who saw the same images), the replicates of
    a cell taken S at a time (disjoint sets of noise draws as subjects) give group verdicts."""
    cells = {}
    for r in res["raw"]:
        for mod in MODS(r):
            cells.setdefault((r["network"], r.get("test_images", 100), mod, r["scenario"], r["snr"][mod]),
                             {}).setdefault(r["base_seed"], []).append(r[mod])
    rows = []
    for (net, m, mod, sc, snr), by_base in sorted(cells.items()):
        for S in sizes:
            groups = [subs[i:i + S] for _, subs in sorted(by_base.items())
                      for i in range(0, len(subs) - S + 1, S)]
            if not groups:
                continue
            v = [group_verdict(g, res["alpha"], res["permutations"], res["bootstraps"]) for g in groups]
            row = {"network": net, "test_images": m, "modality": mod, "statistic": STAT[mod], "scenario": sc,
                   "snr": snr, "subjects": S, "n": len(groups)}
            for name in ("diverges", "consistent", "undetermined"):
                row[name] = v.count(name)
                row[f"{name}_share"] = v.count(name) / len(groups)
                row[f"{name}_ci95"] = wilson(v.count(name), len(groups))
            rows.append(row)
    return rows


def markdown_groups(rows):
    out = ["| network | test images | statistic | scenario | SNR | subjects | groups | diverges | consistent | "
           "undetermined |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['network']} | {r['test_images']} | {r['statistic']} | {r['scenario']} | {r['snr']} | "
                   f"{r['subjects']} | "
                   f"{r['n']} | {r['diverges']} | {r['consistent']} | {r['undetermined']} |")
    return "\n".join(out)


def markdown(res):
    out = ["| network | test images | statistic | scenario | SNR | n | diverges | consistent | undetermined | "
           "BC interval extended |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["cells"]:
        def f(v):
            lo, hi = r[f"{v}_ci95"]
            return f"{r[v + '_share']:.3f} [{lo:.3f}, {hi:.3f}]"
        out.append(f"| {r['network']} | {r['test_images']} | {r['statistic']} | {r['scenario']} | {r['snr']} | "
                   f"{r['n']} | "
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
    ap.add_argument("--modalities", default="fmri,meg", help="fmri, meg or both (fmri,meg)")
    ap.add_argument("--images", type=int, default=600, help="images (training + test)")
    ap.add_argument("--test-images", type=int, default=100)
    ap.add_argument("--joint", action="store_true", help="encode --joint: verdicts and significance of the "
                    "gradients' unique variance too")
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--markdown", help="the table as markdown")
    ap.add_argument("--regroup", nargs="+", help="saved JSON results: merge them, print the tables (with "
                    "the group rates) and exit")
    a = ap.parse_args()
    if a.regroup:
        res = merge(a.regroup)
        res["groups"] = group_rates(res)
        res["voxels"] = voxel_rates(res)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        print(tables(res))
        sys.exit(0)
    snrs = {"fmri": [float(x) for x in a.fmri_snr.split(",")], "meg": [float(x) for x in a.meg_snr.split(",")]}
    if len(snrs["fmri"]) != len(snrs["meg"]):
        sys.exit("--fmri-snr and --meg-snr need the same number of levels (one simulation each)")
    size = list(SIZE)
    size[size.index("--images") + 1] = str(a.images)
    size[size.index("--test-images") + 1] = str(a.test_images)
    res = calibrate(a.gradmap, a.networks.split(","), a.scenarios.split(","), snrs,
                    a.replicates, a.bases, a.jobs, a.permutations, a.bootstraps, size=size,
                    modalities=tuple(a.modalities.split(",")),
                    checkpoint=a.out + ".partial.jsonl" if a.out else None, joint=a.joint)
    res["groups"] = group_rates(res)
    res["voxels"] = voxel_rates(res)
    save_result(res, a.out)
    print(tables(res))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(tables(res) + "\n")
