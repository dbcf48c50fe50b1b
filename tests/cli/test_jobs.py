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


if __name__ == "__main__":
    run_tests([test_scripts_parse_and_use_existing_options])
