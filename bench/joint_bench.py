#!/usr/bin/python3
"""Cost of `gradmap encode --joint` against the same encode without it (the kinds fitted
separately), same session, same input, runs alternated.

Synthetic features: L layers x p features per kind, the gradients a noisy nonlinear function of
the activations (as real gradients are); responses driven by activations and, for a third of the
targets, by one gradient layer. Reports wall-clock medians, the ratio joint / separate, and the
ratio of the joint part alone ((joint - separate) / separate), for the full activation block and
for --joint-activation-dims (default p).

  /usr/bin/python3 bench/joint_bench.py [--layers 6 --features 128 --train 2000 --test 500
      --targets 4000 --repeats 3 --permutations 1000 --bootstraps 1000]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import h5py
import numpy as np


def make(d, a):
    rng = np.random.default_rng(0)
    n = a.train + a.test
    with h5py.File(f"{d}/features.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        act = []
        for l in range(a.layers):
            x = rng.normal(size=(n, a.features)).astype(np.float32)
            g = (0.5 * x ** 2 + rng.normal(size=x.shape)).astype(np.float32)
            f[f"/features/activations/l{l}"] = x
            f[f"/features/gradients/l{l}"] = g
            act.append((x, g))
        f["/features"].attrs["layers"] = [f"l{l}" for l in range(a.layers)]
    with h5py.File(f"{d}/brain.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f.attrs["modality"] = "fmri"
        y = np.zeros((n, a.targets), np.float32)
        for c in range(a.targets):
            x, g = act[c % a.layers]
            s = x @ rng.normal(size=a.features) / np.sqrt(a.features)
            if c % 3 == 0:
                s += g @ rng.normal(size=a.features) / np.sqrt(a.features)
            y[:, c] = s + rng.normal(size=n) * 2
        f["/brain/responses"] = y
        f["/brain/trial_stimulus"] = np.arange(n, dtype=np.int64)
        f["/brain/test_stimuli"] = np.arange(a.train, n, dtype=np.int64)
        f["/brain/roi"] = (np.arange(a.targets) % 4).astype(np.int32)
        f["/brain/roi_names"] = np.array([b"V1", b"V2", b"V3", b"V4"])
        f["/brain/roi_level"] = np.array([1, 2, 3, 4], np.int32)
        f["/brain/voxel_ijk"] = np.stack([np.arange(a.targets) % 100, np.arange(a.targets) // 100,
                                          np.zeros(a.targets)], 1).astype(np.int32)
        f["/brain"].attrs["volume_shape"] = np.array([100, a.targets // 100 + 1, 1])
        f["/brain"].attrs["affine"] = np.eye(4).ravel()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--targets", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--bootstraps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradmap", default="build/src/gradmap")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="gradmap-joint-bench-")
    try:
        make(d, a)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
                   GRADMAP_HUGEPAGES="0")
        runs = {"separate": [], "joint (all activations)": [],
                f"joint (--joint-activation-dims {a.features})": []}
        extra = {"separate": [], "joint (all activations)": ["--joint"],
                 f"joint (--joint-activation-dims {a.features})": ["--joint", "--joint-activation-dims",
                                                                    str(a.features)]}
        print(f"data: {a.train} train + {a.test} test images, {a.layers} layers x {a.features} features x 2 "
              f"kinds, {a.targets} targets, B = {a.permutations}, B_b = {a.bootstraps}, 1 rank x {a.threads} "
              f"thread(s), OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
              f"cores {os.cpu_count()}")
        for rep in range(a.repeats):
            for name in runs:
                t0 = time.time()
                subprocess.run([a.gradmap, "encode", "--features", f"{d}/features.h5", "--brain",
                                f"{d}/brain.h5", "--out", f"{d}/s.h5", "--threads", str(a.threads), "--quiet",
                                "--permutations", str(a.permutations), "--bootstraps", str(a.bootstraps),
                                *extra[name]], check=True, env=env)
                runs[name].append(time.time() - t0)
        base = statistics.median(runs["separate"])
        for name, t in runs.items():
            m = statistics.median(t)
            print(f"{name}: {' / '.join(f'{x:.1f}' for x in t)} s, median {m:.1f} s, ratio {m / base:.2f}x"
                  + ("" if name == "separate" else f", joint part alone {(m - base) / base:.2f}x the separate fits"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
