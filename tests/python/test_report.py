"""`gradmap report` (the last stage of `gradmap run`): NIfTI-1 maps load in nibabel with the
brain file's volume shape and affine and hold the stats' values at each voxel; CSV tables parse
with pandas and agree with stats.h5 / summary.json; the PNG figures decode and are not blank;
index.html is self-contained (embedded figures)."""
import json
import os
import sys

import h5py
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gmtest import gradmap, run_tests, tmpdir  # noqa: E402

BASE = tmpdir("report")
DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "config", "demo.ini")


def setup():
    cfg = open(DEMO).read().replace("images = 600", "images = 300").replace("voxels = 1400", "voxels = 500")
    with open(f"{BASE}/run.ini", "w") as f:
        f.write(cfg + "\n[encode]\npermutations = 200\nbootstraps = 200\n")
    gradmap(["run", "--config", f"{BASE}/run.ini", "--out", f"{BASE}/out"], ranks=2, timeout=600)


def test_nifti_maps():
    out = f"{BASE}/out"
    with h5py.File(f"{out}/data/brain_fmri.h5") as b, h5py.File(f"{out}/stats/stats.h5") as s:
        shape = tuple(b["/brain"].attrs["volume_shape"])
        affine = np.asarray(b["/brain"].attrs["affine"]).reshape(4, 4)
        ijk = b["/brain/voxel_ijk"][()]
        for kind in ("activations", "gradients"):
            r = s[f"/fmri/{kind}/r"][()]
            q = s[f"/fmri/{kind}/q_bh"][()]
            peak = s[f"/fmri/{kind}/peak_layer"][()]
            img = nib.load(f"{out}/report/maps/best_r_{kind}.nii")
            assert img.shape == shape, img.shape
            assert np.allclose(img.affine, affine, atol=1e-5), img.affine
            data = img.get_fdata()
            assert np.allclose(data[ijk[:, 0], ijk[:, 1], ijk[:, 2]], np.nanmax(r, 0), atol=1e-6)
            pk = nib.load(f"{out}/report/maps/peak_layer_{kind}.nii").get_fdata()
            assert np.array_equal(pk[ijk[:, 0], ijk[:, 1], ijk[:, 2]], peak + 1)
            qm = nib.load(f"{out}/report/maps/q_bh_min_{kind}.nii").get_fdata()
            assert np.allclose(qm[ijk[:, 0], ijk[:, 1], ijk[:, 2]], np.nanmin(q, 0), atol=1e-6)
            mask = np.ones(shape, bool)
            mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = False
            assert (data[mask] == 0).all() and (qm[mask] == 1).all()


def test_csv_tables():
    out = f"{BASE}/out"
    summ = json.load(open(f"{out}/stats/summary.json"))
    h = pd.read_csv(f"{out}/report/tables/headline.csv")
    for _, row in h.iterrows():
        st = summ[row.modality][row.statistic]
        st = st[row.kind] if isinstance(row.kind, str) else st
        assert np.isclose(row.value, st["value"]) and np.isclose(row.p, st["p"])
    roi = pd.read_csv(f"{out}/report/tables/roi_layer_scores.csv")
    with h5py.File(f"{out}/stats/stats.h5") as s:
        g = s["/fmri/gradients/group_r"][()]
        layers = [str(x) for x in s["/fmri"].attrs["layers"]]
    sel = roi[roi.kind == "gradients"]
    assert len(sel) == g.size
    for _, row in sel.iterrows():
        j = list(dict.fromkeys(sel.roi)).index(row.roi)
        assert np.isclose(row.mean_r, g[layers.index(row.layer), j], atol=1e-7)
    lat = pd.read_csv(f"{out}/report/tables/latency_curves.csv")
    assert set(lat.columns) == {"kind", "layer", "time_s", "mean_r"} and len(lat) > 0


def test_figures_and_html():
    out = f"{BASE}/out/report"
    names = sorted(os.listdir(f"{out}/figures"))
    assert names == ["fmri_peak_layers.png", "fmri_roi_layer.png", "headline.png",
                     "meg_latency_curves.png", "meg_peak_latency.png"], names
    for n in names:
        img = plt.imread(f"{out}/figures/{n}")
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05, f"{n} looks blank"
    page = open(f"{out}/index.html").read()
    assert page.count("data:image/png;base64,") == len(names)
    assert "rho_space" in page and "D_time" in page


def test_missing_stats_is_an_error():
    p = gradmap(["report", "--stats", f"{BASE}/nowhere", "--out", f"{BASE}/r2"], ranks=2, check=False)
    assert p.returncode != 0 and f"{BASE}/nowhere/stats.h5" in p.stdout + p.stderr


if __name__ == "__main__":
    setup()
    run_tests([test_nifti_maps, test_csv_tables, test_figures_and_html, test_missing_stats_is_an_error])
