"""The command-line contract: --help per command, --version, INI config with sections and
command-line overrides, and `gradmap run` on a config."""
import os
import subprocess

import h5py

from gmtest import GRADMAP, gradmap, run_tests, tmpdir

BASE = tmpdir("config")


def test_help_for_every_command():
    p = gradmap(["--help"])
    for cmd in ("simulate", "validate", "run"):
        assert cmd in p.stdout, p.stdout
        h = gradmap([cmd, "--help"])
        assert h.stdout.startswith(f"usage: gradmap {cmd}"), h.stdout
        assert "--config" in h.stdout and "--threads" in h.stdout
    assert "--scenario" in gradmap(["simulate", "--help"]).stdout


def test_version():
    p = gradmap(["--version"])
    assert p.stdout.startswith("gradmap 0."), p.stdout
    assert "HDF5" in p.stdout and "LibTorch" in p.stdout


def test_huge_pages_reexecution():
    """gradmap re-executes itself (from .preinit_array, before the libraries start) with
    glibc.malloc.hugetlb=1, unless GRADMAP_HUGEPAGES=0 or the caller set GLIBC_TUNABLES."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GRADMAP_HUGEPAGES")}
    for extra, expect in (({}, "malloc: huge pages on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)"),
                          ({"GRADMAP_HUGEPAGES": "0"}, "malloc: huge pages off (GRADMAP_HUGEPAGES=0)"),
                          ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                           "huge pages off (GLIBC_TUNABLES=glibc.malloc.arena_max=2 set by the caller)")):
        p = subprocess.run([GRADMAP, "--version"], capture_output=True, text=True, timeout=60,
                           env=dict(base, **extra))
        assert p.returncode == 0 and expect in p.stdout, (extra, p.stdout, p.stderr)


def test_config_sections_and_command_line_override():
    cfg = f"{BASE}/sim.ini"
    with open(cfg, "w") as f:
        f.write(f"""# keys before any section apply to every command that knows them
seed = 5
[run]
out = {BASE}/ignored-by-simulate
[simulate]
out = {BASE}/cfg
images = 40
test-images = 6
image-size = 16
voxels = 33
sensors = 3
times = 8
modality = fmri
""")
    gradmap(["simulate", "--config", cfg, "--images", 44], ranks=2)
    with h5py.File(f"{BASE}/cfg/stimuli.h5") as f:
        assert f["/stimuli/images"].shape == (44, 16, 16, 3)  # command line wins
        assert f["/stimuli"].attrs["seed"] == 5                # top-level key applies
    with h5py.File(f"{BASE}/cfg/brain_fmri.h5") as f:
        assert f["/brain/responses"].shape == (88, 33)        # from [simulate]
    assert not os.path.exists(f"{BASE}/cfg/brain_meg.h5")
    assert not os.path.exists(f"{BASE}/ignored-by-simulate")


def test_run_on_a_config_simulates_and_validates():
    cfg = f"{BASE}/run.ini"
    with open(cfg, "w") as f:
        f.write("""[simulate]
images = 40
test-images = 6
image-size = 16
voxels = 30
sensors = 3
times = 8
""")
    out = f"{BASE}/run-out"
    p = gradmap(["run", "--config", cfg, "--out", out], ranks=2)
    assert "stage validate finished" in p.stderr, p.stderr
    for name in ("stimuli.h5", "brain_fmri.h5", "brain_meg.h5"):
        assert os.path.exists(f"{out}/data/{name}")
        assert f"{out}/data/{name}: ok" in p.stdout, p.stdout
    # extract ran with the settings /truth records, and its output validated
    assert f"{out}/features.h5: ok: features, 40 images, 2 kinds x 6 layers" in p.stdout, p.stdout
    with h5py.File(f"{out}/features.h5") as f, h5py.File(f"{out}/data/brain_fmri.h5") as b:
        for key in ("model", "objective", "pooling"):
            assert f["/features"].attrs[key] == b["/truth"].attrs[key]
    with open(f"{out}/gradmap.log") as f:
        log = f.read()
    assert "stage simulate started" in log and "stage extract finished" in log
    assert "stage encode finished" in log
    for modality in ("fmri", "meg"):
        with h5py.File(f"{out}/scores_{modality}.h5") as f:
            assert f["/activations/r"].shape[0] == 6 and f["/gradients/r"].shape[0] == 6


def test_shipped_configs_use_existing_options():
    # every key of every section of config/*.ini is an option of the command the section names
    # (a misspelt key in a shipped config would only fail when a user runs it)
    import configparser
    import re
    root = os.path.join(os.path.dirname(__file__), "..", "..", "config")
    names = sorted(n for n in os.listdir(root) if n.endswith(".ini"))
    assert {"demo.ini", "rehearsal-nsd.ini", "rehearsal-things-meg.ini"} <= set(names), names
    checked = 0
    for name in names:
        cfg = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
        cfg.read(os.path.join(root, name))
        for section in cfg.sections():
            h = gradmap([section, "--help"]).stdout
            known = set(re.findall(r"^\s+--([a-z][a-z-]*)", h, re.M))
            for key in cfg[section]:
                assert key in known, f"{name} [{section}]: gradmap {section} has no option --{key}"
                checked += 1
    assert checked > 60, checked


run_tests([test_help_for_every_command, test_version, test_huge_pages_reexecution, test_config_sections_and_command_line_override,
           test_run_on_a_config_simulates_and_validates, test_shipped_configs_use_existing_options])
