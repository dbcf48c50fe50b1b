"""gradmap import-nsd on a miniature NSD written in the published formats by the tools the NSD
authors use: h5py (nsd_stimuli.hdf5 with small images; betas_sessionYY.hdf5 int16 (750, Z, Y, X)
chunked (750, 1, 1, 1)), scipy.io.savemat (nsd_expdesign.mat with full-size masterordering,
subjectim, sharedix; compressed v7 and uncompressed v5, several numeric classes) and nibabel
(betas .nii.gz (X, Y, Z, 750), nsdgeneral / prf-visualrois / streams ROI files, one with a
qform-only affine and one stored through scl_slope). The imported files are checked exactly
against numpy recomputations; the import runs through extract, encode and stats; bad inputs give
errors naming the file or option."""
import os

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from gmtest import gradmap, run_tests, tmpdir, assert_h5_identical, config_from_template

BASE = tmpdir("nsd")
ROOT = f"{BASE}/nsd"
SUBJ = 2
SESSIONS = 3
X, Y, Z = 7, 6, 5
# A rotated, x-flipped 1.8 mm grid (rigid, so that a qform can hold it exactly).
_c, _s = np.cos(0.1), np.sin(0.1)
AFFINE = np.eye(4)
AFFINE[:3, :3] = np.array([[1, 0, 0], [0, _c, -_s], [0, _s, _c]]) @ np.diag([-1.8, 1.8, 1.8])
AFFINE[:3, 3] = [60.0, -80.0, -40.0]
rng = np.random.default_rng(7)

# Design: full-size arrays. Each subject's 10k list starts with the 1000 shared images.
sharedix = np.sort(rng.choice(np.arange(1, 73001), 1000, replace=False))
subjectim = np.zeros((8, 10000), dtype=np.int64)
others = np.setdiff1d(np.arange(1, 73001), sharedix)
for s in range(8):
    subjectim[s, :1000] = rng.permutation(sharedix)
    subjectim[s, 1000:] = rng.choice(others, 9000, replace=False)
# Trials draw from 40 shared and 160 unshared slots so that images repeat (as in NSD).
masterordering = np.where(rng.random(30000) < 0.25, rng.integers(1, 41, 30000),
                          rng.integers(1001, 1161, 30000))
N_BRICK, SIDE = 73000, 10


def ni_scaled(path, labels):
    """A label volume stored as int16 raw = 4 label + 2 with scl_slope 0.25, scl_inter -0.5 (the
    header fields patched after nibabel writes it, since nibabel picks its own scaling)."""
    import gzip
    tmp = path[:-3]
    nib.Nifti1Image((labels * 4 + 2).astype(np.int16), AFFINE).to_filename(tmp)
    raw = bytearray(open(tmp, "rb").read())
    raw[112:120] = np.array([0.25, -0.5], dtype="<f4").tobytes()
    os.remove(tmp)
    with gzip.open(path, "wb") as f:
        f.write(bytes(raw))


def ni(path, data, affine=AFFINE, qform_only=False, dtype=None):
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if qform_only:
        img.set_qform(affine, code=1)
        img.set_sform(None, code=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.to_filename(path)


def write_nsd():
    os.makedirs(f"{ROOT}/nsddata/experiments/nsd")
    scipy.io.savemat(f"{ROOT}/nsddata/experiments/nsd/nsd_expdesign.mat",
                     {"masterordering": masterordering[None, :].astype(np.float64),
                      "subjectim": subjectim.astype(np.int32), "sharedix": sharedix[None, :].astype(np.uint32),
                      "basiccnt": np.ones((3, 40)), "stimpattern": np.zeros((40, 12, 75), dtype=np.uint8)},
                     do_compression=True)
    os.makedirs(f"{ROOT}/nsddata_stimuli/stimuli/nsd")
    brick = rng.integers(0, 256, (N_BRICK, SIDE, SIDE, 3), dtype=np.uint8)
    with h5py.File(f"{ROOT}/nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=brick, chunks=(1, SIDE, SIDE, 3))
    roi = f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi"
    general = rng.choice([-1, 0, 1], (X, Y, Z), p=[0.2, 0.2, 0.6]).astype(np.int16)
    ni(f"{roi}/nsdgeneral.nii.gz", general)
    prf = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7], (X, Y, Z))
    ni_scaled(f"{roi}/prf-visualrois.nii.gz", prf)
    streams = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7], (X, Y, Z)).astype(np.float32)
    ni(f"{roi}/streams.nii.gz", streams, qform_only=True)
    bdir = f"{ROOT}/nsddata_betas/ppdata/subj{SUBJ:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    os.makedirs(bdir)
    betas = []
    for s in range(1, SESSIONS + 1):
        b = rng.normal(0, 900, (X, Y, Z, 750)).round().astype(np.int16)
        b[..., :] += rng.integers(-500, 500, (X, Y, Z, 1)).astype(np.int16)
        betas.append(b)
        ni(f"{bdir}/betas_session{s:02d}.nii.gz", b)
        with h5py.File(f"{bdir}/betas_session{s:02d}.hdf5", "w") as f:
            f.create_dataset("betas", data=b.transpose(3, 2, 1, 0), chunks=(750, 1, 1, 1))
    return brick, general, betas


