"""gradmap import-things-meg on a miniature THINGS-MEG participant written with the real writers:
MNE EpochsArray(..., metadata=...).save (CTF axial-gradiometer channels with reference and
stimulus channels, a bad channel, 200 Hz, -0.1..1.3 s, split into chained -epo.fif parts) and
PIL JPEGs in THINGS' images_meg/<concept>/ and images_test_meg/ folders. The imported files are
checked exactly (trial -> image mapping, test images, catch trials dropped, data, times, sensor
names, decoded and resized images against Pillow); the import runs through extract, encode and
stats; bad inputs give errors naming the file."""
import glob
import json
import os

import h5py
import mne
import numpy as np
import pandas as pd
from PIL import Image

from gmtest import gradmap, run_tests, tmpdir, assert_h5_identical, config_from_template

BASE = tmpdir("things")
rng = np.random.default_rng(11)
SFREQ, TMIN, NT = 200.0, -0.1, 281
N_MEG = 24
CONCEPTS = ["aardvark", "abacus", "accordion", "acorn", "air_conditioner", "airplane", "alligator",
            "altar", "ambulance", "anchor"]


def write_images():
    paths = []
    for c_i, c in enumerate(CONCEPTS):
        os.makedirs(f"{BASE}/images/images_meg/{c}", exist_ok=True)
        for k in range(4):  # 40 exp images of assorted sizes, one grayscale
            rel = f"images_meg/{c}/{c}_{k:02d}s.jpg"
            h, w = (36, 48) if (c_i + k) % 3 == 0 else (40, 40)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if c_i == 0 and k == 0:
                img = img.convert("L")
            img.save(f"{BASE}/images/{rel}", quality=90)
            paths.append((rel, c_i + 1, c_i * 4 + k + 1))
    tests = []
    os.makedirs(f"{BASE}/images/images_test_meg", exist_ok=True)
    for k in range(8):
        rel = f"images_test_meg/test_{k:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{BASE}/images/{rel}")
        tests.append((rel, 100 + k, 1000 + k))
    return paths, tests


EXP, TEST = write_images()


def make_epochs(with_metadata=True):
    meg = [f"M{'LR'[i % 2]}O{i // 2 + 11}-4408" for i in range(N_MEG)]
    names = meg + ["BG1-4408", "BP1-4408", "UPPT001"]
    types = ["mag"] * N_MEG + ["ref_meg", "ref_meg", "stim"]
    info = mne.create_info(names, SFREQ, types)
    for ch in info["chs"][:N_MEG]:
        ch["coil_type"] = mne.io.constants.FIFF.FIFFV_COIL_CTF_GRAD
        ch["loc"][:3] = rng.normal(0, 0.08, 3)
    info["bads"] = [meg[5]]
    rows = []
    for sess in (1, 2):
        for rel, cat, nr in EXP:
            if (nr + sess) % 2 == 0 or sess == 1:
                rows.append(dict(trial_type="exp", session_nr=sess, things_category_nr=cat, things_image_nr=nr, image_path=rel))
        for rel, cat, nr in TEST:
            rows.append(dict(trial_type="test", session_nr=sess, things_category_nr=cat, things_image_nr=nr, image_path=rel))
        for k in range(5):
            rows.append(dict(trial_type="catch", session_nr=sess, things_category_nr=-1, things_image_nr=-1, image_path="images_catch_meg/x.jpg"))
    order = rng.permutation(len(rows))
    md = pd.DataFrame([rows[i] for i in order])
    data = rng.normal(0, 1, (len(md), len(names), NT))
    # Responses that depend on the image, so encoding has something to find.
    for t, p in enumerate(md["image_path"]):
        data[t, :N_MEG, 60:160] += (hash(p) % 7 - 3) * 0.5
    ep = mne.EpochsArray(data, info, tmin=TMIN, metadata=md if with_metadata else None, verbose="error")
    return ep, md, data


def save(ep, name, split=None):
    os.makedirs(f"{BASE}/meg", exist_ok=True)
    path = f"{BASE}/meg/{name}-epo.fif"
    ep.save(path, overwrite=True, split_size=split or "2GB", verbose="error")
    return path


EP, MD, DATA = make_epochs()
FIF = save(EP, "preprocessed_P1", split="2MB")


def test_fif_is_split():
    parts = sorted(glob.glob(f"{BASE}/meg/preprocessed_P1-epo*.fif"))
    assert len(parts) >= 2, f"the miniature FIF was meant to be split, found {parts}"


def check(out):
    keep = (MD["trial_type"] != "catch").to_numpy()
    picks = [i for i in range(N_MEG) if i != 5]
    with h5py.File(f"{out}/brain_meg.h5", "r") as b, h5py.File(f"{out}/stimuli.h5", "r") as s:
        assert b.attrs["modality"] in ("meg", b"meg") and b.attrs["gradmap_schema"] == 1
        r = b["brain/responses"][:]
        want = DATA[keep][:, picks, :].astype(np.float32)
        assert r.shape == want.shape, f"{r.shape} vs {want.shape}"
        assert np.abs(r - want).max() <= 1e-6 * np.abs(want).max(), "responses differ from the saved epochs"
        assert np.allclose(b["brain/times"][:], TMIN + np.arange(NT) / SFREQ, atol=1e-9)
        names = [x.decode() if isinstance(x, bytes) else x for x in b["brain/sensor_names"][:]]
        assert names == [EP.ch_names[i] for i in picks], "sensor names (MEG only, bads excluded)"
        paths = [x.decode() if isinstance(x, bytes) else x for x in s["stimuli/paths"][:]]
        assert paths == sorted(set(MD["image_path"][keep])), "one stimulus per distinct image"
        ts = b["brain/trial_stimulus"][:]
        assert [paths[i] for i in ts] == list(MD["image_path"][keep]), "trial -> image mapping"
        test = sorted(paths[i] for i in b["brain/test_stimuli"][:])
        assert test == sorted(p for p, _, _ in TEST), "test images"
        nr = dict((p, n) for p, _, n in EXP + TEST)
        assert list(s["stimuli/ids"][:]) == [nr[p] for p in paths], "ids = things_image_nr"
        imgs = s["stimuli/images"][:]
        assert imgs.shape == (len(paths), 24, 24, 3)
        for i, p in enumerate(paths):
            im = Image.open(f"{BASE}/images/{p}").convert("RGB")
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            ref = np.asarray(im.resize((24, 24), Image.BILINEAR)).astype(int)
            d = np.abs(imgs[i].astype(int) - ref).max()
            assert d <= 1, f"{p}: image differs from Pillow (decode, centre crop, antialiased resize) by {d}"


