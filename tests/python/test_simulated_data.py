"""Independent checks (h5py + numpy + scikit-learn, no gradmap code) of the simulated datasets:
the schema of docs/design.md, and the planted answer visible in the data themselves.

- Split-half reliability across repetitions is snr / (1 + snr) for signal voxels and 0 for noise
  voxels and for every voxel of the null scenario.
- The hierarchy is real: an encoding model from simple pixel statistics (mean/std colour, edge
  energy), fitted with scikit-learn, predicts early ROIs (V1) better than high-level ones.
- MEG: reliability is ~0 before stimulus onset and peaks near meg_snr / (1 + meg_snr) after it;
  the planted latencies run forward for activations; gradients run forward (misaligned) or
  top-down (aligned) after the forward sweep.
"""
import os

import h5py
import numpy as np
from sklearn.linear_model import RidgeCV

from gmtest import gradmap, run_tests, tmpdir

BASE = tmpdir("planted")
SIZES = ["--images", 500, "--test-images", 100, "--repetitions", 2, "--voxels", 900,
         "--sensors", 24, "--times", 36, "--image-size", 32]
for scen in ("misaligned", "aligned", "activations-only", "null"):
    gradmap(["simulate", "--out", f"{BASE}/{scen}", "--scenario", scen, "--seed", 3, *SIZES], ranks=2)


def by_repetition(path):
    """Responses split by repetition: array [2, images, ...] (each image shown twice)."""
    with h5py.File(path) as f:
        y = f["/brain/responses"][()]
        ts = f["/brain/trial_stimulus"][()]
    n = ts.max() + 1
    out = np.zeros((2, n) + y.shape[1:])
    seen = np.zeros(n, int)
    for t, i in enumerate(ts):
        out[seen[i], i] = y[t]
        seen[i] += 1
    assert (seen == 2).all()
    return out


