#!/usr/bin/env python3
"""Benchmark: `gradmap encode` against scikit-learn's RidgeCV(alpha_per_target=True) on the same
data in the same session, with a same-session DGEMM peak for reference.

Usage: /usr/bin/python3 bench/encode_bench.py [--train 10000] [--test 1000] [--features 1024]
       [--targets 20000] [--alphas 10] [--cv loo|kfold] [--precision float32|float64]
       [--nulls B] [--noise-fraction F] [--gradmap build/src/gradmap]

The data: random features (float32) and responses = features @ W + noise, written in gradmap's
schema (one repetition per image); with --noise-fraction F, that fraction of the targets are
pure noise (as most MEG sensor-times and most voxels are), whose LOO criterion is nearly flat
over the large alphas: the case that decides how often float32 selection falls back to float64
(gradmap's log line "N of M target fits rechecked in float64" is printed). Both solvers see z-scored features; the baseline is the
efficient leave-one-out that gradmap's default reproduces (scikit-learn has no per-target K-fold).
Prints wall times, peak RSS (ru_maxrss of the children), the ratio baseline / gradmap, the
1 -> 2 rank speed-up, and the DGEMM and SGEMM rates of this machine's BLAS measured in the same
session (numpy on the same OpenBLAS, all cores).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np


def dgemm_peak(n=2048, dtype=np.float64):
    a = np.random.default_rng(0).normal(size=(n, n)).astype(dtype)
    a @ a
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9


SGEMM_LOOP = ("import numpy as np, time; a = np.random.default_rng(0).normal(size=(2048, 2048))"
              ".astype(np.float32); a @ a; t = time.perf_counter()\n"
              "for _ in range(40): a @ a\nprint(time.perf_counter() - t)")


def core_scaling():
    """The bound on any 1 -> 2 rank speed-up here: single-threaded SGEMM alone vs two at once
    (shared caches, memory bandwidth and clock): 2 t_alone / t_together."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    one = float(subprocess.run([sys.executable, "-c", SGEMM_LOOP], capture_output=True, text=True,
                               env=env, check=True).stdout)
    ps = [subprocess.Popen([sys.executable, "-c", SGEMM_LOOP], stdout=subprocess.PIPE, text=True,
                           env=env) for _ in range(2)]
    both = max(float(p.communicate()[0]) for p in ps)
    return 2 * one / both


# Runs a command and reports the peak RSS of its process tree (largest waited-for descendant).
WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)")


def run(cmd, env=None):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rss_kb = int(re.findall(r"maxrss_kb (\d+)", p.stderr)[-1])
    return wall, rss_kb / 1024 / 1024, p


