"""Permutation/bootstrap machinery (encode) and `gradmap stats` against independent computations:
numpy with the same (stored) permutations and bootstrap counts for exceedance counts, max-statistic
and group means; tests/philox.py for the permutations themselves; statsmodels multipletests
(fdr_bh, fdr_by) for the q-values; scipy.stats.spearmanr for rho_space / rho_time; -n 1 vs -n 2
and 1 vs 2 threads for identical p- and q-values."""
import json
import os
import sys

import h5py
import numpy as np
from scipy.stats import spearmanr
from statsmodels.stats.multitest import multipletests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gmtest import gradmap, run_tests, tmpdir  # noqa: E402
from philox import Philox  # noqa: E402

BASE = tmpdir("stats")
B, BB = 200, 150
SIM = ["--images", 240, "--test-images", 40, "--image-size", 16, "--voxels", 280, "--sensors", 6,
       "--times", 36, "--repetitions", 2, "--snr", 0.5, "--meg-snr", 1.0]


def setup():
    gradmap(["simulate", "--out", f"{BASE}/data", "--scenario", "misaligned", *SIM], ranks=2)
    gradmap(["extract", "--stimuli", f"{BASE}/data/stimuli.h5", "--model", "builtin:tinycnn",
             "--objective", "cross-entropy", "--pooling", "mean", "--out", f"{BASE}/features.h5"],
            ranks=2)
    for ranks, threads in ((1, 2), (2, 1)):
        for mod in ("fmri", "meg"):
            gradmap(["encode", "--features", f"{BASE}/features.h5", "--brain",
                     f"{BASE}/data/brain_{mod}.h5", "--out", f"{BASE}/n{ranks}_{mod}.h5",
                     "--permutations", B, "--bootstraps", BB, "--seed", 7, "--store-predictions",
                     "--store-resamples", "--threads", threads, "--max-chunk", 2], ranks=ranks)
        gradmap(["stats", "--scores", f"{BASE}/n{ranks}_fmri.h5", "--scores",
                 f"{BASE}/n{ranks}_meg.h5", "--out", f"{BASE}/stats{ranks}"], ranks=ranks)


def load(mod, ranks=2):
    return h5py.File(f"{BASE}/n{ranks}_{mod}.h5", "r")


def test_permutations_are_philox_fisher_yates():
    with load("fmri") as f:
        perm, cnt = f["/resamples/permutations"][()], f["/resamples/bootstrap_counts"][()]
        m = f.attrs["n_test"]
    assert perm.shape == (B, m) and cnt.shape == (BB, m)
    for b in (0, 1, B - 1):
        p = list(range(m))
        rng = Philox(7, "permutation", b)
        for i in range(m - 1, 0, -1):
            j = rng.below(i + 1)
            p[i], p[j] = p[j], p[i]
        assert np.array_equal(perm[b], p), f"permutation {b}"
    for b in (0, BB - 1):
        rng = Philox(7, "bootstrap", b)
        c = np.bincount([rng.below(m) for _ in range(m)], minlength=m)
        assert np.array_equal(cnt[b], c), f"bootstrap {b}"
    assert (np.sort(perm, axis=1) == np.arange(m)).all() and (cnt.sum(1) == m).all()


def numpy_replicates(f, kind, layer_index, layer):
    """Observed r, permuted r [B, T] and bootstrap r [BB, T] of one (kind, layer), in float64."""
    pred = f[f"/{kind}/prediction/{layer}"][()].astype(np.float64)
    with h5py.File(f.attrs["brain"], "r") as b:
        ts = b["/brain/trial_stimulus"][()]
        resp = b["/brain/responses"][()].reshape(len(ts), -1).astype(np.float64)
    test = f["/split/test_stimuli"][()]
    y = np.stack([resp[ts == i].mean(0) for i in test])
    zp = (pred - pred.mean(0)) / pred.std(0)
    zy = (y - y.mean(0)) / y.std(0)
    m = len(test)
    r = (zp * zy).mean(0)
    perm = f["/resamples/permutations"][()]
    rp = np.stack([(zp[p] * zy).mean(0) for p in perm])
    rb = []
    for c in f["/resamples/bootstrap_counts"][()].astype(np.float64):
        sx, sy = c @ zp, c @ zy
        sxx, syy, sxy = c @ (zp * zp), c @ (zy * zy), c @ (zp * zy)
        rb.append((m * sxy - sx * sy) / np.sqrt((m * sxx - sx**2) * (m * syy - sy**2)))
    return r, rp, np.array(rb)