def test_import_exact():
    gradmap(["import-things-meg", "--epochs", FIF, "--images", f"{BASE}/images", "--out", f"{BASE}/out",
             "--image-size", "24", "--block", "7"], ranks=2)
    check(f"{BASE}/out")
    assert not glob.glob(f"{BASE}/out/*.partial")


def test_rank_independent_and_images_folder_variant():
    # --images may also be the folder that holds the concept folders' parent (images_meg/ stripped).
    os.makedirs(f"{BASE}/flat", exist_ok=True)
    for d in ("images_meg", "images_test_meg"):
        for p in glob.glob(f"{BASE}/images/{d}/**/*.jpg", recursive=True):
            rel = os.path.relpath(p, f"{BASE}/images/{d}")
            os.makedirs(os.path.dirname(f"{BASE}/flat/{rel}"), exist_ok=True)
            os.link(p, f"{BASE}/flat/{rel}")
    gradmap(["import-things-meg", "--epochs", FIF, "--images", f"{BASE}/flat", "--out", f"{BASE}/out3",
             "--image-size", "24"], ranks=3)
    for f in ("stimuli.h5",):
        assert_h5_identical(f"{BASE}/out/{f}", f"{BASE}/out3/{f}")
    check(f"{BASE}/out3")


def test_end_to_end_extract_encode_stats():
    out = f"{BASE}/out"
    gradmap(["extract", "--stimuli", f"{out}/stimuli.h5", "--out", f"{BASE}/features.h5",
             "--model", "builtin:tinycnn", "--labels", "self"], ranks=2, timeout=600)
    gradmap(["encode", "--features", f"{BASE}/features.h5", "--brain", f"{out}/brain_meg.h5",
             "--out", f"{BASE}/scores.h5", "--permutations", "30", "--bootstraps", "30"], ranks=2)
    gradmap(["stats", "--scores", f"{BASE}/scores.h5", "--out", f"{BASE}/stats"], ranks=2)
    with h5py.File(f"{BASE}/scores.h5", "r") as s:
        assert s["activations/r"].shape[1] == (N_MEG - 1) * NT
    summ = json.load(open(f"{BASE}/stats/summary.json"))
    assert "meg" in summ and "rho_time" in summ["meg"]


def bad(args, *needles):
    p = gradmap(["import-things-meg", "--out", f"{BASE}/bad", *args], ranks=2, check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0, f"{args}: exit 0"
    for n in needles:
        assert n in text, f"{args}: message lacks '{n}':\n{text}"
    assert not os.path.exists(f"{BASE}/bad/brain_meg.h5") and not os.path.exists(f"{BASE}/bad/stimuli.h5")


def test_bad_inputs():
    nometa = save(make_epochs(with_metadata=False)[0], "nometa")
    bad(["--epochs", nometa, "--images", f"{BASE}/images"], "nometa-epo.fif", "metadata")
    bad(["--epochs", f"{BASE}/meg/absent-epo.fif", "--images", f"{BASE}/images"], "--epochs", "absent-epo.fif")
    os.makedirs(f"{BASE}/partial_images/images_meg", exist_ok=True)
    bad(["--epochs", FIF, "--images", f"{BASE}/partial_images"], "image file missing", "aardvark_00s.jpg")
    bad(["--epochs", FIF, "--images", f"{BASE}/images", "--image-size", "2"], "--image-size")
    junk = f"{BASE}/meg/junk-epo.fif"
    open(junk, "wb").write(b"not a fif file at all" * 10)
    bad(["--epochs", junk, "--images", f"{BASE}/images"], "junk-epo.fif")


def test_run_with_the_things_meg_config():
    ini = config_from_template("things_meg.ini", {
        "import-things-meg": {"epochs": FIF, "images": f"{BASE}/images", "image-size": 32},
        "extract": {"model": "builtin:tinycnn", "pca": 0},
        "encode": {"permutations": 30, "bootstraps": 30}}, f"{BASE}/things.ini")
    out = f"{BASE}/run"
    p = gradmap(["run", "--config", ini, "--out", out], ranks=2, timeout=900)
    assert os.path.exists(f"{out}/report/index.html"), p.stdout
    p = gradmap(["run", "--config", ini, "--out", out], ranks=2)
    assert "stage import-things-meg is up to date" in p.stdout + p.stderr, p.stdout + p.stderr


if __name__ == "__main__":
    run_tests([test_fif_is_split, test_import_exact, test_rank_independent_and_images_folder_variant,
               test_end_to_end_extract_encode_stats, test_run_with_the_things_meg_config, test_bad_inputs])