BRICK, GENERAL, BETAS = write_nsd()


def expected(sessions, zscore=True):
    ids_trial = np.concatenate([subjectim[SUBJ - 1, masterordering[(s - 1) * 750:s * 750] - 1]
                                for s in sessions])
    ids = np.unique(ids_trial)
    mask = GENERAL > 0
    lin = np.flatnonzero(mask.transpose(2, 1, 0).ravel())  # i fastest
    i, j, k = lin % X, (lin // X) % Y, lin // (X * Y)
    resp = []
    for s in sessions:
        b = BETAS[s - 1][i, j, k, :].T.astype(np.float64) / 300.0
        if zscore:
            b = (b - b.mean(0)) / b.std(0)
        resp.append(b)
    return ids_trial, ids, np.stack([i, j, k], 1), np.concatenate(resp)


def check_import(out, sessions, fmt_label):
    ids_trial, ids, ijk, resp = expected(sessions)
    with h5py.File(f"{out}/stimuli.h5", "r") as s, h5py.File(f"{out}/brain_fmri.h5", "r") as b:
        assert s.attrs["gradmap_schema"] == 1 and b.attrs["modality"] in (b"fmri", "fmri")
        assert np.array_equal(s["stimuli/ids"][:], ids), "stimuli ids are not the sorted 73k ids"
        assert np.array_equal(s["stimuli/images"][:], BRICK[ids - 1]), "images differ from imgBrick[id-1]"
        ts = b["brain/trial_stimulus"][:]
        assert np.array_equal(ids[ts], ids_trial), "trial -> image mapping is wrong"
        test = b["brain/test_stimuli"][:]
        assert np.array_equal(np.sort(ids[test]), np.intersect1d(ids, sharedix)), "test images != shared"
        assert np.array_equal(b["brain/voxel_ijk"][:], ijk), "voxel coordinates"
        assert tuple(b["brain"].attrs["volume_shape"]) == (X, Y, Z)
        aff = np.asarray(b["brain"].attrs["affine"]).reshape(4, 4)
        ref = nib.load(f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi/nsdgeneral.nii.gz").affine
        assert np.allclose(aff, ref, atol=1e-5), f"affine {aff} vs nibabel {ref}"
        r = b["brain/responses"][:]
        assert r.dtype == np.float32 and r.shape == resp.shape, f"{fmt_label}: shape {r.shape}"
        err = np.abs(r - resp).max()
        assert err < 1e-5, f"{fmt_label}: responses differ from zscore(betas / 300) by {err}"
        # ROI labels: prf-visualrois first, then streams 2..7.
        names = [n.decode() if isinstance(n, bytes) else n for n in b["brain/roi_names"][:]]
        levels = b["brain/roi_level"][:]
        prf = np.rint(nib.load(f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi/prf-visualrois.nii.gz").get_fdata())
        st = np.rint(nib.load(f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi/streams.nii.gz").get_fdata())
        pn = {1: "V1", 2: "V1", 3: "V2", 4: "V2", 5: "V3", 6: "V3", 7: "hV4"}
        sn = {2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral", 6: "lateral", 7: "parietal"}
        want = []
        for a, c, d in ijk:
            p_, s_ = int(prf[a, c, d]), int(st[a, c, d])
            want.append(pn.get(p_, sn.get(s_)))
        got = [names[x] if x >= 0 else None for x in b["brain/roi"][:]]
        assert got == want, f"ROI labels differ at {sum(g != w for g, w in zip(got, want))} voxels"
        lv = dict(zip(names, levels))
        assert lv["V1"] < lv["V2"] < lv["V3"] < lv["hV4"] < lv["midventral"] < lv["ventral"], lv


def test_header_paths_exercised():
    img = nib.load(f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi/prf-visualrois.nii.gz")
    slope, inter = img.dataobj.slope, img.dataobj.inter  # nibabel moves scaling to the proxy
    assert slope == 0.25 and inter == -0.5, "prf-visualrois was meant to be stored with a scl_slope"
    hs = nib.load(f"{ROOT}/nsddata/ppdata/subj{SUBJ:02d}/func1pt8mm/roi/streams.nii.gz").header
    assert hs["sform_code"] == 0 and hs["qform_code"] == 1, "streams was meant to have a qform only"


def test_hdf5_betas_exact():
    out = f"{BASE}/h5"
    gradmap(["import-nsd", "--nsd-root", ROOT, "--subject", SUBJ, "--out", out, "--sessions", "1-3",
             "--betas-format", "hdf5"], ranks=2)
    check_import(out, [1, 2, 3], "hdf5")


def test_nifti_betas_exact_and_rank_independent():
    out = f"{BASE}/nii"
    gradmap(["import-nsd", "--nsd-root", ROOT, "--subject", SUBJ, "--out", out, "--sessions", "1-3",
             "--betas-format", "nifti"], ranks=1)
    check_import(out, [1, 2, 3], "nifti")
    out3 = f"{BASE}/nii3"
    gradmap(["import-nsd", "--nsd-root", ROOT, "--subject", SUBJ, "--out", out3, "--sessions", "1-3",
             "--betas-format", "nifti"], ranks=3)
    for f in ("stimuli.h5", "brain_fmri.h5"):
        assert_h5_identical(f"{out}/{f}", f"{out3}/{f}")


def test_session_subset_and_percent_signal_change():
    out = f"{BASE}/psc"
    gradmap(["import-nsd", "--nsd-root", ROOT, "--subject", SUBJ, "--out", out, "--sessions", "2",
             "--zscore", "false"], ranks=2)
    ids_trial, ids, ijk, _ = expected([2])
    _, _, _, raw = expected([2], zscore=False)
    with h5py.File(f"{out}/brain_fmri.h5", "r") as b, h5py.File(f"{out}/stimuli.h5", "r") as s:
        assert np.array_equal(s["stimuli/ids"][:][b["brain/trial_stimulus"][:]], ids_trial)
        assert np.abs(b["brain/responses"][:] - raw).max() < 1e-5, "percent signal change = betas / 300"


def test_uncompressed_v5_design_and_resized_images():
    from PIL import Image
    root2 = f"{BASE}/nsd_v5"
    os.symlink(f"{ROOT}/nsddata_betas", f"{BASE}/betas_link")
    os.makedirs(f"{root2}/nsddata/experiments/nsd")
    os.symlink(f"{ROOT}/nsddata/ppdata", f"{root2}/nsddata/ppdata")
    os.symlink(f"{ROOT}/nsddata_betas", f"{root2}/nsddata_betas")
    os.symlink(f"{ROOT}/nsddata_stimuli", f"{root2}/nsddata_stimuli")
    scipy.io.savemat(f"{root2}/nsddata/experiments/nsd/nsd_expdesign.mat",
                     {"masterordering": masterordering[None, :].astype(np.uint16),
                      "subjectim": subjectim.astype(np.float64), "sharedix": sharedix[None, :].astype(np.float32)},
                     do_compression=False, format="5")
    out = f"{BASE}/v5"
    gradmap(["import-nsd", "--nsd-root", root2, "--subject", SUBJ, "--out", out, "--sessions", "1",
             "--image-size", "7"], ranks=2)
    ids_trial, ids, _, _ = expected([1])
    with h5py.File(f"{out}/stimuli.h5", "r") as s:
        assert np.array_equal(s["stimuli/ids"][:], ids)
        imgs = s["stimuli/images"][:]
        assert imgs.shape == (len(ids), 7, 7, 3)
        ref = np.stack([np.asarray(Image.fromarray(BRICK[i - 1]).resize((7, 7), Image.BILINEAR)) for i in ids])
        d = np.abs(imgs.astype(int) - ref.astype(int))
        assert d.max() <= 1, f"resize differs from Pillow's antialiased bilinear by up to {d.max()}"


def test_end_to_end_extract_encode_stats():
    src = f"{BASE}/h5"
    gradmap(["extract", "--stimuli", f"{src}/stimuli.h5", "--out", f"{BASE}/features.h5",
             "--model", "builtin:tinycnn", "--labels", "self", "--batch-size", "32"], ranks=2, timeout=600)
    gradmap(["encode", "--features", f"{BASE}/features.h5", "--brain", f"{src}/brain_fmri.h5",
             "--out", f"{BASE}/scores.h5", "--permutations", "50", "--bootstraps", "50"], ranks=2)
    gradmap(["stats", "--scores", f"{BASE}/scores.h5", "--out", f"{BASE}/stats"], ranks=2)
    with h5py.File(f"{BASE}/scores.h5", "r") as s:
        r = s["activations/r"][:]
        _, _, _, resp = expected([1, 2, 3])
        assert r.shape[1] == resp.shape[1] and np.isfinite(r).all()
    import json
    summ = json.load(open(f"{BASE}/stats/summary.json"))
    assert "fmri" in summ and "rho_space" in summ["fmri"]


def bad(args, *needles, ranks=2):
    p = gradmap(["import-nsd", "--nsd-root", ROOT, "--out", f"{BASE}/bad", *args], ranks=ranks, check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0, f"{args}: exit 0"
    for n in needles:
        assert n in text, f"{args}: message lacks '{n}':\n{text}"
    assert not os.path.exists(f"{BASE}/bad/brain_fmri.h5"), "a failed import left a final-named output"


def test_bad_inputs():
    bad(["--subject", "9"], "--subject", "1..8")
    bad(["--subject", str(SUBJ), "--sessions", "41"], "--sessions", "1..40")
    bad(["--subject", str(SUBJ), "--sessions", "1-4"], "betas_session04", "missing")
    bad(["--subject", "3", "--sessions", "1"], "subj03", "missing")
    other = f"{BASE}/othergrid.nii.gz"
    ni(other, np.ones((X + 1, Y, Z), dtype=np.int16))
    bad(["--subject", str(SUBJ), "--sessions", "1", "--mask", other, "--betas-format", "nifti"],
        "betas_session01.nii.gz", "othergrid.nii.gz")
    bad(["--subject", str(SUBJ), "--sessions", "1", "--mask", other, "--betas-format", "hdf5"],
        "betas_session01.hdf5", "othergrid.nii.gz")
    bad(["--subject", str(SUBJ), "--sessions", "1", "--rois", "kastner"], "--rois", "kastner")
    bad(["--subject", str(SUBJ), "--sessions", "x"], "--sessions")
    # A corrupt (truncated) design file.
    root3 = f"{BASE}/nsd_trunc"
    os.makedirs(f"{root3}/nsddata/experiments/nsd")
    for d in ("nsddata/ppdata", "nsddata_betas", "nsddata_stimuli"):
        os.symlink(f"{ROOT}/{d}", f"{root3}/{d}")
    data = open(f"{ROOT}/nsddata/experiments/nsd/nsd_expdesign.mat", "rb").read()
    open(f"{root3}/nsddata/experiments/nsd/nsd_expdesign.mat", "wb").write(data[: len(data) // 2])
    p = gradmap(["import-nsd", "--nsd-root", root3, "--out", f"{BASE}/bad", "--subject", str(SUBJ),
                 "--sessions", "1"], ranks=2, check=False)
    assert p.returncode != 0 and "nsd_expdesign.mat" in p.stdout + p.stderr, p.stdout + p.stderr


def test_run_with_the_nsd_config():
    ini = config_from_template("nsd.ini", {
        "import-nsd": {"nsd-root": ROOT, "subject": SUBJ, "sessions": "1-2"},
        "extract": {"model": "builtin:tinycnn", "objective": "cosine", "pooling": "mean", "pca": 0,
                    "batch-size": 64},
        "encode": {"permutations": 40, "bootstraps": 40}}, f"{BASE}/nsd.ini")
    out = f"{BASE}/run"
    p = gradmap(["run", "--config", ini, "--out", out], ranks=2, timeout=900)
    assert os.path.exists(f"{out}/report/index.html"), p.stdout
    with h5py.File(f"{out}/data/brain_fmri.h5", "r") as b:
        assert "gradmap_run_key" in b.attrs and b.attrs["gradmap_schema"] == 1
    p = gradmap(["run", "--config", ini, "--out", out], ranks=2)
    assert "stage import-nsd is up to date" in p.stdout + p.stderr, p.stdout + p.stderr


if __name__ == "__main__":
    run_tests([test_header_paths_exercised, test_hdf5_betas_exact, test_nifti_betas_exact_and_rank_independent,
               test_session_subset_and_percent_signal_change, test_uncompressed_v5_design_and_resized_images,
               test_end_to_end_extract_encode_stats, test_run_with_the_nsd_config, test_bad_inputs])