def test_replicates_equal_numpy():
    for mod in ("fmri", "meg"):
        with load(mod) as f:
            layers = list(f.attrs["layers"])
            group_of = None
            if mod == "fmri":
                with h5py.File(f.attrs["brain"], "r") as b:
                    group_of = b["/brain/roi"][()]
            else:
                nt = f.attrs["target_shape"][1]
                group_of = np.arange(f["/activations/r"].shape[1]) % nt
            G = f["/groups/value"].shape[0]
            for kind in ("activations", "gradients"):
                for li in (0, len(layers) - 1):
                    r, rp, rb = numpy_replicates(f, kind, li, layers[li])
                    exc = f[f"/{kind}/exceed"][li]
                    ref = (rp >= r).sum(0)
                    # float32 kernel vs float64: differences only where some r_b ties r to 1e-5
                    near = (np.abs(rp - r) < 1e-5).any(0)
                    bad = (exc != ref) & ~near
                    assert not bad.any(), f"{mod} {kind} {li}: exceed differs at {np.where(bad)[0][:5]}"
                    assert (exc == ref).mean() > 0.97
                    assert np.allclose(f[f"/{kind}/null_max"][li], rp.max(1), atol=2e-5)
                    for g in range(G):
                        sel = group_of == g
                        if not sel.any():
                            continue
                        assert np.allclose(f[f"/{kind}/null_group"][li, g], rp[:, sel].mean(1), atol=2e-5)
                        assert np.allclose(f[f"/{kind}/boot_group"][li, g], rb[:, sel].mean(1), atol=1e-4)
                        assert np.isclose(f[f"/{kind}/group_r"][li, g], r[sel].mean(), atol=2e-5)


def test_ranks_and_threads_give_identical_p_and_q():
    for mod in ("fmri", "meg"):
        with load(mod, 1) as a, load(mod, 2) as b:
            for kind in ("activations", "gradients"):
                assert np.array_equal(a[f"/{kind}/exceed"][()], b[f"/{kind}/exceed"][()])
                assert np.allclose(a[f"/{kind}/null_group"][()], b[f"/{kind}/null_group"][()],
                                   atol=1e-12, equal_nan=True)
    with h5py.File(f"{BASE}/stats1/stats.h5") as a, h5py.File(f"{BASE}/stats2/stats.h5") as b:
        for mod in ("fmri", "meg"):
            for kind in ("activations", "gradients"):
                for name in ("p", "q_bh", "q_by", "q_bh_all", "p_fwer", "p_fwer_all"):
                    x, y = a[f"/{mod}/{kind}/{name}"][()], b[f"/{mod}/{kind}/{name}"][()]
                    assert np.array_equal(x, y, equal_nan=True), f"{mod} {kind} {name}"
    sa = json.load(open(f"{BASE}/stats1/summary.json"))
    sb = json.load(open(f"{BASE}/stats2/summary.json"))
    for mod, key in (("fmri", "rho_space"), ("meg", "rho_time")):
        for kind in ("activations", "gradients"):
            assert np.allclose(sa[mod][key][kind]["ci"], sb[mod][key][kind]["ci"], atol=1e-9)


