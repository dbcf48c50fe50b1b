"""Bad inputs get one clear message naming the file/option, a non-zero exit, no hang (run at 2
ranks), and no output file at its final name."""
import os
import shutil
import subprocess

import h5py
import numpy as np

from gmtest import GRADMAP, expect_failure, gradmap, run_tests, tmpdir

BASE = tmpdir("bad")
GOOD = f"{BASE}/good"
gradmap(["simulate", "--out", GOOD, "--images", 40, "--test-images", 6, "--image-size", 16,
         "--voxels", 50, "--sensors", 4, "--times", 10])


def broken_copy(src, name, edit):
    path = f"{BASE}/{name}"
    shutil.copy(f"{GOOD}/{src}", path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def test_missing_file():
    expect_failure(["validate", f"{BASE}/nope.h5"], f"file not found: {BASE}/nope.h5")


def test_corrupt_file():
    path = f"{BASE}/corrupt.h5"
    with open(f"{GOOD}/brain_fmri.h5", "rb") as f:
        head = f.read(4096)
    with open(path, "wb") as f:  # a truncated copy: HDF5 signature, nothing after it
        f.write(head)
    expect_failure(["validate", path], path)
    with open(f"{BASE}/text.h5", "w") as f:
        f.write("not hdf5")
    expect_failure(["validate", f"{BASE}/text.h5"], "not an HDF5 file", f"{BASE}/text.h5")


def test_wrong_schema_version():
    def edit(f):
        f.attrs["gradmap_schema"] = np.int64(2)
    path = broken_copy("brain_fmri.h5", "v2.h5", edit)
    expect_failure(["validate", path], path, "gradmap_schema is 2")


def test_wrong_dtype():
    def edit(f):
        imgs = f["/stimuli/images"][()]
        del f["/stimuli/images"]
        f["/stimuli/images"] = imgs.astype(np.float32)
    path = broken_copy("stimuli.h5", "dtype.h5", edit)
    expect_failure(["validate", path], f"/stimuli/images in {path}: dtype float32, expected uint8")


def test_wrong_shape():
    def edit(f):
        ts = f["/brain/trial_stimulus"][()]
        del f["/brain/trial_stimulus"]
        f["/brain/trial_stimulus"] = ts[:-1]
    path = broken_copy("brain_fmri.h5", "shape.h5", edit)
    expect_failure(["validate", path], f"/brain/trial_stimulus in {path}", "dimension 0 must be 80")

    def edit_meg(f):
        t = f["/brain/times"][()]
        del f["/brain/times"]
        f["/brain/times"] = t[:5]
    path = broken_copy("brain_meg.h5", "meg_shape.h5", edit_meg)
    expect_failure(["validate", path], f"/brain/times in {path}", "dimension 0 must be 10")


def test_nan_in_responses():
    def edit(f):
        f["/brain/responses"][77, 3] = np.nan  # in the last rank's row block
    path = broken_copy("brain_fmri.h5", "nan.h5", edit)
    expect_failure(["validate", path], f"/brain/responses in {path}: non-finite value",
                   "row 77, element 3")

    def edit_meg(f):
        f["/brain/responses"][2, 1, 4] = np.inf
    path = broken_copy("brain_meg.h5", "inf.h5", edit_meg)
    expect_failure(["validate", path], "non-finite value (inf) at row 2, element 14")


def test_trial_stimulus_out_of_range():
    def edit(f):
        f["/brain/trial_stimulus"][3] = 45
    path = broken_copy("brain_fmri.h5", "range.h5", edit)
    expect_failure(["validate", f"{GOOD}/stimuli.h5", path],
                   f"/brain/trial_stimulus in {path}: trial 3 shows stimulus 45, outside [0, 40)")

    def edit_test(f):
        f["/brain/test_stimuli"][0] = -1
    path = broken_copy("brain_fmri.h5", "test_range.h5", edit_test)
    expect_failure(["validate", path], "test stimulus -1 outside")


def test_empty_test_set_and_too_many_threads():
    def edit(f):
        del f["/brain/test_stimuli"]
        f.create_dataset("/brain/test_stimuli", shape=(0,), dtype=np.int64)
    path = broken_copy("brain_fmri.h5", "empty_test.h5", edit)
    expect_failure(["validate", path], f"/brain/test_stimuli in {path}: no test stimuli")
    expect_failure(["validate", path, "--threads", 100000], "--threads: 100000 exceeds the")


def test_constant_layer_is_reported():
    feats = f"{BASE}/feats.h5"
    gradmap(["extract", "--stimuli", f"{GOOD}/stimuli.h5", "--out", feats], ranks=2)
    with h5py.File(feats, "r+") as f:
        f["/features/gradients/conv2"][...] = 1.5
    p = gradmap(["encode", "--features", feats, "--brain", f"{GOOD}/brain_fmri.h5", "--out",
                 f"{BASE}/const_scores.h5"], ranks=2)
    assert "every feature of gradients/conv2 is constant over the training images" in p.stderr, p.stderr
    assert p.stderr.count("every feature of") == 1, p.stderr  # one layer, reported once
    with h5py.File(f"{BASE}/const_scores.h5") as f:
        assert np.isnan(f["/gradients/r"][1]).all() and np.isfinite(f["/gradients/r"][0]).any()


def test_unknown_option_and_no_output():
    out = f"{BASE}/unknown"
    expect_failure(["simulate", "--out", out, "--bogus", 3], "unrecognised option '--bogus'")
    assert not os.path.exists(f"{out}/stimuli.h5")
    expect_failure(["frobnicate"], "unknown command 'frobnicate'")
    expect_failure(["simulate", "--out", out, "--images", "many"], "--images", "many")


def test_bad_option_values():
    out = f"{BASE}/values"
    expect_failure(["simulate", "--out", out, "--scenario", "sideways"],
                   "--scenario: must be misaligned, aligned, activations-only or null, not 'sideways'")
    expect_failure(["simulate", "--out", out, "--test-images", 1], "--test-images")
    expect_failure(["simulate", "--out", out, "--model", "builtin:resnet9000"],
                   "unknown built-in model 'resnet9000'")
    assert not os.path.exists(f"{out}/stimuli.h5")
    expect_failure(["simulate", "--images", 10], "--out")  # required option


def test_bad_config_value():
    cfg = f"{BASE}/bad.ini"
    with open(cfg, "w") as f:
        f.write("[simulate]\nout = %s/cfg\nimages = lots\n" % BASE)
    expect_failure(["simulate", "--config", cfg], cfg, "images")
    with open(cfg, "w") as f:
        f.write("[simulate]\nout = %s/cfg\ncolour = blue\n" % BASE)
    expect_failure(["simulate", "--config", cfg], f"{cfg}: unknown option 'colour' in section [simulate]")
    expect_failure(["simulate", "--config", f"{BASE}/absent.ini"], f"cannot read config file {BASE}/absent.ini")
    with open(cfg, "w") as f:
        f.write("[simulate]\nout = %s/cfg\nsnr = -1\n" % BASE)
    expect_failure(["simulate", "--config", cfg], "--snr")
    assert not os.path.exists(f"{BASE}/cfg/stimuli.h5")


def test_libtorch_module_loaded_only_when_needed():
    """LibTorch lives in libgradmap_torch.so, loaded by the commands that run a network: with
    GRADMAP_TORCH_MODULE pointing nowhere, validate and encode still run, and extract fails on
    every rank with one message naming the variable and the path, leaving no output."""
    ldd = subprocess.run(["ldd", GRADMAP], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in ldd and "libc10" not in ldd, ldd  # not loaded at start-up
    env = {"GRADMAP_TORCH_MODULE": f"{BASE}/no-such-module.so"}
    feats = f"{BASE}/feats-torch.h5"
    gradmap(["extract", "--stimuli", f"{GOOD}/stimuli.h5", "--out", feats], ranks=2)
    gradmap(["validate", f"{GOOD}/stimuli.h5", feats], ranks=2, env=env)
    gradmap(["encode", "--features", feats, "--brain", f"{GOOD}/brain_fmri.h5", "--out",
             f"{BASE}/scores-no-torch.h5", "--permutations", 0, "--bootstraps", 0], ranks=2, env=env)
    out = f"{BASE}/feats-no-torch.h5"
    p = gradmap(["extract", "--stimuli", f"{GOOD}/stimuli.h5", "--out", out], ranks=2,
                check=False, env=env, timeout=120)
    text = p.stdout + p.stderr
    assert p.returncode != 0, text
    assert "GRADMAP_TORCH_MODULE" in text and f"{BASE}/no-such-module.so: not found" in text, text
    assert text.count("gradmap: error") == 1, text
    assert not os.path.exists(out)


run_tests([test_libtorch_module_loaded_only_when_needed, test_missing_file, test_corrupt_file, test_wrong_schema_version, test_wrong_dtype,
           test_wrong_shape, test_nan_in_responses, test_trial_stimulus_out_of_range,
           test_empty_test_set_and_too_many_threads, test_constant_layer_is_reported,
           test_unknown_option_and_no_output, test_bad_option_values, test_bad_config_value])
