"""Permutation/bootstrap machinery (encode) and `gradmap stats` against independent computations:
numpy with the same (stored) permutations and bootstrap counts for exceedance counts, max-statistic
and group means; tests/philox.py for the permutations themselves; statsmodels multipletests
(fdr_bh, fdr_by) for the q-values; scipy.stats.spearmanr for rho_space / rho_time; the divergence
tests (peak-layer confidence sets, Theil-Sen latency slopes via scipy.stats.theilslopes, BC
intervals via scipy.stats.norm) and the group combination (scipy.stats.combine_pvalues) written
again in numpy; -n 1 vs -n 2 and 1 vs 2 threads for identical p- and q-values."""
import json
import os
import sys

import h5py
import numpy as np
from scipy.stats import combine_pvalues, norm, spearmanr, theilslopes
from statsmodels.stats.multitest import multipletests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gmtest import expect_failure, gradmap, run_tests, tmpdir  # noqa: E402
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
                if mod == "fmri":  # the voxel-level peak-layer p-values
                    assert np.array_equal(a[f"/{kind}/voxel_peak_p"][()], b[f"/{kind}/voxel_peak_p"][()],
                                          equal_nan=True)
                if mod == "meg":  # the cluster null too: the same bits on any rank/thread split
                    assert np.array_equal(a[f"/{kind}/null_cluster"][()], b[f"/{kind}/null_cluster"][()])
                assert np.allclose(a[f"/{kind}/null_group"][()], b[f"/{kind}/null_group"][()],
                                   atol=1e-12, equal_nan=True)
    with h5py.File(f"{BASE}/stats1/stats.h5") as a, h5py.File(f"{BASE}/stats2/stats.h5") as b:
        for mod in ("fmri", "meg"):
            for kind in ("activations", "gradients"):
                for name in ("p", "q_bh", "q_by", "q_bh_all", "p_fwer", "p_fwer_all"):
                    x, y = a[f"/{mod}/{kind}/{name}"][()], b[f"/{mod}/{kind}/{name}"][()]
                    assert np.array_equal(x, y, equal_nan=True), f"{mod} {kind} {name}"
        for name in ("p_diverges", "p_consistent", "q_diverges", "q_consistent", "verdict"):
            x, y = a[f"/fmri/D_space_voxel/{name}"][()], b[f"/fmri/D_space_voxel/{name}"][()]
            assert np.array_equal(x, y, equal_nan=True), name
    sa = json.load(open(f"{BASE}/stats1/summary.json"))
    sb = json.load(open(f"{BASE}/stats2/summary.json"))
    for mod, key in (("fmri", "rho_space"), ("meg", "rho_time")):
        for kind in ("activations", "gradients"):
            assert np.allclose(np.array(sa[mod][key][kind]["ci"], float), np.array(sb[mod][key][kind]["ci"], float),
                               atol=1e-9, equal_nan=True)
    for mod, key in (("fmri", "D_space"), ("meg", "D_time")):
        x, y = sa[mod][key], sb[mod][key]
        assert x["verdict"] == y["verdict"], (mod, x, y)
        for k in ("value", "p", "p_consistent", "p_signal_gradients"):
            assert np.isclose(x[k], y[k], rtol=1e-9, atol=1e-12), (mod, k, x, y)
        assert np.allclose(np.array(x["ci"], float), np.array(y["ci"], float), atol=1e-9, equal_nan=True)


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
            assert np.allclose(summary["fmri"]["rho_space"][kind]["ci"], bc_interval(rb, rho), equal_nan=True)
            null = f[f"/{kind}/null_group"][()]
            rn = np.array([spearmanr(level, np.argmax(null[:, :, b], 0))[0] for b in range(B)])
            # an undefined null replicate takes the no-effect value 0
            p = (1 + (np.abs(np.nan_to_num(rn)) >= abs(rho) - 1e-12).sum()) / (B + 1)
            assert np.isclose(summary["fmri"]["rho_space"][kind]["p"], p)
            c = g[f"/{kind}/group_r"][()]  # [L, T] latency curves
            tau = latencies(c, times)[0]  # post-stimulus window only
            assert np.allclose(summary["meg"][f"peak_latency_{kind}"], tau)
            assert np.isclose(summary["meg"]["rho_time"][kind]["value"],
                              spearmanr(np.arange(len(tau)), tau)[0])


