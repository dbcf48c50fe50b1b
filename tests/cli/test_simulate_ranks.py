"""`gradmap simulate` writes identical files for 1, 2 and 3 ranks (every dataset and attribute)."""
import os
import subprocess

from gmtest import assert_h5_identical, gradmap, run_tests, tmpdir

ARGS = ["--images", 70, "--test-images", 10, "--image-size", 24, "--voxels", 130,
        "--sensors", 7, "--times", 14, "--repetitions", 3, "--voxel-chunk", 16]


def test_one_two_three_ranks_identical():
    base = tmpdir("ranks")
    for n in (1, 2, 3):
        gradmap(["simulate", "--out", f"{base}/n{n}", "--seed", 11, *ARGS], ranks=n)
    for n in (2, 3):
        for f in ("stimuli.h5", "brain_fmri.h5", "brain_meg.h5"):
            assert_h5_identical(f"{base}/n1/{f}", f"{base}/n{n}/{f}")
            # h5diff, the HDF5 tool, agrees.
            r = subprocess.run(["h5diff", f"{base}/n1/{f}", f"{base}/n{n}/{f}"], capture_output=True)
            assert r.returncode == 0, f"h5diff reports differences in {f} for -n {n}"
    for n in (1, 2, 3):
        assert not [p for p in os.listdir(f"{base}/n{n}") if p.endswith(".partial")]


def test_each_scenario_and_modality_runs():
    base = tmpdir("scen")
    for scen in ("aligned", "null"):
        gradmap(["simulate", "--out", f"{base}/{scen}", "--scenario", scen, "--modality", "meg", *ARGS],
                ranks=2)
        files = sorted(os.listdir(f"{base}/{scen}"))
        assert files == ["brain_meg.h5", "stimuli.h5"], files


def test_seed_changes_the_data():
    base = tmpdir("seed")
    gradmap(["simulate", "--out", f"{base}/a", "--modality", "fmri", "--seed", 11, *ARGS])
    gradmap(["simulate", "--out", f"{base}/b", "--modality", "fmri", "--seed", 12, *ARGS])
    try:
        assert_h5_identical(f"{base}/a/brain_fmri.h5", f"{base}/b/brain_fmri.h5")
    except AssertionError:
        return
    raise AssertionError("different seeds gave identical data")


run_tests([test_one_two_three_ranks_identical, test_each_scenario_and_modality_runs,
           test_seed_changes_the_data])
