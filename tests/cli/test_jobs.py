"""jobs/ scripts stay in step with the binary: they parse (bash -n), every `gradmap <command>
--option` they use exists in that command's --help, and the Slurm headers name a time limit."""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gmtest import GRADMAP, run_tests  # noqa: E402

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


def options_of(cmd):
    p = subprocess.run([GRADMAP, cmd, "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+(--[a-z][a-z-]*)", p.stdout, re.M))


def test_scripts_parse_and_use_existing_options():
    scripts = sorted(os.listdir(JOBS))
    assert {"submit-pipeline.sh", "extract-gpu.slurm", "encode-cpu.slurm", "stats-report.slurm",
            "demo-local.sh"} <= set(scripts), scripts
    checked = 0
    for name in scripts:
        path = os.path.join(JOBS, name)
        text = open(path).read()
        r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        if name.endswith(".slurm"):
            assert re.search(r"^#SBATCH --time=", text, re.M), f"{name}: no time limit"
        text = text.replace("\\\n", " ")
        for m in re.finditer(r'"\$GRADMAP" (\w[\w-]*)([^\n]*)', text):
            cmd, rest = m.group(1), m.group(2)
            known = options_of(cmd)
            assert known, f"{name}: unknown command {cmd}"
            for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                assert opt in known, f"{name}: gradmap {cmd} has no option {opt}"
                checked += 1
    assert checked > 20, checked


FAKE_SBATCH = r"""#!/bin/bash
# sbatch stand-in: runs the job script now, with its --export variables, and prints a job id
out=/dev/null; exports=""
while [ $# -gt 1 ]; do
  case "$1" in
    --parsable) shift ;;
    --export) exports=$2; shift 2 ;;
    --output) out=$2; shift 2 ;;
    --dependency) echo "$2" >> "$FAKE_SLURM_LOG"; shift 2 ;;
    *) shift 2 ;;
  esac
done
id=$((RANDOM + 100))
out=${out//%j/$id}
if [ -n "${FAKE_SLURM_DRY:-}" ]; then  # record the job and its place only
  echo "$(basename "$1") OUT=${OUT:-} MODEL=${MODEL:-} SUBJECT=${SUBJECT:-} EPOCHS=${EPOCHS:-}" >> "$FAKE_SLURM_LOG"
  echo $id; exit 0
fi
(
  IFS=,; for kv in $exports; do [ "$kv" = ALL ] || export "$kv"; done; unset IFS
  SLURM_CPUS_PER_TASK=1 bash "$1" > "$out" 2>&1
) || { echo "job $1 failed: $(tail -5 "$out")" >&2; exit 1; }
echo "$(basename "$1")" >> "$FAKE_SLURM_LOG"
echo $id
"""

FAKE_SRUN = r"""#!/bin/bash
# srun stand-in: drops srun's own options, runs the command under mpiexec -n 1
while [[ "$1" == --* ]]; do shift; done
exec $MPIEXEC -n 1 $MPIEXEC_FLAGS "$@"
"""


def test_the_slurm_chain_runs_end_to_end_with_a_stand_in_slurm():
    # jobs/submit-pipeline.sh with sbatch/srun stand-ins that run each job at once: the chain
    # extract (PCA fitted on the brain's training images) -> encode --joint -> stats + report.
    import tempfile
    from gmtest import gradmap
    import h5py
    base = tempfile.mkdtemp(prefix="gradmap-jobs-")
    fake = f"{base}/bin"
    os.makedirs(fake)
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
        with open(f"{fake}/{name}", "w") as f:
            f.write(text)
        os.chmod(f"{fake}/{name}", 0o755)
    gradmap(["simulate", "--out", f"{base}/sim", "--images", 120, "--test-images", 20, "--voxels", 60,
             "--modality", "fmri", "--image-size", 24])
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_SLURM_LOG=f"{base}/slurm.log",
               STIMULI=f"{base}/sim/stimuli.h5", BRAIN=f"{base}/sim/brain_fmri.h5",
               MODEL="builtin:tinycnn", PCA="4", PERMUTATIONS="50", OUT=f"{base}/out",
               GRADMAP=os.path.abspath(GRADMAP), DEVICE="cpu", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    r = subprocess.run(["bash", os.path.join(JOBS, "submit-pipeline.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = [l.strip() for l in open(f"{base}/slurm.log") if l.strip().endswith(".slurm")]
    assert jobs == ["extract-gpu.slurm", "encode-cpu.slurm", "stats-report.slurm"], jobs
    with h5py.File(f"{base}/out/features.h5") as f:
        assert f["/features"].attrs["reduction"] == "pca:4"
    with h5py.File(f"{base}/out/scores_fmri.h5") as f:
        assert f.attrs["joint"] == 1 and "unique_gradients" in f
        assert f.attrs["permutations"] == 50
    assert os.path.exists(f"{base}/out/report/index.html")


def test_the_full_study_submits_one_import_per_subject_and_a_chain_per_model():
    import tempfile
    base = tempfile.mkdtemp(prefix="gradmap-study-")
    fake = f"{base}/bin"
    os.makedirs(fake)
    with open(f"{fake}/sbatch", "w") as f:
        f.write(FAKE_SBATCH)
    os.chmod(f"{fake}/sbatch", 0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", FAKE_SLURM_LOG=f"{base}/slurm.log",
               FAKE_SLURM_DRY="1", NSD_ROOT="/data/NSD", NSD_SUBJECTS="1 2", THINGS_ROOT="/data/ds",
               THINGS_IMAGES="/data/things", THINGS_PARTICIPANTS="3",
               MODELS="vit=torchscript:vit.pt rn=torchscript:rn.pt", OUT=f"{base}/study")
    r = subprocess.run(["bash", os.path.join(JOBS, "full-study.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = [l.split() for l in open(f"{base}/slurm.log") if ".slurm" in l]
    imports = [j for j in jobs if j[0].startswith("import")]
    assert [j[0] for j in imports] == ["import-nsd.slurm"] * 2 + ["import-things-meg.slurm"]
    assert "EPOCHS=/data/ds/derivatives/preprocessed/preprocessed_P3-epo.fif" in imports[2]
    extracts = [(j[1], j[2]) for j in jobs if j[0] == "extract-gpu.slurm"]
    assert len(extracts) == 6 and (f"OUT={base}/study/nsd-subj02/rn", "MODEL=torchscript:rn.pt") in extracts
    assert sum(j[0] == "encode-cpu.slurm" for j in jobs) == 6
    assert sum(j[0] == "stats-report.slurm" for j in jobs) == 6


if __name__ == "__main__":
    run_tests([test_scripts_parse_and_use_existing_options,
               test_the_slurm_chain_runs_end_to_end_with_a_stand_in_slurm,
               test_the_full_study_submits_one_import_per_subject_and_a_chain_per_model])