def test_fdr_fwer_equal_statsmodels_and_numpy():
    with h5py.File(f"{BASE}/stats2/stats.h5") as s, load("fmri") as f:
        allp = []
        for kind in ("activations", "gradients"):
            p = s[f"/fmri/{kind}/p"][()]
            exc = f[f"/{kind}/exceed"][()]
            ok = exc >= 0
            assert np.allclose(p[ok], (1 + exc[ok]) / (B + 1)) and np.isnan(p[~ok]).all()
            for li in range(p.shape[0]):
                pl = p[li]
                fin = ~np.isnan(pl)
                for method, name in (("fdr_bh", "q_bh"), ("fdr_by", "q_by")):
                    q = multipletests(pl[fin], method=method)[1]
                    assert np.allclose(s[f"/fmri/{kind}/{name}"][li][fin], q, rtol=1e-12, atol=0)
                mx = f[f"/{kind}/null_max"][li]
                r = f[f"/{kind}/r"][li]
                pf = (1 + (mx[None, :] >= r[:, None]).sum(1)) / (B + 1)
                assert np.allclose(s[f"/fmri/{kind}/p_fwer"][li][fin], pf[fin])
            allp.append(p.ravel())
        allp = np.concatenate(allp)
        fin = ~np.isnan(allp)
        q = multipletests(allp[fin], method="fdr_bh")[1]
        mine = np.concatenate([s[f"/fmri/{k}/q_bh_all"][()].ravel() for k in ("activations", "gradients")])
        assert np.allclose(mine[fin], q, rtol=1e-12, atol=0)


def test_hierarchy_equals_scipy_spearman():
    summary = json.load(open(f"{BASE}/stats2/summary.json"))
    with h5py.File(f"{BASE}/stats2/stats.h5") as s, load("fmri") as f, load("meg") as g:
        level = f["/groups/value"][()]
        times = g["/groups/value"][()]
        for kind in ("activations", "gradients"):
            gr = f[f"/{kind}/group_r"][()]  # [L, G]
            best = np.argmax(gr, axis=0)
            assert np.array_equal(s[f"/fmri/{kind}/roi_best_layer"][()], best)
            rho = spearmanr(level, best)[0]
            assert np.isclose(summary["fmri"]["rho_space"][kind]["value"], rho)
            boot = f[f"/{kind}/boot_group"][()]  # [L, G, BB]
            rb = np.array([spearmanr(level, np.argmax(boot[:, :, b], 0))[0] for b in range(BB)])
            mine = s[f"/fmri/{kind}/rho_space_boot"][()]
            assert np.allclose(mine, rb, equal_nan=True)
            lo, hi = np.nanquantile(rb, [0.025, 0.975])
            assert np.allclose(summary["fmri"]["rho_space"][kind]["ci"], [lo, hi])
            null = f[f"/{kind}/null_group"][()]
            rn = np.array([spearmanr(level, np.argmax(null[:, :, b], 0))[0] for b in range(B)])
            p = (1 + (np.abs(np.nan_to_num(rn)) >= abs(rho) - 1e-12).sum()) / (B + 1)
            assert np.isclose(summary["fmri"]["rho_space"][kind]["p"], p)
            c = g[f"/{kind}/group_r"][()]  # [L, T] latency curves
            tau = times[np.argmax(c, axis=1)]
            assert np.allclose(summary["meg"][f"peak_latency_{kind}"], tau)
            assert np.isclose(summary["meg"]["rho_time"][kind]["value"],
                              spearmanr(np.arange(len(tau)), tau)[0])


