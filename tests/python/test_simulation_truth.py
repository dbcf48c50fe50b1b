"""End to end: `gradmap run` simulates and then extracts with the settings /truth records. From
those features and a pure-Python Philox, the documented simulation model (docs/simulation.md)
rebuilds the fMRI responses: signal = sqrt(snr) * std(Z w) (+ the gradient component), noise =
the voxel's Philox normals. Agreement to float32 precision shows that extract reproduces the
generating features and that simulate does what its documentation says."""
import h5py
import numpy as np

from gmtest import gradmap, run_tests, tmpdir
from philox import Philox

BASE = tmpdir("truth")
CFG = f"{BASE}/run.ini"
with open(CFG, "w") as f:
    f.write("[simulate]\nseed = 17\nimages = 120\ntest-images = 20\nimage-size = 24\n"
            "voxels = 300\nsensors = 4\ntimes = 10\nrepetitions = 2\n")
gradmap(["run", "--config", CFG, "--out", f"{BASE}/out"], ranks=2)


def zscore(x):
    x = x.astype(np.float64)
    sd = x.std(0)
    return np.where(sd > 1e-12, (x - x.mean(0)) / np.where(sd > 1e-12, sd, 1), 0.0)


def project(z, rng):
    w = np.array([rng.normal() for _ in range(z.shape[1])])
    s = z @ w
    return (s - s.mean()) / s.std()


def test_fmri_responses_rebuilt_from_extracted_features():
    with h5py.File(f"{BASE}/out/features.h5") as f:
        layers = [n.decode() if isinstance(n, bytes) else n for n in f["/features"].attrs["layers"]]
        z = {k: [zscore(f[f"/features/{k}/{n}"][()]) for n in layers] for k in ("activations", "gradients")}
    with h5py.File(f"{BASE}/out/data/brain_fmri.h5") as b:
        y = b["/brain/responses"][()]
        ts = b["/brain/trial_stimulus"][()]
        la, lg = b["/truth/layer_activations"][()], b["/truth/layer_gradients"][()]
        noise = b["/truth/noise_target"][()]
        snr, share = b["/truth"].attrs["snr"][0], b["/truth"].attrs["gradient_share"][0]
        seed = int(b["/truth"].attrs["seed"])
    act_only = np.flatnonzero((noise == 0) & (lg < 0))[:6]
    both = np.flatnonzero((noise == 0) & (lg >= 0))[:6]
    pure = np.flatnonzero(noise == 1)[:3]
    assert len(act_only) and len(both) and len(pure)
    for v in np.concatenate([act_only, both, pure]):
        sig = np.zeros(len(z["activations"][0]))
        if not noise[v]:
            sig = project(z["activations"][la[v]], Philox(seed, "voxel", int(v), 1))
            if lg[v] >= 0:
                g = project(z["gradients"][lg[v]], Philox(seed, "voxel", int(v), 2))
                sig = np.sqrt(1 - share) * sig + np.sqrt(share) * g
        rng = Philox(seed, "fmri_noise", int(v), 0)
        e = np.array([rng.normal() for _ in range(len(ts))])
        rebuilt = np.sqrt(snr) * sig[ts] + e
        err = np.abs(rebuilt - y[:, v]).max()
        assert err < 1e-4, f"voxel {v}: rebuilt responses differ by {err:.2e}"


run_tests([test_fmri_responses_rebuilt_from_extracted_features])