def colcorr(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_schema_of_every_file():
    for scen in ("misaligned", "aligned", "activations-only", "null"):
        with h5py.File(f"{BASE}/{scen}/stimuli.h5") as s:
            assert s.attrs["gradmap_schema"] == 1
            assert s["/stimuli/images"].dtype == np.uint8 and s["/stimuli/images"].shape == (500, 32, 32, 3)
            assert s["/stimuli/ids"].shape == (500,)
            assert s["/stimuli/labels"].dtype == np.int64
            assert len(np.unique(s["/stimuli/labels"][()])) == 8
        with h5py.File(f"{BASE}/{scen}/brain_fmri.h5") as f:
            assert f.attrs["gradmap_schema"] == 1 and f.attrs["modality"] == "fmri"
            y = f["/brain/responses"]
            assert y.dtype == np.float32 and y.shape == (1000, 900)
            ts = f["/brain/trial_stimulus"][()]
            assert ts.dtype == np.int64 and (np.bincount(ts, minlength=500) == 2).all()
            test = f["/brain/test_stimuli"][()]
            assert len(test) == 100 and (np.diff(test) > 0).all() and test.min() >= 0 and test.max() < 500
            roi, names = f["/brain/roi"][()], [x.decode() for x in f["/brain/roi_names"][()]]
            level = f["/brain/roi_level"][()]
            assert names[:4] == ["V1", "V2", "V3", "hV4"] and list(level[:4]) == [1, 2, 3, 4]
            assert roi.dtype == np.int32 and roi.min() == 0 and roi.max() == len(names) - 1
            assert (np.diff(level) >= 0).all()
            ijk = f["/brain/voxel_ijk"][()]
            shape = f["/brain"].attrs["volume_shape"]
            assert ijk.dtype == np.int32 and (ijk >= 0).all() and (ijk < shape).all()
            assert len({tuple(v) for v in ijk}) == 900, "voxel coordinates repeat"
            affine = f["/brain"].attrs["affine"].reshape(4, 4)
            assert abs(np.linalg.det(affine[:3, :3])) > 0 and list(affine[3]) == [0, 0, 0, 1]
            for k in ("model", "objective", "pooling"):
                assert k in f["/truth"].attrs
            assert f["/truth"].attrs["model"] == "builtin:tinycnn"
        with h5py.File(f"{BASE}/{scen}/brain_meg.h5") as f:
            assert f.attrs["modality"] == "meg"
            assert f["/brain/responses"].shape == (1000, 24, 36)
            t = f["/brain/times"][()]
            assert t.dtype == np.float64 and np.allclose(np.diff(t), 0.02) and np.isclose(t[0], -0.1)
            assert len(f["/brain/sensor_names"]) == 24


def test_truth_is_consistent_with_the_scenario():
    with h5py.File(f"{BASE}/misaligned/brain_fmri.h5") as f:
        la, lg = f["/truth/layer_activations"][()], f["/truth/layer_gradients"][()]
        noise, roi, level = f["/truth/noise_target"][()], f["/brain/roi"][()], f["/brain/roi_level"][()]
        assert ((la == -1) == (noise == 1)).all()
        assert (lg[level[roi] < 5] == -1).all(), "misaligned: gradient signal outside high-level areas"
        assert (lg[(level[roi] == 5) & (noise == 0)] >= 0).all()
        # activation layer rises with the hierarchy level
        means = [la[(roi == r) & (noise == 0)].mean() for r in range(len(level))]
        assert np.all(np.diff(means[:5]) > 0), means
    with h5py.File(f"{BASE}/aligned/brain_fmri.h5") as f:
        la, lg, noise = f["/truth/layer_activations"][()], f["/truth/layer_gradients"][()], f["/truth/noise_target"][()]
        assert (la[noise == 0] == lg[noise == 0]).all()
    with h5py.File(f"{BASE}/null/brain_fmri.h5") as f:
        assert (f["/truth/noise_target"][()] == 1).all()
    with h5py.File(f"{BASE}/activations-only/brain_fmri.h5") as f, \
            h5py.File(f"{BASE}/aligned/brain_fmri.h5") as g:  # the same activations, no gradients
        assert (f["/truth/layer_gradients"][()] == -1).all()
        assert np.array_equal(f["/truth/layer_activations"][()], g["/truth/layer_activations"][()])
    with h5py.File(f"{BASE}/activations-only/brain_meg.h5") as f:
        assert np.isnan(f["/truth/latency_gradients"][()]).all()
        assert (np.diff(f["/truth/latency_activations"][()]) > 0).all()
        L = len(f["/truth/latency_activations"][()])
        assert (f["/truth/sensor_weights"][()][:, L:] == 0).all()
    with h5py.File(f"{BASE}/misaligned/brain_meg.h5") as f:
        assert (np.diff(f["/truth/latency_activations"][()]) > 0).all()
        lgr = f["/truth/latency_gradients"][()]
        assert (np.diff(lgr) > 0).all() and lgr.min() > f["/truth/latency_activations"][()].max()
    with h5py.File(f"{BASE}/aligned/brain_meg.h5") as f:
        assert (np.diff(f["/truth/latency_gradients"][()]) < 0).all()
    with h5py.File(f"{BASE}/null/brain_meg.h5") as f:
        assert np.isnan(f["/truth/latency_activations"][()]).all()


def test_boundary_brains_for_the_verdicts():
    """aligned with --gradient-shift K: every signal voxel's gradient layer exactly K layers from
    its activation layer; --gradient-timing flat: one gradient latency (slope 0, gap > 0); gap0:
    top-down with the top layer's gradient at its activation's latency. Other scenarios refuse."""
    small = ["--images", 60, "--test-images", 10, "--voxels", 200, "--sensors", 4, "--times", 36,
             "--image-size", 16]
    for shift, timing in ((1, "flat"), (2, "gap0")):
        d = f"{BASE}/boundary-{shift}"
        gradmap(["simulate", "--out", d, "--scenario", "aligned", "--gradient-shift", shift,
                 "--gradient-timing", timing, "--seed", 4, *small])
        with h5py.File(f"{d}/brain_fmri.h5") as f:
            la, lg = f["/truth/layer_activations"][()], f["/truth/layer_gradients"][()]
            sig = la >= 0
            assert sig.any() and (np.abs(lg[sig] - la[sig]) == shift).all()
        with h5py.File(f"{d}/brain_meg.h5") as f:
            ta, tg = f["/truth/latency_activations"][()], f["/truth/latency_gradients"][()]
            if timing == "flat":
                assert np.ptp(tg) == 0 and tg[-1] > ta[-1]
            else:
                assert np.isclose(tg[-1], ta[-1]) and (np.diff(tg) < 0).all()
    for bad in (["--scenario", "misaligned", "--gradient-shift", 1], ["--gradient-timing", "sideways"]):
        p = gradmap(["simulate", "--out", f"{BASE}/bad", *bad, *small], check=False)
        assert p.returncode != 0 and bad[-2] in p.stdout + p.stderr, p.stderr


def test_fmri_reliability_matches_the_snr():
    snr = 0.5
    for scen in ("misaligned", "aligned"):
        a = by_repetition(f"{BASE}/{scen}/brain_fmri.h5")
        rel = colcorr(a[0], a[1])
        with h5py.File(f"{BASE}/{scen}/brain_fmri.h5") as f:
            noise = f["/truth/noise_target"][()] == 1
        expect = snr / (1 + snr)
        assert abs(rel[~noise].mean() - expect) < 0.03, (scen, rel[~noise].mean())
        assert abs(rel[noise].mean()) < 0.01, rel[noise].mean()
        # noise voxels: sd 1/sqrt(500) = 0.045; none should look like signal
        assert (rel[noise] > 0.2).mean() < 0.01
    rel = colcorr(*by_repetition(f"{BASE}/null/brain_fmri.h5"))
    assert abs(rel.mean()) < 0.005 and (np.abs(rel) > 0.2).mean() < 0.01


def test_fmri_hierarchy_visible_from_pixel_statistics():
    with h5py.File(f"{BASE}/misaligned/stimuli.h5") as s:
        img = s["/stimuli/images"][()].astype(float) / 255
    x = np.concatenate([img.mean((1, 2)), img.std((1, 2)),
                        np.abs(np.diff(img, axis=1)).mean((1, 2, 3))[:, None],
                        np.abs(np.diff(img, axis=2)).mean((1, 2, 3))[:, None]], 1)
    with h5py.File(f"{BASE}/misaligned/brain_fmri.h5") as f:
        test = f["/brain/test_stimuli"][()]
        roi, noise = f["/brain/roi"][()], f["/truth/noise_target"][()]
        names = [n.decode() for n in f["/brain/roi_names"][()]]
    y = by_repetition(f"{BASE}/misaligned/brain_fmri.h5").mean(0)
    train = np.setdiff1d(np.arange(len(y)), test)
    xz = (x - x[train].mean(0)) / x[train].std(0)
    pred = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(xz[train], y[train]).predict(xz[test])
    r = colcorr(pred, y[test])
    per_roi = {n: r[(roi == k) & (noise == 0)].mean() for k, n in enumerate(names)}
    assert per_roi["V1"] > per_roi["hV4"] + 0.05 > per_roi["ventral"] + 0.05, per_roi
    assert abs(r[noise == 1].mean()) < 0.05, r[noise == 1].mean()


def test_meg_reliability_time_course():
    for scen in ("misaligned", "aligned", "null"):
        a = by_repetition(f"{BASE}/{scen}/brain_meg.h5")
        rel = colcorr(a[0], a[1])  # sensors x times
        with h5py.File(f"{BASE}/{scen}/brain_meg.h5") as f:
            t, noise = f["/brain/times"][()], f["/truth/noise_target"][()] == 1
        base = rel[:, t < 0]
        assert abs(base.mean()) < 0.02, (scen, base.mean())
        if scen == "null":
            assert np.abs(rel.mean(0)).max() < 0.04
            continue
        peak = rel[~noise].max(1)
        assert abs(np.median(peak) - 0.5 / 1.5) < 0.08, (scen, np.median(peak))
        curve = rel[~noise].mean(0)
        assert t[np.argmax(curve)] > 0.04
        assert abs(rel[noise].mean()) < 0.02


def test_things_meg_design_and_a_torchscript_reference_network():
    """--test-repetitions: THINGS-MEG's design (training images once, test images 12 times), the
    same for any rank count; --model torchscript:PATH as the reference network (its layers in
    /truth), here a torchvision ResNet-18 at 64 px."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import export_torchscript as ex
    import torch
    torch.manual_seed(0)
    model = f"{BASE}/resnet18.pt"
    ex.main(["torchvision", "resnet18", model, "--input-size", "64"])
    args = ["--images", 80, "--test-images", 10, "--repetitions", 1, "--test-repetitions", 12,
            "--modality", "meg", "--sensors", 5, "--times", 30, "--sfreq", 200, "--image-size", 64,
            "--model", f"torchscript:{model}"]
    for n in (1, 2):
        gradmap(["simulate", "--out", f"{BASE}/things{n}", *args], ranks=n)
    with h5py.File(f"{BASE}/things1/brain_meg.h5") as f, h5py.File(f"{BASE}/things2/brain_meg.h5") as g:
        ts, test = f["/brain/trial_stimulus"][()], f["/brain/test_stimuli"][()]
        shown = np.bincount(ts, minlength=80)
        assert len(ts) == 70 + 120 and (shown[test] == 12).all() and (np.delete(shown, test) == 1).all()
        assert np.array_equal(ts, g["/brain/trial_stimulus"][()])
        assert np.array_equal(f["/brain/responses"][()], g["/brain/responses"][()])
        layers = [x.decode() if isinstance(x, bytes) else x for x in f["/truth"].attrs["layers"]]
        assert layers == ["stem", "stage1", "stage2", "stage3", "stage4"], layers
        assert f["/truth"].attrs["model"] == f"torchscript:{model}"
    p = gradmap(["simulate", "--out", f"{BASE}/bad", "--test-repetitions", -1], check=False)
    assert p.returncode != 0 and "test-repetitions" in p.stdout + p.stderr, p.stderr


def test_memory_preflight_refuses_naming_the_option():
    # before any image is rendered through the network, on every rank, with the sizes
    from gmtest import expect_failure
    out = expect_failure(["simulate", "--out", f"{BASE}/pf", "--images", 4000, "--voxels", 100000,
                          "--voxel-chunk", 100000, "--memory-gb", 1, "--modality", "fmri"],
                         "lower --voxel-chunk (now 100000)", "1.49 GiB", "--memory-gb", ranks=2)
    assert "features: 0/" not in out and not os.path.exists(f"{BASE}/pf/brain_fmri.h5")
    expect_failure(["simulate", "--out", f"{BASE}/pf", "--images", 3000, "--memory-gb", 0.001],
                   "features of 3000 images x 336 dimensions", "lower --images", ranks=2)
    # the same brain fits once the option is lowered
    gradmap(["simulate", "--out", f"{BASE}/pf", "--images", 300, "--voxels", 3000, "--voxel-chunk",
             100, "--memory-gb", 0.05, "--modality", "fmri"], ranks=2)


run_tests([test_schema_of_every_file, test_truth_is_consistent_with_the_scenario,
           test_boundary_brains_for_the_verdicts,
           test_fmri_reliability_matches_the_snr, test_fmri_hierarchy_visible_from_pixel_statistics,
           test_meg_reliability_time_course, test_things_meg_design_and_a_torchscript_reference_network,
           test_memory_preflight_refuses_naming_the_option])