def bc_interval(boot, est, level=0.95):
    """Efron's bias-corrected percentile interval, extended to contain the estimate."""
    boot = np.asarray(boot, float)
    fin = boot[np.isfinite(boot)]
    u = len(boot) - len(fin)
    s = np.concatenate([fin, np.full(u // 2, -np.inf), np.full(u - u // 2, np.inf)])
    n = len(s)
    share = np.clip(((s < est).sum() + 0.5 * (s == est).sum()) / n, 0.5 / n, 1 - 0.5 / n)
    z0, z = norm.ppf(share), norm.ppf(0.5 + level / 2)
    assert u == 0, "the reference handles defined replicates only"
    lo, hi = np.quantile(fin, [norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)])
    return [min(lo, est), max(hi, est)]


def peak_p(obs, boot):
    """Peak-layer p-values of one profile: obs [L], boot [L, BB]."""
    L = len(obs)
    p = np.ones(L)
    for l in range(L):
        best = 1.0
        for k in range(L):
            if k != l:
                d = boot[k] - boot[l]
                sd = d.std(ddof=1)
                best = min(best, norm.sf((obs[k] - obs[l]) / sd) if sd > 0 else float(not obs[k] > obs[l]))
        p[l] = min(1.0, (L - 1) * best)
    return p


def p_signal(obs, null, use):
    m = obs[:, use].max()
    return (1 + (null[:, use, :].max((0, 1)) >= m).sum()) / (null.shape[2] + 1)


def latencies(c, times):
    """Peak and onset latency per layer of latency curves c [L, T], post-stimulus times only."""
    peak, onset = [], []
    post = times > 0
    for row in c:
        x = np.where(post, row, -np.inf)
        i = int(np.argmax(x))
        peak.append(times[i])
        onset.append(times[np.where(post[:i + 1] & (row[:i + 1] >= row[i] / 2))[0][0]])
    return np.array(peak), np.array(onset)


def claim_p(x):
    """One-sided bootstrap p of the claim x > 0 (undefined replicates count against it)."""
    x = np.asarray(x, float)
    return (1 + (~(x > 0)).sum()) / (len(x) + 1)


def verdict(p_div, p_cons, p_sa, p_sg, alpha=0.05):
    if not (p_sa < alpha and p_sg < alpha):
        return "undetermined"
    return "consistent" if p_cons < alpha else "diverges" if p_div < alpha else "undetermined"


def test_divergence_equals_numpy_and_scipy():
    s = json.load(open(f"{BASE}/stats2/summary.json"))
    # Space: peak-layer confidence sets per ROI, Bonferroni across ROIs, IUT for consistency.
    with load("fmri") as f, h5py.File(f"{BASE}/stats2/stats.h5") as st:
        obs = [f[f"/{k}/group_r"][()] for k in ("activations", "gradients")]
        boot = [f[f"/{k}/boot_group"][()] for k in ("activations", "gradients")]
        null = [f[f"/{k}/null_group"][()] for k in ("activations", "gradients")]
        n = f["/activations/group_n"][()][0]  # [L, G]: the same voxels for every layer
        L, G = obs[0].shape
        margin = 0.2 * (L - 1)
        use = n > 0
        p_div, p_cons, dist = [], [], []
        for g in np.where(use)[0]:
            pa, pg = peak_p(obs[0][:, g], boot[0][:, g]), peak_p(obs[1][:, g], boot[1][:, g])
            assert np.allclose(st["/fmri/activations/peak_layer_p"][:, g], pa, rtol=1e-6, atol=1e-12)
            assert np.allclose(st["/fmri/gradients/peak_layer_p"][:, g], pg, rtol=1e-6, atol=1e-12)
            near = [min(pa[a], pg[b]) for a in range(L) for b in range(L) if abs(a - b) <= margin + 1e-9]
            far = [min(pa[a], pg[b]) for a in range(L) for b in range(L) if abs(a - b) > margin + 1e-9]
            p_div.append(min(1, 2 * max(near)))
            p_cons.append(min(1, 2 * max(far)))
        d = s["fmri"]["D_space"]
        assert np.allclose(np.array(s["fmri"]["D_space_p_diverges_roi"])[use], p_div, rtol=1e-6, atol=1e-12)
        assert np.isclose(d["p"], min(1, use.sum() * min(p_div)), rtol=1e-6, atol=1e-12)
        assert np.isclose(d["p_consistent"], max(p_cons), rtol=1e-6, atol=1e-12)
        psa, psg = p_signal(obs[0], null[0], use), p_signal(obs[1], null[1], use)
        assert np.isclose(d["p_signal_activations"], psa) and np.isclose(d["p_signal_gradients"], psg)
        assert d["verdict"] == verdict(d["p"], d["p_consistent"], psa, psg), d
        dist = lambda a, b: np.abs(np.argmax(a[:, use], 0) - np.argmax(b[:, use], 0)).mean()  # noqa: E731
        value = dist(obs[0], obs[1])
        rb = [dist(boot[0][:, :, b], boot[1][:, :, b]) for b in range(BB)]
        assert np.isclose(d["value"], value) and np.allclose(d["ci"], bc_interval(rb, value))
    # Time: Theil-Sen slope of the gradients' peak latencies, top-layer gap, share-based p-values.
    with load("meg") as f:
        times = f["/groups/value"][()]
        obs = [f[f"/{k}/group_r"][()] for k in ("activations", "gradients")]
        boot = [f[f"/{k}/boot_group"][()] for k in ("activations", "gradients")]
        null = [f[f"/{k}/null_group"][()] for k in ("activations", "gradients")]
        L = obs[0].shape[0]
        lat = [latencies(o, times) for o in obs]
        for k, kind in enumerate(("activations", "gradients")):
            assert np.allclose(s["meg"][f"peak_latency_{kind}"], lat[k][0])
            assert np.allclose(s["meg"][f"onset_latency_{kind}"], lat[k][1])
        slope = theilslopes(lat[1][0], np.arange(L))[0]
        gap = lat[1][0][-1] - lat[0][0][-1]
        sb, gb = [], []
        for b in range(BB):
            la, lg = latencies(boot[0][:, :, b], times)[0], latencies(boot[1][:, :, b], times)[0]
            sb.append(theilslopes(lg, np.arange(L))[0])
            gb.append(lg[-1] - la[-1])
        sb, gb = np.array(sb), np.array(gb)
        d = s["meg"]["D_time"]
        assert np.isclose(d["value"], slope) and np.allclose(d["ci"], bc_interval(sb, slope))
        assert np.isclose(d["p"], min(1, 2 * min(claim_p(sb), claim_p(-gb))))
        assert np.isclose(d["p_consistent"], max(claim_p(-sb), claim_p(gb)))
        assert np.isclose(s["meg"]["top_layer_latency_gap"]["value"], gap)
        use = times > 0
        psa, psg = p_signal(obs[0], null[0], use), p_signal(obs[1], null[1], use)
        assert d["verdict"] == verdict(d["p"], d["p_consistent"], psa, psg), d


def mne_clusters(x_st, thr, sensor_adj):
    """MNE-Python's clusters of x [S, T] > thr (extent: t_power = 0) with time adjacency and the
    given sensor adjacency [S, S] (zeros: time-only)."""
    import scipy.sparse as sp
    from mne.stats import combine_adjacency
    from mne.stats.cluster_level import _find_clusters
    S, T = x_st.shape
    adj = combine_adjacency(T, sp.csr_matrix(sensor_adj))  # data shaped (times, sensors)
    clusters, sums = _find_clusters(x_st.T.ravel(), thr, tail=1, adjacency=adj, t_power=0)
    return sorted(int(s) for s in sums)


def pair_p(pa, pg, margin):
    """The space pair tests of one profile pair from its peak-layer p-values."""
    L = len(pa)
    near = [min(pa[a], pg[b]) for a in range(L) for b in range(L) if abs(a - b) <= margin + 1e-9]
    far = [min(pa[a], pg[b]) for a in range(L) for b in range(L) if abs(a - b) > margin + 1e-9]
    return min(1, 2 * max(near)), (min(1, 2 * max(far)) if far else 1.0)


def test_voxel_space_tests_equal_numpy():
    """Voxel level: every voxel's peak-layer p-values from its own bootstrap layer profile
    (numpy's weighted Pearson r on the stored counts, the reference peak_p), then the pair tests
    over the voxels significant for both kinds, BH (statsmodels) per claim and the verdict codes."""
    s = json.load(open(f"{BASE}/stats2/summary.json"))
    with load("fmri") as f, h5py.File(f"{BASE}/stats2/stats.h5") as st:
        layers = list(f.attrs["layers"])
        L = len(layers)
        peak = {}
        for kind in ("activations", "gradients"):
            r = f[f"/{kind}/r"][()].astype(np.float64)
            rb = np.stack([numpy_replicates(f, kind, li, layer)[2] for li, layer in enumerate(layers)])
            mine = f[f"/{kind}/voxel_peak_p"][()]
            T = r.shape[1]
            ref = np.array([peak_p(r[:, t], rb[:, :, t]) for t in range(T)]).T
            # float32 bootstrap kernel vs float64: the Wald p moves by at most a few 1e-4
            diff = np.abs(mine - ref)
            assert np.nanmax(diff) < 2e-3 and np.mean(diff < 1e-4) > 0.95, (kind, np.nanmax(diff))
            peak[kind] = mine.astype(np.float64)
        tested = (st["/fmri/activations/peak_layer"][()] >= 0) & (st["/fmri/gradients/peak_layer"][()] >= 0)
        assert tested.sum() > 20
        margin = 0.2 * (L - 1)
        pd = np.full(tested.shape, np.nan)
        pc = np.full(tested.shape, np.nan)
        for t in np.where(tested)[0]:
            pd[t], pc[t] = pair_p(peak["activations"][:, t], peak["gradients"][:, t], margin)
        v = st["/fmri/D_space_voxel"]
        assert np.allclose(v["p_diverges"][()], pd, rtol=1e-6, atol=1e-12, equal_nan=True)
        assert np.allclose(v["p_consistent"][()], pc, rtol=1e-6, atol=1e-12, equal_nan=True)
        qd, qc = np.full_like(pd, np.nan), np.full_like(pc, np.nan)
        qd[tested] = multipletests(pd[tested], method="fdr_bh")[1]
        qc[tested] = multipletests(pc[tested], method="fdr_bh")[1]
        assert np.allclose(v["q_diverges"][()], qd, rtol=1e-9, equal_nan=True)
        assert np.allclose(v["q_consistent"][()], qc, rtol=1e-9, equal_nan=True)
        code = np.where(~tested, 0, np.where(qc < 0.05, 3, np.where(qd < 0.05, 2, 1)))
        assert np.array_equal(v["verdict"][()], code)
        roi = f["/groups/target"][()]
        with h5py.File(f.attrs["brain"], "r") as b:
            assert np.array_equal(roi, b["/brain/roi"][()])
        names = [x.decode() if isinstance(x, bytes) else x for x in f["/groups/names"][()]]
        sv = s["fmri"]["D_space_voxels"]
        assert sv["all"] == {"tested": int(tested.sum()), "diverges": int((code == 2).sum()),
                             "consistent": int((code == 3).sum()), "undetermined": int((code == 1).sum())}
        for g, name in enumerate(names):
            sel = roi == g
            assert sv["roi"][name]["tested"] == int((sel & tested).sum())
            assert sv["roi"][name]["diverges"] == int((sel & (code == 2)).sum())


def test_meg_clusters_equal_mne():
    """Cluster-based permutation test on MEG sensors x time against MNE-Python's cluster finder on
    the same maps and the same (stored) permutations: observed cluster extents exactly; the
    permutation maxima exactly where no permuted r lies within 1e-5 of the threshold (float32
    kernel vs float64); p-values to that tolerance. Time-only clusters (no sensor positions) and
    sensor adjacency (a ring of the 6 sensors written into the brain file)."""
    ring = f"{BASE}/brain_meg_ring.h5"
    import shutil
    shutil.copy(f"{BASE}/data/brain_meg.h5", ring)
    with h5py.File(ring, "r+") as b:
        S = b["/brain/responses"].shape[1]
        adj = np.zeros((S, S), np.int32)
        for s in range(S):
            adj[s, (s + 1) % S] = adj[(s + 1) % S, s] = 1
        b["/brain/sensor_adjacency"] = adj
    gradmap(["encode", "--features", f"{BASE}/features.h5", "--brain", ring, "--out", f"{BASE}/ring.h5",
             "--permutations", B, "--bootstraps", BB, "--seed", 7, "--store-predictions", "--store-resamples"],
            ranks=2)
    gradmap(["stats", "--scores", f"{BASE}/ring.h5", "--out", f"{BASE}/stats_ring"], ranks=2)
    for scores, stats_dir, sensor_adj in ((f"{BASE}/n2_meg.h5", f"{BASE}/stats2", None),
                                          (f"{BASE}/ring.h5", f"{BASE}/stats_ring", adj)):
        with h5py.File(scores) as f, h5py.File(f"{stats_dir}/stats.h5") as st:
            thr = f.attrs["cluster_threshold"][0]
            m = f["/split/test_stimuli"].shape[0]
            from scipy.stats import t as student_t
            tq = student_t.isf(0.01, m - 2)
            assert np.isclose(thr, tq / np.sqrt(m - 2 + tq**2), rtol=1e-6)
            assert f.attrs["cluster_adjacency"] == ("time" if sensor_adj is None else "sensors+time")
            layers = list(f.attrs["layers"])
            S, T = f.attrs["target_shape"]
            sa = np.zeros((S, S)) if sensor_adj is None else sensor_adj
            n_checked = 0
            for kind in ("activations", "gradients"):
                table = st[f"/meg/{kind}/clusters"][()]
                for li in range(len(layers)):
                    r = f[f"/{kind}/r"][li].astype(np.float64)
                    mine = sorted(int(s) for s in table[table[:, 0] == li, 1])
                    assert mine == mne_clusters(r.reshape(S, T), thr, sa), (kind, li)
                    if li not in (0, len(layers) - 1):
                        continue
                    _, rp, _ = numpy_replicates(f, kind, li, layers[li])
                    ref = np.array([max(mne_clusters(x.reshape(S, T), thr, sa) or [0]) for x in rp])
                    null = f[f"/{kind}/null_cluster"][li]
                    clear = ~(np.abs(rp - thr) < 1e-5).any(1)
                    assert (null[clear] == ref[clear]).all(), (kind, li, np.where(null != ref))
                    assert clear.mean() > 0.5
                    for row in table[table[:, 0] == li]:
                        p_ref = (1 + (ref >= row[1]).sum()) / (B + 1)
                        assert abs(row[2] - p_ref) <= (1 + (~clear).sum()) / (B + 1), (row, p_ref)
                        n_checked += 1
            assert n_checked > 0, "no cluster was checked: the test would be vacuous"


def fake_stats(d, rho_a, rho_g, layers=("l0", "l1"), tests=None, verdict_="undetermined"):
    os.makedirs(d, exist_ok=True)
    with h5py.File(f"{d}/stats.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f.create_group("/fmri").attrs["layers"] = list(layers)
        for k, v in (("activations", rho_a), ("gradients", rho_g)):
            f[f"/fmri/{k}/rho_space"] = np.array([v, 0, 0, 0.5])
            f[f"/fmri/{k}/group_r"] = np.full((len(layers), 3), v)
        f["/fmri/D_space"] = np.array([rho_a - rho_g, 0, 0, 0.5])
        f["/fmri/D_space"].attrs["verdict"] = verdict_
        f["/fmri/D_space_tests"] = np.array(tests if tests is not None else [0.5, 0.5, 0.01, 0.01])


def test_aggregate_equals_scipy_and_numpy_sign_flip():
    from itertools import product
    from scipy.stats import t as student_t
    rng = np.random.default_rng(3)
    for n in (6, 9):
        a, g = rng.uniform(-0.2, 0.9, n), rng.uniform(-0.5, 0.5, n)
        if n == 6:
            g6 = g
        dirs = [f"{BASE}/agg{n}/s{i}" for i in range(n)]
        tests = rng.uniform(0, 1, (n, 4)) ** 3
        verdicts = rng.choice(["diverges", "consistent", "undetermined"], n)
        for d, x, y, te, vd in zip(dirs, a, g, tests, verdicts):
            fake_stats(d, x, y, tests=te, verdict_=str(vd))
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
            if name == "D_space":  # not centred on its H0: combined by the group tests instead
                assert e["p_sign_flip"] is None
                continue
            signs = np.array(list(product([1, -1], repeat=n)))
            p = (np.abs(signs @ v) >= abs(v.sum()) * (1 - 1e-12)).mean()
            assert np.isclose(e["p_sign_flip"], p), (name, e["p_sign_flip"], p)
        grp = res["D_space_group"]
        fisher = [combine_pvalues(tests[:, j], method="fisher")[1] for j in range(4)]
        assert np.isclose(grp["p_diverges_fisher"], fisher[0], rtol=1e-9)
        assert np.isclose(grp["p_consistent_all"], tests[:, 1].max())
        assert np.isclose(grp["p_signal_gradients_fisher"], fisher[3], rtol=1e-9)
        assert grp["verdict"] == verdict(fisher[0], tests[:, 1].max(), fisher[2], fisher[3])
        assert grp["inputs_diverges"] == (verdicts == "diverges").sum() and grp["inputs"] == n
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
    fails = expect_failure
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
               test_hierarchy_equals_scipy_spearman, test_divergence_equals_numpy_and_scipy,
               test_voxel_space_tests_equal_numpy,
               test_meg_clusters_equal_mne,
               test_aggregate_equals_scipy_and_numpy_sign_flip,
               test_bad_inputs])
