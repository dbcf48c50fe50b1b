"""`gradmap report` (the last stage of `gradmap run`): NIfTI-1 maps load in nibabel with the
brain file's volume shape and affine and hold the stats' values at each voxel; CSV tables parse
with pandas and agree with stats.h5 / summary.json; the PNG figures decode and are not blank;
index.html is self-contained (embedded figures) and, rendered in headless Chromium at 1280 px, has
no horizontal overflow and every figure loads and fits the page."""
import html
import json
import os
import re
import subprocess
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
        vv = nib.load(f"{out}/report/maps/D_space_voxel_verdict.nii").get_fdata()
        verdict = s["/fmri/D_space_voxel/verdict"][()]
        assert np.array_equal(vv[ijk[:, 0], ijk[:, 1], ijk[:, 2]], verdict) and (vv[mask] == 0).all()


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
    # the demo runs encode --joint: the unique-variance verdicts, counts and table rows
    assert "D_space_unique" in page and "D_time_unique" in page and "unique gradient variance" in page
    summ = json.load(open(f"{BASE}/out/stats/summary.json"))
    n = summ["fmri"]["unique_gradients"]["n_significant_bh"]
    assert f"fmri: {n} of {summ['fmri']['unique_gradients']['targets']} targets" in page


LAYOUT_PROBE = """<script>
window.addEventListener('load', function () {
  var w = window.innerWidth, imgs = Array.from(document.images);
  var r = {width: w, scroll_width: document.documentElement.scrollWidth,
           images: imgs.map(function (i) { var b = i.getBoundingClientRect();
             return {alt: i.alt, loaded: i.complete && i.naturalWidth > 0, right: b.right}; })};
  var pre = document.createElement('pre'); pre.id = 'gm-layout'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def layout(page_html, where):
    """Renders a page in headless Chromium at 1280 x 900 px and returns what the probe measured:
    the viewport and document widths and, per image, whether it loaded and its right edge."""
    probe = os.path.join(where, "layout-probe.html")
    with open(probe, "w") as f:
        f.write(page_html.replace("</body>", LAYOUT_PROBE + "</body>"))
    p = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                        "--virtual-time-budget=10000", "--dump-dom", "file://" + probe],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="gm-layout">(.*?)</pre>', p.stdout, re.S)
    assert m, f"chromium rendered no probe result (exit {p.returncode}): {p.stderr[-1000:]}"
    return json.loads(html.unescape(m.group(1)))


def test_page_layout_in_headless_chromium():
    """The page as people read it (Debian's chromium, 1280 px): no horizontal overflow, every
    figure loads and fits the page width. The same probe on the page without its image-scaling
    rule must see the overflow (the check can fail)."""
    out = f"{BASE}/out/report"
    page = open(f"{out}/index.html").read()
    r = layout(page, out)
    assert len(r["images"]) == page.count("<img"), r
    assert r["scroll_width"] <= r["width"], r
    for img in r["images"]:
        assert img["loaded"], img
        assert img["right"] <= r["width"], img
    assert "/tmp/" not in page and os.path.abspath(BASE) not in page  # no absolute path of this machine
    unscaled = layout(page.replace("img{max-width:100%;height:auto}", ""), out)
    assert unscaled["scroll_width"] > unscaled["width"] or any(
        i["right"] > unscaled["width"] for i in unscaled["images"]), unscaled


def test_controls_run_and_appear_side_by_side():
    """[run] controls: each control is analysed in OUT/controls/<control>/ (its features made with
    extract --randomize-weights / --labels shuffled) and the model's report shows its headline
    counts and verdicts beside the controls'."""
    cfg = open(DEMO).read().replace("images = 600", "images = 160").replace("voxels = 1400", "voxels = 200")
    cfg = cfg.replace("modality = both", "modality = fmri").replace("[run]\n", "[run]\ncontrols = random-weights, shuffled-labels\n")
    with open(f"{BASE}/controls.ini", "w") as f:
        f.write(cfg + "\n[encode]\npermutations = 100\nbootstraps = 50\n")
    out = f"{BASE}/controls-out"
    gradmap(["run", "--config", f"{BASE}/controls.ini", "--out", out], ranks=2, timeout=600)
    with h5py.File(f"{out}/controls/random-weights/features.h5") as f:
        assert f["/features"].attrs["randomize_weights"] == 1
    with h5py.File(f"{out}/controls/shuffled-labels/features.h5") as f:
        assert f["/features"].attrs["labels"] == "shuffled"
    with h5py.File(f"{out}/features.h5") as f, h5py.File(f"{out}/controls/shuffled-labels/features.h5") as g:
        assert np.array_equal(f["/features/activations/conv1"][()], g["/features/activations/conv1"][()])
        assert not np.array_equal(f["/features/gradients/conv1"][()], g["/features/gradients/conv1"][()])
    page = open(f"{out}/report/index.html").read()
    assert "<h2>Controls</h2>" in page
    table = page.split("<h2>Controls</h2>")[1].split("</table>")[0]
    for name in ("model", "random-weights", "shuffled-labels"):
        summ = json.load(open(f"{out}/stats/summary.json" if name == "model" else
                              f"{out}/controls/{name}/stats/summary.json"))["fmri"]
        row = f"<tr><td>{name}</td><td>fmri</td><td>{max(summ['significant']['activations']['bh'])}</td>"
        assert row in table, (row, table)
        assert f"<td>{summ['unique_gradients']['n_significant_bh']}</td>" in table.split(f"<td>{name}</td>")[1]
    expect = gradmap(["run", "--config", f"{BASE}/controls.ini", "--out", out, "--controls", "bogus"],
                     check=False)
    assert expect.returncode != 0 and "--controls: 'bogus'" in expect.stdout + expect.stderr


def test_missing_stats_is_an_error():
    p = gradmap(["report", "--stats", f"{BASE}/nowhere", "--out", f"{BASE}/r2"], ranks=2, check=False)
    assert p.returncode != 0 and f"{BASE}/nowhere/stats.h5" in p.stdout + p.stderr


if __name__ == "__main__":
    setup()
    run_tests([test_nifti_maps, test_csv_tables, test_figures_and_html, test_page_layout_in_headless_chromium,
               test_controls_run_and_appear_side_by_side, test_missing_stats_is_an_error])
