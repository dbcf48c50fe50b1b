"""Helpers for gradmap's Python-driven tests: run the binary (under mpiexec), compare HDF5 files.

The environment (set by CTest): GRADMAP (the binary), MPIEXEC, MPIEXEC_FLAGS.
"""
import os
import shlex
import subprocess
import tempfile

import h5py
import numpy as np

GRADMAP = os.environ.get("GRADMAP", "build/src/gradmap")
MPIEXEC = os.environ.get("MPIEXEC", "mpiexec")
MPIEXEC_FLAGS = shlex.split(os.environ.get("MPIEXEC_FLAGS", "--oversubscribe"))


def gradmap(args, ranks=1, timeout=300, check=True, cwd=None, env=None):
    """Runs `mpiexec -n ranks gradmap args...`; returns the CompletedProcess (text)."""
    cmd = [MPIEXEC, "-n", str(ranks), *MPIEXEC_FLAGS, GRADMAP, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def expect_failure(args, *needles, ranks=2, timeout=120):
    """Runs gradmap args, which must fail: non-zero exit, every needle in its output (stderr and
    stdout), one "gradmap: error" message (printed once for an error every rank sees, never a
    hang: the timeout). Returns the output."""
    p = gradmap(args, ranks=ranks, check=False, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"exit 0 for {args}"
    for n in needles:
        assert n in out, f"message lacks {n!r}:\n{out}"
    assert out.count("gradmap: error") == 1, f"expected one message:\n{out}"
    return out


def tmpdir(name):
    return tempfile.mkdtemp(prefix=f"gradmap-{name}-")


def h5_contents(path):
    """{name: (array or attrs)} of every dataset and every attribute in the file."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = np.asarray(v)
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        for k, v in f.attrs.items():
            out[f"/@{k}"] = np.asarray(v)
        f.visititems(visit)
    return out


def assert_h5_identical(a, b):
    ca, cb = h5_contents(a), h5_contents(b)
    assert ca.keys() == cb.keys(), f"{a} vs {b}: different objects {set(ca) ^ set(cb)}"
    for k in ca:
        x, y = ca[k], cb[k]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{k}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), f"{k}: values differ (max {np.nanmax(np.abs(x - y))})"
        else:
            assert np.array_equal(x, y), f"{k}: values differ"


def write_fmri_brain(path, responses, trial_stimulus, test, roi=None, roi_names=("V1",), roi_level=(1,)):
    """A minimal fMRI brain file: responses [trials, voxels], the trials' stimuli, the test
    stimuli, each voxel's ROI (default all 0) and a 1-D volume of the voxels."""
    t = responses.shape[1]
    with h5py.File(path, "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f.attrs["modality"] = "fmri"
        f["/brain/responses"] = responses.astype(np.float32)
        f["/brain/trial_stimulus"] = np.asarray(trial_stimulus, np.int64)
        f["/brain/test_stimuli"] = np.asarray(test, np.int64)
        f["/brain/roi"] = np.zeros(t, np.int32) if roi is None else np.asarray(roi, np.int32)
        f["/brain/roi_names"] = np.array([n.encode() for n in roi_names])
        f["/brain/roi_level"] = np.array(roi_level, np.int32)
        f["/brain/voxel_ijk"] = np.stack([np.arange(t), np.zeros(t), np.zeros(t)], 1).astype(np.int32)
        f["/brain"].attrs["volume_shape"] = np.array([t, 1, 1])
        f["/brain"].attrs["affine"] = np.eye(4).ravel()


def config_from_template(name, changes, path):
    """The shipped template config/<name> with `changes` {section: {key: value}} applied."""
    import configparser
    cp = configparser.ConfigParser()
    here = os.path.dirname(os.path.abspath(__file__))
    assert cp.read(os.path.join(here, "..", "config", name)), name
    for sec, kv in changes.items():
        for k, v in kv.items():
            assert cp.has_option(sec, k), f"{name} has no [{sec}] {k}"
            cp.set(sec, k, str(v))
    with open(path, "w") as f:
        cp.write(f)
    return path


def run_tests(tests):
    """Runs test functions, prints a line each and the closing 'N passed, N failed' line."""
    passed = failed = 0
    for t in tests:
        try:
            t()
            passed += 1
            print(f"PASS {t.__name__}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {t.__name__}: {e}", flush=True)
    print(f"{passed} passed, {failed} failed")
    raise SystemExit(1 if failed else 0)