def fake_stats(d, rho_a, rho_g, layers=("l0", "l1")):
    os.makedirs(d, exist_ok=True)
    with h5py.File(f"{d}/stats.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f.create_group("/fmri").attrs["layers"] = list(layers)
        for k, v in (("activations", rho_a), ("gradients", rho_g)):
            f[f"/fmri/{k}/rho_space"] = np.array([v, 0, 0, 0.5])
            f[f"/fmri/{k}/group_r"] = np.full((len(layers), 3), v)
        f["/fmri/D_space"] = np.array([rho_a - rho_g, 0, 0, 0.5])


def test_aggregate_equals_scipy_and_numpy_sign_flip():
    from itertools import product
    from scipy.stats import t as student_t
    rng = np.random.default_rng(3)
    for n in (6, 9):
        a, g = rng.uniform(-0.2, 0.9, n), rng.uniform(-0.5, 0.5, n)
        if n == 6:
            g6 = g
        dirs = [f"{BASE}/agg{n}/s{i}" for i in range(n)]
        for d, x, y in zip(dirs, a, g):
            fake_stats(d, x, y)
        args = ["aggregate", "--out", f"{BASE}/agg{n}/out"]
        for d in dirs:
            args += ["--stats", d]
        gradmap(args, ranks=2)
        res = json.load(open(f"{BASE}/agg{n}/out/aggregate.json"))["fmri"]
        for name, v in (("rho_space_activations", a), ("rho_space_gradients", g), ("D_space", a - g)):
            e = res[name]
            assert np.isclose(e["mean"], v.mean())
            lo, hi = student_t.interval(0.95, n - 1, loc=v.mean(), scale=v.std(ddof=1) / np.sqrt(n))
            assert np.allclose(e["ci"], [lo, hi]), (name, e["ci"], lo, hi)
            signs = np.array(list(product([1, -1], repeat=n)))
            p = (np.abs(signs @ v) >= abs(v.sum()) * (1 - 1e-12)).mean()
            assert np.isclose(e["p_sign_flip"], p), (name, e["p_sign_flip"], p)
        with h5py.File(f"{BASE}/agg{n}/out/aggregate.h5") as f:
            assert np.allclose(f["/fmri/activations/group_r_mean"][()], a.mean())
    fake_stats(f"{BASE}/agg_other", 0.1, 0.2, layers=("x", "y", "z"))
    # different models: headline statistics combine, layer tables do not
    p = gradmap(["aggregate", "--stats", f"{BASE}/agg6/s0", "--stats", f"{BASE}/agg_other", "--out",
                 f"{BASE}/agg_models"], ranks=2)
    assert "layers differ" in p.stdout + p.stderr
    res = json.load(open(f"{BASE}/agg_models/aggregate.json"))["fmri"]
    assert res["same_layers"] is False and np.isclose(res["rho_space_gradients"]["mean"], (g6[0] + 0.2) / 2)
    with h5py.File(f"{BASE}/agg_models/aggregate.h5") as f:
        assert "/fmri/activations/group_r_mean" not in f


def test_bad_inputs():
    def fails(args, *needles):
        p = gradmap(args, ranks=2, check=False)
        err = p.stdout + p.stderr
        assert p.returncode != 0, f"{args} succeeded"
        assert err.count("gradmap: error") == 1, err
        for n in needles:
            assert n in err, f"{n!r} not in:\n{err}"
    out = f"{BASE}/bad"
    fails(["stats", "--scores", f"{BASE}/absent.h5", "--out", out], f"{BASE}/absent.h5")
    gradmap(["encode", "--features", f"{BASE}/features.h5", "--brain", f"{BASE}/data/brain_fmri.h5",
             "--out", f"{BASE}/noperm.h5", "--permutations", 0, "--bootstraps", 0], ranks=2)
    fails(["stats", "--scores", f"{BASE}/noperm.h5", "--out", out], f"{BASE}/noperm.h5", "/groups/value")
    fails(["stats", "--scores", f"{BASE}/n2_fmri.h5", "--scores", f"{BASE}/n1_fmri.h5", "--out", out],
          "two fmri scores files")
    fails(["stats", "--scores", f"{BASE}/n2_fmri.h5", "--out", out, "--q", 1.5], "--q")
    fails(["encode", "--features", f"{BASE}/features.h5", "--brain", f"{BASE}/data/brain_fmri.h5",
           "--out", f"{BASE}/x.h5", "--permutations", -3], "--permutations")
    assert not os.path.exists(f"{out}/stats.h5") and not os.path.exists(f"{out}/summary.json")


if __name__ == "__main__":
    setup()
    run_tests([test_permutations_are_philox_fisher_yates, test_replicates_equal_numpy,
               test_ranks_and_threads_give_identical_p_and_q, test_fdr_fwer_equal_statsmodels_and_numpy,
               test_hierarchy_equals_scipy_spearman, test_aggregate_equals_scipy_and_numpy_sign_flip,
               test_bad_inputs])
