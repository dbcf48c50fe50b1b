"""End-to-end statistics on simulated data with a planted answer (`gradmap run`, which ends in
stats): on `misaligned` data rho_space(activations) > 0 and rho_time(activations) > 0 with CIs
excluding 0, and both divergence verdicts `diverges`; on `aligned` data D_time `consistent` and
D_space never `diverges`; on `null` data both `undetermined`. Calibration on `null` data over seeds
(tools/calibrate_null.py; docs/statistics.md records 500 runs): the share of runs with any
max-statistic FWER rejection (all families together and per (kind, layer)), and with any BH
rejection, stays at most alpha within Monte-Carlo error, and no divergence verdict is `consistent`. A fast subset of the divergence calibration (tools/calibrate_divergence.py; the full table
is in docs/statistics.md): `diverges` on aligned brains at low SNR, and `consistent` on misaligned
brains, at most alpha within Monte-Carlo error; the power of `diverges` on misaligned brains."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from gmtest import GRADMAP, gradmap, run_tests, tmpdir  # noqa: E402
import calibrate_divergence  # noqa: E402
import calibrate_null  # noqa: E402

BASE = tmpdir("recovery")
DEMO = os.path.join(HERE, "..", "..", "config", "demo.ini")


SUMMARIES = {}


def summary(scenario):
    if scenario in SUMMARIES:
        return SUMMARIES[scenario]
    cfg = open(DEMO).read().replace("scenario = misaligned", f"scenario = {scenario}")
    with open(f"{BASE}/{scenario}.ini", "w") as f:
        f.write(cfg + "\n[encode]\npermutations = 500\nbootstraps = 500\n")
    gradmap(["run", "--config", f"{BASE}/{scenario}.ini", "--out", f"{BASE}/{scenario}"], ranks=2,
            timeout=600)
    SUMMARIES[scenario] = json.load(open(f"{BASE}/{scenario}/stats/summary.json"))
    return SUMMARIES[scenario]


def test_misaligned_recovered():
    s = summary("misaligned")
    for mod, key in (("fmri", "rho_space"), ("meg", "rho_time")):
        st = s[mod][key]["activations"]
        assert st["value"] > 0 and st["ci"][0] > 0, f"{key}(activations) {st}"
        assert st["p"] < 0.05, f"{key}(activations) {st}"
    for mod, key in (("fmri", "D_space"), ("meg", "D_time")):
        st = s[mod][key]
        assert st["verdict"] == "diverges" and st["p"] < 0.05, f"{key} {st}"
        assert st["ci"][0] <= st["value"] <= st["ci"][1], f"{key} {st}"
    # gradients only in high-level areas and late (forward order): a positive latency slope
    assert s["meg"]["D_time"]["value"] > 0 and s["meg"]["D_time"]["ci"][0] > 0
    assert min(s["meg"]["peak_latency_gradients"]) > max(s["meg"]["peak_latency_activations"])
    assert s["meg"]["top_layer_latency_gap"]["value"] > 0
    # the ROI where the gradients sit at the other end of the network (lateral: layer 0, its
    # activations at the top) is the one that diverges
    lateral = s["fmri"]["D_space_p_diverges_roi"][5]
    assert lateral < 0.05 / 7, s["fmri"]["D_space_p_diverges_roi"]


def test_aligned_recovered():
    s = summary("aligned")
    d = s["fmri"]["D_space"]
    assert d["verdict"] in ("consistent", "undetermined") and d["p"] > 0.05, f"D_space {d}"
    assert s["fmri"]["roi_best_layer_gradients"] == s["fmri"]["roi_best_layer_activations"]
    d = s["meg"]["D_time"]
    assert d["verdict"] == "consistent" and d["value"] < 0 and d["ci"][1] < 0, f"D_time {d}"
    g = s["meg"]["rho_time"]["gradients"]
    assert g["value"] < 0 and g["ci"][1] < 0, f"rho_time(gradients) {g}"
    # voxelwise peak-layer maps agree more when gradients share the activations' layout (the
    # voxel argmax is noisy: a small network's layers predict each other well)
    agree = s["fmri"]["peak_layer_agreement"]["fraction"]
    assert agree > summary("misaligned")["fmri"]["peak_layer_agreement"]["fraction"] + 0.05, agree


def test_null_undetermined():
    s = summary("null")
    for mod, key in (("fmri", "D_space"), ("meg", "D_time")):
        assert s[mod][key]["verdict"] == "undetermined", s[mod][key]


def test_divergence_verdicts_calibrated_subset():
    """tinycnn, 24 aligned brains at the lowest SNRs of the table (where the old D_time rejected
    every time) and 12 misaligned brains at the default SNR. P(Binomial(24, 0.05) >= 5) = 0.008:
    more than 4 false verdicts means miscalibration."""
    low = calibrate_divergence.calibrate(GRADMAP, ["tinycnn"], ["aligned"], {"fmri": [0.05], "meg": [0.04]},
                                         replicates=24, bases=3, jobs=2, work=f"{BASE}/cal-aligned")
    high = calibrate_divergence.calibrate(GRADMAP, ["tinycnn"], ["misaligned"], {"fmri": [0.5], "meg": [0.5]},
                                          replicates=12, bases=3, jobs=2, work=f"{BASE}/cal-misaligned")
    print(calibrate_divergence.markdown(low))
    print(calibrate_divergence.markdown(high))
    for c in low["cells"]:
        assert c["diverges"] <= 4, c
        assert c["ci_extended"] <= c["n"] // 4, c  # containment holds by construction
    for c in high["cells"]:
        assert c["consistent"] <= 2, c  # P(Binomial(12, 0.05) >= 3) = 0.02
        assert c["diverges"] >= 6, c     # power: the full table records >= 0.8 at this SNR


def test_calibration_runs_resume_after_a_kill():
    """The calibration tools' task runner: finished replicates are appended to a checkpoint and
    not run again; a line cut by a kill is ignored (that replicate runs again)."""
    ck = f"{BASE}/resume.jsonl"
    if os.path.exists(ck):
        os.remove(ck)
    calls = []

    def fn(t):
        calls.append(tuple(t))
        return {"x": t[0] * 2}
    calibrate_divergence.run_tasks([(1,), (2,)], fn, 2, "test", sys.stderr, ck)
    with open(ck, "a") as f:
        f.write('{"task": [3], "ou')  # killed while writing
    r = calibrate_divergence.run_tasks([(1,), (2,), (3,)], fn, 2, "test", sys.stderr, ck)
    assert sorted(calls) == [(1,), (2,), (3,)], calls
    assert r == [((1,), {"x": 2}), ((2,), {"x": 4}), ((3,), {"x": 6})], r
    calibrate_divergence.run_tasks([(1,), (2,), (3,)], fn, 2, "test", sys.stderr, ck)
    assert len(calls) == 3, calls  # the record written after the cut line is read back


def test_null_calibrated():
    """12 null brains (3 stimulus sets x 4 noise draws); docs/statistics.md records 500."""
    r = calibrate_null.calibrate(GRADMAP, replicates=12, bases=3, jobs=2, permutations=200, work=f"{BASE}/null")
    print(calibrate_null.markdown(r))
    # P(Binomial(12, 0.05) >= 4) = 0.002: more than 3 rejecting runs means miscalibration.
    for mod in ("fmri", "meg"):
        s = r["summary"][mod]
        assert s["fwer_all"]["count"] <= 3, s
        assert s["fdr_all"]["count"] <= 3, s
        assert max(s["fwer_family"]["counts"]) <= 4, s  # the worst of 12 families: P <= 12 x 0.0002
        assert s["verdicts"]["diverges"] <= 3 and s["verdicts"]["consistent"] == 0, s
        assert abs(s["mean_share_p"] - 0.05) < 0.02, s


if __name__ == "__main__":
    only = sys.argv[1:]
    run_tests([t for t in (test_misaligned_recovered, test_aligned_recovered, test_null_undetermined,
                           test_divergence_verdicts_calibrated_subset, test_calibration_runs_resume_after_a_kill,
                           test_null_calibrated)
               if not only or t.__name__ in only])
