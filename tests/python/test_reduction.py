"""Feature reduction in gradmap extract against independent implementations: PCA (randomized
SVD, distributed, fitted on training images only) against LAPACK's SVD via numpy; the sparse
random projection against the same matrix rebuilt in Python from the documented Philox draws."""
import os

import h5py
import numpy as np

from gmtest import gradmap, run_tests, tmpdir
from philox import Philox

BASE = tmpdir("reduce")
SIM = f"{BASE}/sim"
gradmap(["simulate", "--out", SIM, "--images", 300, "--test-images", 60, "--voxels", 20,
         "--modality", "fmri", "--image-size", 24])
with h5py.File(f"{SIM}/brain_fmri.h5") as b:
    TEST = b["/brain/test_stimuli"][()]
TRAIN = np.setdiff1d(np.arange(300), TEST)


def pca_run(name, k, ranks, *extra):
    out = f"{BASE}/{name}.h5"
    p = gradmap(["extract", "--stimuli", f"{SIM}/stimuli.h5", "--out", out, "--pca", k,
                 "--split-from", f"{SIM}/brain_fmri.h5", *extra], ranks=ranks)
    return out, p


def check_against_lapack(out, pooled, sv_tol, dot_tol, score_tol):
    with h5py.File(out) as f, h5py.File(pooled) as p:
        assert f["/features"].attrs["reduction"] == "pca:5"
        for kind in ("activations", "gradients"):
            for n in f[f"/features/{kind}"]:
                x = p[f"/features/{kind}/{n}"][()].astype(np.float64)
                mu = x[TRAIN].mean(0)
                _, s, vt = np.linalg.svd(x[TRAIN] - mu, full_matrices=False)  # LAPACK gesdd
                k = f[f"/features/{kind}/{n}"].shape[1]
                assert k == min(5, x.shape[1])
                sv = f[f"/reduction/{kind}/{n}/singular_values"][()]
                comp = f[f"/reduction/{kind}/{n}/components"][()]
                assert np.allclose(f[f"/reduction/{kind}/{n}/mean"][()], mu, rtol=1e-6, atol=1e-9)
                assert np.abs(sv - s[:k]).max() / s[0] < sv_tol, (kind, n, sv, s[:k])
                dots = np.abs((comp * vt[:k]).sum(1))
                assert dots.min() > 1 - dot_tol, (kind, n, dots)
                ref = (x - mu) @ comp.T  # scores of every image (train and test)
                got = f[f"/features/{kind}/{n}"][()]
                assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-6
                lapack = (x - mu) @ vt[:k].T * np.sign((ref * ((x - mu) @ vt[:k].T)).sum(0))
                assert np.abs(got - lapack).max() / np.abs(lapack).max() < score_tol, (kind, n)


def test_pca_matches_lapack_svd_of_the_training_rows():
    out, _ = pca_run("pca-q8", 5, 2, "--pca-power-iterations", 8)
    check_against_lapack(out, f"{BASE}/pca-q8.pooled.h5", 1e-9, 1e-9, 1e-6)
    # The default (2 power iterations) on the same data: close, within randomized-SVD accuracy.
    out, p = pca_run("pca-q2", 5, 2)
    check_against_lapack(out, f"{BASE}/pca-q2.pooled.h5", 1e-4, 1e-4, 1e-2)


def test_pca_independent_of_ranks_and_reuses_pooled_features():
    a, _ = pca_run("pca-n1", 5, 1)
    b, _ = pca_run("pca-n3", 5, 3)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for kind in ("activations", "gradients"):
            for n in fa[f"/features/{kind}"]:
                x, y = fa[f"/features/{kind}/{n}"][()], fb[f"/features/{kind}/{n}"][()]
                assert np.abs(x - y).max() / np.abs(x).max() < 1e-6, (kind, n)
    _, p = pca_run("pca-n1", 3, 1)  # another K: the pooled features are reused
    assert "reusing the pooled features" in p.stderr, p.stderr


def projection_matrix(d, k, seed, stream):
    s = np.sqrt(d)
    r = np.zeros((d, k))
    for j in range(d):
        rng = Philox(seed, "projection", stream, j)
        for c in range(k):
            u = rng.uniform()
            if u < 1 / (2 * s):
                r[j, c] = 1
            elif u < 1 / s:
                r[j, c] = -1
    return r * np.sqrt(s / k)


def test_sparse_random_projection_reproduced_in_python():
    full = f"{BASE}/full.h5"
    gradmap(["extract", "--stimuli", f"{SIM}/stimuli.h5", "--out", full])
    proj = f"{BASE}/proj.h5"
    gradmap(["extract", "--stimuli", f"{SIM}/stimuli.h5", "--out", proj, "--projection", 24,
             "--seed", 9], ranks=2)
    with h5py.File(full) as f, h5py.File(proj) as g:
        assert g["/features"].attrs["reduction"] == "projection:24"
        layers = [n.decode() if isinstance(n, bytes) else n for n in g["/features"].attrs["layers"]]
        for l, n in enumerate(layers):
            for kind in ("activations", "gradients"):
                x, y = f[f"/features/{kind}/{n}"][()], g[f"/features/{kind}/{n}"][()]
                if x.shape[1] <= 24:  # narrower layers are left as they are
                    assert np.array_equal(x, y)
                    continue
                ref = x.astype(np.float64) @ projection_matrix(x.shape[1], 24, 9, 1 + l)
                assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5, (kind, n)


def test_reduction_bad_options():
    p = gradmap(["extract", "--stimuli", f"{SIM}/stimuli.h5", "--out", f"{BASE}/x.h5", "--pca", 4],
                ranks=2, check=False)
    assert p.returncode != 0 and "--split-from" in p.stderr, p.stderr
    assert not os.path.exists(f"{BASE}/x.h5")


def test_run_fits_the_pca_on_the_training_images_of_its_brain():
    # `gradmap run` with [extract] pca: the pipeline gives extract the brain file's split (the
    # shipped NSD / THINGS-MEG configs set pca = 1024; without it the extract stage refused).
    cfg = f"{BASE}/pca.ini"
    with open(cfg, "w") as f:
        f.write("[simulate]\nimages = 120\ntest-images = 20\nvoxels = 30\nmodality = fmri\n"
                "image-size = 24\n[extract]\npca = 4\n[encode]\npermutations = 20\n"
                "bootstraps = 20\n")
    p = gradmap(["run", "--config", cfg, "--out", f"{BASE}/pca-run"], ranks=2)
    assert "PCA fitted on 100 training images" in p.stderr, p.stderr
    with h5py.File(f"{BASE}/pca-run/features.h5") as f, \
            h5py.File(f"{BASE}/pca-run/data/brain_fmri.h5") as b:
        assert f["/features"].attrs["reduction"] == "pca:4"
        test = b["/brain/test_stimuli"][()]
        pooled = h5py.File(f"{BASE}/pca-run/features.pooled.h5")
        for kind in ("activations", "gradients"):
            for n in f[f"/features/{kind}"]:
                x = pooled[f"/features/{kind}/{n}"][()].astype(np.float64)
                mu = np.delete(x, test, 0).mean(0)  # the mean of the training rows only
                assert np.allclose(f[f"/reduction/{kind}/{n}/mean"][()], mu, rtol=1e-6, atol=1e-9)


run_tests([test_pca_matches_lapack_svd_of_the_training_rows,
           test_pca_independent_of_ranks_and_reuses_pooled_features,
           test_sparse_random_projection_reproduced_in_python, test_reduction_bad_options,
           test_run_fits_the_pca_on_the_training_images_of_its_brain])
