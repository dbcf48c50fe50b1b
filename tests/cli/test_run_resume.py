"""`gradmap run` as a resumable pipeline: a second run skips every stage whose outputs carry its
key; a changed option re-runs only the stages it affects (and those downstream); a run killed
with SIGKILL at several points and restarted ends with statistics identical to an uninterrupted
run, and no killed run leaves a complete-looking output without its key."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gmtest import GRADMAP, MPIEXEC, MPIEXEC_FLAGS, gradmap, run_tests, tmpdir  # noqa: E402

BASE = tmpdir("resume")
DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "config", "demo.ini")
CFG = open(DEMO).read().replace("images = 600", "images = 300").replace("voxels = 1400", "voxels = 600")
CFG += "\n[encode]\npermutations = 300\nbootstraps = 200\n\n[stats]\nq = 0.05\n"


def write_cfg(path, text=CFG):
    with open(path, "w") as f:
        f.write(text)
    return path


def started(log):
    return re.findall(r"run: stage (\w+) started", log)


def test_second_run_skips_and_changes_rerun_what_they_touch():
    cfg = write_cfg(f"{BASE}/a.ini")
    out = f"{BASE}/a"
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2, timeout=600)
    assert started(p.stdout + p.stderr) == ["simulate", "extract", "encode", "encode", "stats",
                                            "report", "validate"]
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert started(p.stdout + p.stderr) == ["validate"], p.stdout
    write_cfg(cfg, CFG.replace("q = 0.05", "q = 0.1"))
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert started(p.stdout + p.stderr) == ["stats", "report", "validate"], p.stdout
    assert json.load(open(f"{out}/stats/summary.json"))["q"] == 0.1
    write_cfg(cfg, CFG.replace("q = 0.05", "q = 0.1").replace("permutations = 300", "permutations = 301"))
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert started(p.stdout + p.stderr) == ["encode", "encode", "stats", "report", "validate"], p.stdout
    write_cfg(cfg, CFG.replace("seed = 1", "seed = 2"))
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert started(p.stdout + p.stderr)[:2] == ["simulate", "extract"], p.stdout
    # dropping MEG from the simulation removes its brain file and scores, and stats follows
    write_cfg(cfg, CFG.replace("seed = 1", "seed = 2").replace("modality = both", "modality = fmri"))
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert not os.path.exists(f"{out}/data/brain_meg.h5") and not os.path.exists(f"{out}/scores_meg.h5")
    assert "meg" not in json.load(open(f"{out}/stats/summary.json"))


def stats_of(out):
    with h5py.File(f"{out}/stats/stats.h5") as s:
        res = {}
        s.visititems(lambda n, o: res.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    summ = json.load(open(f"{out}/stats/summary.json"))
    for mod in ("fmri", "meg"):
        summ[mod].pop("scores")
    return res, summ


def test_sigkill_at_several_points_then_resume():
    cfg = write_cfg(f"{BASE}/k.ini")
    ref = f"{BASE}/ref"
    t0 = time.time()
    gradmap(["run", "--config", cfg, "--out", ref], ranks=2, timeout=600)
    total = time.time() - t0
    want, want_summary = stats_of(ref)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for i, frac in enumerate((0.15, 0.35, 0.55, 0.75, 0.9)):
        out = f"{BASE}/k{i}"
        cmd = [MPIEXEC, "-n", "2", *MPIEXEC_FLAGS, GRADMAP, "run", "--config", cfg, "--out", out]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
        time.sleep(frac * total)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        time.sleep(0.3)
        # what a killed run leaves at final names is complete: keyed, or not there
        for name in ("features.h5", "scores_fmri.h5", "scores_meg.h5", "stats/stats.h5"):
            path = f"{out}/{name}"
            if os.path.exists(path):
                with h5py.File(path) as f:
                    pass  # opens: not a half-written file
        gradmap(["run", "--config", cfg, "--out", out], ranks=2, timeout=600)
        got, got_summary = stats_of(out)
        assert got.keys() == want.keys(), f"kill at {frac}: {set(got) ^ set(want)}"
        for k in want:
            assert np.array_equal(got[k], want[k], equal_nan=True), f"kill at {frac}: {k} differs"
        assert got_summary == want_summary, f"kill at {frac}: summary differs"
    # killed inside encode (SIGKILL on every rank right after its round 2 is recorded): the rerun
    # resumes that stage's rounds
    out = f"{BASE}/kenc"
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2, timeout=600, check=False,
                env={"GRADMAP_TEST_KILL_AFTER_ROUND": "2"})
    assert p.returncode != 0 and not os.path.exists(f"{out}/scores_fmri.h5"), p.stderr
    r = gradmap(["run", "--config", cfg, "--out", out], ranks=2, timeout=600)
    assert re.search(r"resuming \S*scores_fmri.h5.partial: 2/\d+ rounds already done", r.stderr), r.stderr
    got, got_summary = stats_of(out)
    for k in want:
        assert np.array_equal(got[k], want[k], equal_nan=True), f"kill in encode: {k} differs"
    assert got_summary == want_summary


def test_sigterm_stops_cleanly_and_resumes():
    d = f"{BASE}/term"
    gradmap(["simulate", "--out", d, "--images", 4000, "--test-images", 100, "--image-size", 32,
             "--voxels", 10, "--modality", "fmri"], ranks=2)
    args = ["extract", "--stimuli", f"{d}/stimuli.h5", "--model", "builtin:tinyvit", "--block", 16]
    gradmap([*args, "--out", f"{d}/ref.h5"], ranks=2, timeout=600)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", "2", *MPIEXEC_FLAGS, GRADMAP, *map(str, args), "--out", f"{d}/f.h5"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ranks, t0 = [], time.time()
    while len(ranks) < 2 and time.time() - t0 < 30:
        time.sleep(0.1)
        ranks = []
        for pid in subprocess.run(["pgrep", "-f", f"{d}/f.h5"], capture_output=True, text=True).stdout.split():
            try:
                if os.path.samefile(f"/proc/{pid}/exe", GRADMAP):
                    ranks.append(pid)
            except OSError:
                pass
    assert len(ranks) == 2, ranks
    while not os.path.exists(f"{d}/f.h5.partial") and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.5)
    for r in ranks:  # as srun delivers it: to every task
        os.kill(int(r), signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0, out
    assert out.count("stopped by SIGTERM during extract") == 1, out
    assert os.path.exists(f"{d}/f.h5.partial") and not os.path.exists(f"{d}/f.h5")
    with h5py.File(f"{d}/f.h5.partial") as f:
        done = f["/progress/blocks_done"][()]
    assert 0 < done.sum() < len(done), done.sum()
    p = gradmap([*args, "--out", f"{d}/f.h5"], ranks=2, timeout=600)
    assert "resum" in (p.stdout + p.stderr).lower(), p.stdout
    with h5py.File(f"{d}/f.h5") as a, h5py.File(f"{d}/ref.h5") as b:
        for kind in ("activations", "gradients"):
            for layer in a[f"/features/{kind}"]:
                assert np.array_equal(a[f"/features/{kind}/{layer}"][()], b[f"/features/{kind}/{layer}"][()])


def test_several_models_are_analysed_and_compared():
    cfg = write_cfg(f"{BASE}/m.ini", CFG.replace("data = simulate", "data = simulate\nmodels = builtin:tinycnn, builtin:tinyvit"))
    out = f"{BASE}/m"
    gradmap(["run", "--config", cfg, "--out", out], ranks=2, timeout=600)
    tags = ["builtin_tinycnn__default", "builtin_tinyvit__default"]
    for t in tags:
        assert os.path.exists(f"{out}/runs/{t}/report/index.html")
    agg = json.load(open(f"{out}/aggregate/aggregate.json"))
    assert agg["inputs"] == tags
    for i, t in enumerate(tags):
        s = json.load(open(f"{out}/runs/{t}/stats/summary.json"))
        a, b = agg["fmri"]["D_space"]["values"][i], s["fmri"]["D_space"]["value"]
        assert (a is None and b is None) or np.isclose(a, b), (a, b)
    with h5py.File(f"{out}/runs/{tags[1]}/features.h5") as f:
        assert f["/features"].attrs["model"] == "builtin:tinyvit"
    # every run's report shows the sensitivity table across the runs (written after all of them)
    for i, t in enumerate(tags):
        page = open(f"{out}/runs/{t}/report/index.html").read()
        assert "Sensitivity across models and objectives" in page, t
        table = page.split("Sensitivity across models and objectives")[1].split("</table>")[0]
        assert f"<td>{t} (this report)</td>" in table and f"<td>{tags[1 - i]}</td>" in table, table


if __name__ == "__main__":
    run_tests([test_second_run_skips_and_changes_rerun_what_they_touch,
               test_sigkill_at_several_points_then_resume, test_sigterm_stops_cleanly_and_resumes,
               test_several_models_are_analysed_and_compared])