SKLEARN = r"""
import sys, time, h5py, numpy as np
from sklearn.linear_model import RidgeCV
f, b, alphas = sys.argv[1], sys.argv[2], [float(a) for a in sys.argv[3].split(',')]
with h5py.File(f) as ff, h5py.File(b) as bb:
    x = ff['/features/activations/layer'][()].astype(np.float64)
    y = bb['/brain/responses'][()].astype(np.float64)
    test = bb['/brain/test_stimuli'][()]
train = np.setdiff1d(np.arange(len(x)), test)
mu, sd = x[train].mean(0), x[train].std(0)
x = (x - mu) / sd
t = time.perf_counter()
m = RidgeCV(alphas=alphas, fit_intercept=True, alpha_per_target=True).fit(x[train], y[train])
p = m.predict(x[test])
print('fit_s', time.perf_counter() - t)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--targets", type=int, default=20000)
    ap.add_argument("--alphas", type=int, default=10)
    ap.add_argument("--cv", default="loo", help="loo or kfold (gradmap's default 5 folds)")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--one-thread-scaling", action="store_true",
                    help="also time 1 rank x 1 thread, for the 1 -> 2 rank speed-up at one core "
                         "per rank (on a 2-core machine, 1 rank x 2 threads already uses both)")
    ap.add_argument("--gradmap", default="build/src/gradmap")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--compare-solvers", action="store_true",
                    help="also time 1-rank encode with --solver primal and --solver dual (the "
                         "runs above use auto: dual when features > training images)")
    ap.add_argument("--noise-fraction", type=float, default=0.0,
                    help="fraction of the targets without signal (default 0)")
    ap.add_argument("--nulls", type=int, default=0, metavar="B",
                    help="also time 1-rank encode with B permutations and 1000 bootstraps against "
                         "the same fit without them (the fits above run without)")
    ap.add_argument("--nulls-baseline", metavar="GRADMAP",
                    help="with --nulls: also run this other gradmap binary (e.g. one built from an "
                         "earlier commit) on the same command and compare its exceedance counts "
                         "and bootstrap sums with this build's")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="gradmap-encode-bench-")
    try:
        bench(a, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench(a, d):
    n = a.train + a.test
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, a.features)).astype(np.float32)
    with h5py.File(f"{d}/features.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f["/features/activations/layer"] = x
    with h5py.File(f"{d}/brain.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f.attrs["modality"] = "fmri"
        y = f.create_dataset("/brain/responses", (n, a.targets), np.float32, chunks=(n, 256))
        for c in range(0, a.targets, 2000):
            w = rng.normal(size=(a.features, min(2000, a.targets - c))).astype(np.float32) / np.sqrt(a.features)
            w[:, rng.random(w.shape[1]) < a.noise_fraction] = 0
            y[:, c:c + w.shape[1]] = x @ w + rng.normal(size=(n, w.shape[1])).astype(np.float32)
        f["/brain/trial_stimulus"] = np.arange(n, dtype=np.int64)
        f["/brain/test_stimuli"] = np.arange(a.train, n, dtype=np.int64)
        f["/brain/roi"] = np.zeros(a.targets, np.int32)
        f["/brain/roi_names"] = np.array([b"all"])
        f["/brain/roi_level"] = np.array([1], np.int32)
        f["/brain/voxel_ijk"] = np.stack([np.arange(a.targets) % 100, np.arange(a.targets) // 100,
                                          np.zeros(a.targets)], 1).astype(np.int32)
        f["/brain"].attrs["volume_shape"] = np.array([100, a.targets // 100 + 1, 1])
        f["/brain"].attrs["affine"] = np.eye(4).ravel()
    alphas = ",".join(f"{v:g}" for v in np.logspace(-1, 8, a.alphas))
    peak = dgemm_peak()
    speak = dgemm_peak(dtype=np.float32)
    print(f"data: {a.train} train + {a.test} test images x {a.features} features x {a.targets} targets "
          f"({100 * a.noise_fraction:.0f}% pure noise), "
          f"{a.alphas} alphas, cv {a.cv}; cores {os.cpu_count()}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print(f"DGEMM / SGEMM (numpy, same BLAS, this session): {peak:.1f} / {speak:.1f} GFlop/s; "
          f"gradmap precision {a.precision}")
    ref_peak = speak if a.precision == "float32" else peak
    flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    res, inproc = {}, {}
    configs = [(1, os.cpu_count()), (2, max(1, os.cpu_count() // 2))]
    if a.one_thread_scaling:
        configs.append((1, 1))
    for ranks, threads in configs:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   PETSC_OPTIONS="-log_view")
        wall, rss, p = run(["mpiexec", "-n", str(ranks), *flags, "--oversubscribe", "--bind-to", "none", a.gradmap, "encode",
                            "--features", f"{d}/features.h5", "--brain", f"{d}/brain.h5", "--out",
                            f"{d}/scores{ranks}.h5", "--alphas", alphas, "--alpha-cv", a.cv,
                            "--threads", str(threads), "--permutations", "0", "--bootstraps", "0",
                            "--precision", a.precision], env)
        m = re.search(r"gm\.ridge\.(loo|kfold)\s+\d+ \S+ (\S+) \S+ \S+ .*?(\d+)$", p.stdout, re.M)
        res[(ranks, threads)] = wall
        tm = re.search(r"time encode\s+min\s+\S+s\s+mean\s+\S+s\s+max\s+(\S+)s", p.stdout + p.stderr)
        inproc[(ranks, threads)] = float(tm.group(1)) if tm else float("nan")
        rate = ""
        if m:
            gf = int(m.group(3)) / 1000
            rate = (f", {m.group(1)} phase {float(m.group(2)):.1f} s at {gf:.1f} GFlop/s "
                    f"({100 * gf / ref_peak:.0f}% of the {a.precision} GEMM peak)")
        print(f"gradmap encode -n {ranks} x {threads} threads: {wall:.1f} s wall "
              f"({inproc[(ranks, threads)]:.1f} s inside gradmap, after process start-up), "
              f"peak RSS {rss:.2f} GiB{rate}")
        rc = re.search(r"float32 alpha selection: (\d+) of (\d+) target fits rechecked", p.stdout + p.stderr)
        if rc:
            print(f"    float32 selection: {rc.group(1)} of {rc.group(2)} target fits rechecked in float64")
        # every profiled phase (rank 0's times; rates over all ranks), with the GEMM peak of its
        # precision: the X^T Y products run in float64, the rest of the selection in float32
        phases, table = [], {}
        for name, sec, fl, mf in re.findall(r"^(gm\.\S+) +\d+ \S+ (\S+) \S+ (\S+) .*?(\d+)$", p.stdout, re.M):
            gf = int(mf) / 1000
            table[name] = (float(sec), float(fl))
            peak_of = peak if name == "gm.ridge.kfold.xty" else speak
            phases.append(f"{name} {float(sec):.1f} s" + (f" {gf:.0f} GF/s ({100 * gf / peak_of:.0f}%)" if gf else ""))
        print("    phases: " + "; ".join(phases))
        if "gm.ridge.kfold" in table and "gm.ridge.kfold.xty" in table:
            # The K-fold phase mixes float64 GEMMs (X_f^T Y, refit) and float32 work: its time at
            # the measured peaks of each precision over its actual time (per rank: flops of rank 0).
            sec, fl = table["gm.ridge.kfold"]
            f64 = table["gm.ridge.kfold.xty"][1] + table.get("gm.ridge.refit", (0, 0))[1]
            ideal = f64 / (peak * 1e9 / ranks) + (fl - f64) / (speak * 1e9 / ranks)
            print(f"    kfold phase at the precision-weighted GEMM peak would take {ideal:.1f} s: "
                  f"{100 * ideal / sec:.0f}% of peak")
    one, two = configs[0], configs[1]
    print(f"speed-up 1 rank x {one[1]} threads -> 2 ranks x {two[1]}: {res[one] / res[two]:.2f}x")
    if a.one_thread_scaling:
        print(f"speed-up 1 rank x 1 thread -> 2 ranks x 1 thread: {res[(1, 1)] / res[two]:.2f}x "
              f"wall, {inproc[(1, 1)] / inproc[two]:.2f}x inside gradmap; this machine's own "
              f"1 -> 2 core scaling of single-threaded SGEMM: {core_scaling():.2f}x")
    if a.compare_solvers:
        threads = os.cpu_count()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   PETSC_OPTIONS="-log_view")
        walls = {}
        for solver in ("primal", "dual"):
            wall, rss, p = run(["mpiexec", "-n", "1", *flags, "--bind-to", "none", a.gradmap, "encode",
                                "--features", f"{d}/features.h5", "--brain", f"{d}/brain.h5", "--out",
                                f"{d}/{solver}.h5", "--alphas", alphas, "--alpha-cv", a.cv, "--threads",
                                str(threads), "--permutations", "0", "--bootstraps", "0", "--precision",
                                a.precision, "--solver", solver], env)
            basis = re.search(r"gm\.ridge\.(svd|kernel)\s+\d+ \S+ (\S+)", p.stdout, re.M)
            walls[solver] = wall
            extra = f", basis ({basis.group(1)}) {float(basis.group(2)):.1f} s" if basis else ""
            print(f"gradmap encode -n 1 --solver {solver}: {wall:.1f} s wall, peak RSS {rss:.2f} GiB{extra}")
        with h5py.File(f"{d}/primal.h5") as fp, h5py.File(f"{d}/dual.h5") as fd:
            dr = np.nanmax(np.abs(fp["/activations/r"][()] - fd["/activations/r"][()]))
        print(f"primal / dual wall: {walls['primal'] / walls['dual']:.2f}x; max |r_primal - r_dual| = {dr:.1e}")
    if a.nulls:
        threads = os.cpu_count()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   PETSC_OPTIONS="-log_view")
        binaries = [("this build", a.gradmap, "nulls.h5")]
        if a.nulls_baseline:
            binaries.append(("baseline", a.nulls_baseline, "nulls-baseline.h5"))
        nulls_s = {}
        for label, binary, out in binaries:
            wall, rss, p = run(["mpiexec", "-n", "1", *flags, "--bind-to", "none", binary, "encode", "--features",
                                f"{d}/features.h5", "--brain", f"{d}/brain.h5", "--out", f"{d}/{out}",
                                "--alphas", alphas, "--alpha-cv", a.cv, "--threads", str(threads),
                                "--permutations", str(a.nulls), "--bootstraps", "1000",
                                "--precision", a.precision], env)
            m = re.search(r"gm\.nulls\s+\d+ \S+ (\S+) \S+ \S+ .*?(\d+)$", p.stdout, re.M)
            if m:
                nulls_s[label] = float(m.group(1))
            extra = f"; gm.nulls phase {float(m.group(1)):.1f} s at {int(m.group(2)) / 1000:.1f} GFlop/s" if m else ""
            print(f"gradmap encode -n 1 with {a.nulls} permutations + 1000 bootstraps ({label}): {wall:.1f} s wall "
                  f"(fit alone {res[one]:.1f} s: replicates add {wall - res[one]:.1f} s = "
                  f"{(wall - res[one]) / res[one]:.2f} x the fit; gm.nulls alone "
                  f"{nulls_s.get(label, float('nan')) / res[one]:.2f} x), peak RSS {rss:.2f} GiB{extra}")
        if a.nulls_baseline:
            with h5py.File(f"{d}/nulls.h5") as fn, h5py.File(f"{d}/nulls-baseline.h5") as fb:
                en, eb = fn["/activations/exceed"][()], fb["/activations/exceed"][()]
                differ = int(np.sum(en != eb))
                print(f"exceedance counts: {differ} of {en.size} targets differ from the baseline's "
                      f"(max |difference| {int(np.max(np.abs(en.astype(np.int64) - eb))) if differ else 0}); "
                      f"gm.nulls baseline / this build: {nulls_s['baseline'] / nulls_s['this build']:.2f}x")
    if not a.skip_sklearn:
        env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()), OPENBLAS_NUM_THREADS=str(os.cpu_count()))
        wall, rss, p = run([sys.executable, "-c", SKLEARN, f"{d}/features.h5", f"{d}/brain.h5", alphas], env)
        print(f"scikit-learn RidgeCV(alpha_per_target=True): {wall:.1f} s wall "
              f"({p.stdout.strip()}), peak RSS {rss:.2f} GiB")
        print(f"ratio scikit-learn / gradmap (1 rank): {wall / res[one]:.2f}x")


if __name__ == "__main__":
    main()
