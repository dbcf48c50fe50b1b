"""Real architectures at 224 px: torchvision's ViT-B/16, ResNet-50, ConvNeXt-T and Swin-T (random
weights), exported by tools/export_torchscript.py and traced by a user without it, through gradmap
extract against PyTorch hooks in Python: the activations and gradients of every exported layer.

Tolerance: 1e-4 relative (max-abs normalised), or a few times PyTorch's own variation between 1
and 2 threads where that is larger (a ReLU network's early-layer gradients move by ~1e-3 when a
pre-activation near zero changes sign: ResNet-50 here). A wrong layer, pooling, preprocessing,
permutation or gradient is O(1) off.
"""
import os
import sys

import h5py
import numpy as np
import torch

from extract_ref import reference, rel_err, write_stimuli
from gmtest import expect_failure, gradmap, run_tests, tmpdir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import export_torchscript as ex  # noqa: E402

BASE = tmpdir("torchvision")
N_IMAGES = 3
FACTOR = 8  # x PyTorch's thread-count variation (ResNet-50 early stages: up to 1.7x seen, Haswell kernels)


class UserWrapper(torch.nn.Module):
    """What a user writes without the export tool: hooks on the submodules they want, a forward
    in the model contract, then torch.jit.trace (which keeps no input_size / layer_names)."""

    def __init__(self, model, modules, channels_last=False):
        super().__init__()
        self.model = model
        self.store = []
        named = dict(model.named_modules())
        for m in modules:
            named[m].register_forward_hook(self.keep_nchw if channels_last else self.keep)

    def keep(self, _m, _i, out):
        self.store.append(out)

    def keep_nchw(self, _m, _i, out):
        nchw = out.permute(0, 3, 1, 2)
        self.store.append(nchw)
        return nchw.permute(0, 2, 3, 1)

    def forward(self, x):
        self.store = []
        y = self.model(x)
        return list(self.store), y


def thread_variation(module, img, labels, pooling):
    """Per layer: PyTorch's own relative difference between 1 and 2 threads (acts, grads)."""
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(reference(module, img, labels, pooling))
    torch.set_num_threads(1)
    (a1, g1), (a2, g2) = runs
    return [rel_err(x, y) for x, y in zip(a1, a2)], [rel_err(x, y) for x, y in zip(g1, g2)], runs[0]


def check_features(path, names, ref, var, what):
    acts, grads = ref
    va, vg = var
    with h5py.File(path) as f:
        got = [n.decode() if isinstance(n, bytes) else n for n in f["/features"].attrs["layers"]]
        assert got == names, (what, got)
        for l, name in enumerate(names):
            a = f[f"/features/activations/{name}"][()]
            g = f[f"/features/gradients/{name}"][()]
            assert np.abs(grads[l]).max() > 0, f"{what} {name}: zero reference gradient (vacuous)"
            ea, eg = rel_err(a, acts[l]), rel_err(g, grads[l])
            ta, tg = max(1e-4, FACTOR * va[l]), max(1e-4, FACTOR * vg[l])
            print(f"  {what} {name}: activations {ea:.1e} (tol {ta:.0e}), gradients {eg:.1e} "
                  f"(tol {tg:.0e})")
            assert ea < ta and eg < tg, (what, name, ea, eg)


FAMILIES = [  # torchvision name, pooling, default layer count
    ("vit_b_16", "cls", 12),
    ("resnet50", "mean", 5),
    ("convnext_tiny", "mean", 5),
    ("swin_t", "mean", 4),
]


def test_torchvision_families_match_pytorch_at_224_px():
    img = write_stimuli(f"{BASE}/s224.h5", N_IMAGES, 224, seed=21)
    with h5py.File(f"{BASE}/s224.h5") as f:
        labels = f["/stimuli/labels"][()]
    torch.set_num_threads(1)
    for name, pooling, depth in FAMILIES:
        wrapped, names = ex.torchvision_model(name, seed=1)
        mods, _, channels_last = ex.torchvision_layers(name, wrapped.model)
        assert len(names) == depth, (name, names)
        va, vg, ref = thread_variation(wrapped, img, labels, pooling)
        # exported by the tool (the contract's attributes)
        ex.export(wrapped, f"{BASE}/{name}.pt", 224, names)
        gradmap(["extract", "--stimuli", f"{BASE}/s224.h5", "--model", f"torchscript:{BASE}/{name}.pt",
                 "--pooling", pooling, "--out", f"{BASE}/{name}.h5"], ranks=1, timeout=600)
        check_features(f"{BASE}/{name}.h5", names, ref, (va, vg), f"{name} exported")
        # traced by a user: no attributes, probed at the stimuli's size, layers layer_00...
        user = UserWrapper(wrapped.model, mods, bool(channels_last)).eval()
        traced = torch.jit.trace(user, torch.randn(1, 3, 224, 224), check_trace=False, strict=False)
        assert not hasattr(traced, "input_size")
        torch.jit.save(traced, f"{BASE}/{name}-user.pt")
        del traced
        gradmap(["extract", "--stimuli", f"{BASE}/s224.h5", "--model",
                 f"torchscript:{BASE}/{name}-user.pt", "--pooling", pooling, "--batch-size", 2,
                 "--out", f"{BASE}/{name}-user.h5"], ranks=1, timeout=600)
        check_features(f"{BASE}/{name}-user.h5", [f"layer_{i:02d}" for i in range(depth)], ref,
                       (va, vg), f"{name} user-traced")


MODEL_FILE = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''


def test_a_model_from_a_python_constructor():
    # export_torchscript.py python FILE.py:FUNCTION OUT.pt --layers ...: any nn.Module
    with open(f"{BASE}/mymodel.py", "w") as f:
        f.write(MODEL_FILE)
    torch.manual_seed(3)
    ex.main(["python", f"{BASE}/mymodel.py:make", f"{BASE}/mine.pt", "--layers", "1,3",
             "--input-size", "40"])
    img = write_stimuli(f"{BASE}/s40.h5", 6, 40, seed=22)
    with h5py.File(f"{BASE}/s40.h5") as f:
        labels = f["/stimuli/labels"][()]
    gradmap(["extract", "--stimuli", f"{BASE}/s40.h5", "--model", f"torchscript:{BASE}/mine.pt",
             "--batch-size", 4, "--out", f"{BASE}/mine.h5"], ranks=2)
    # the exported weights, back in an eager module: the same layers through PyTorch hooks
    loaded = torch.jit.load(f"{BASE}/mine.pt")
    import importlib.util
    spec = importlib.util.spec_from_file_location("mymodel", f"{BASE}/mymodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    eager = mod.make()
    eager.load_state_dict({k.removeprefix("inner.model."): v for k, v in loaded.state_dict().items()})
    wrapped = ex.HookWrapper(eager.eval(), ["1", "3"]).eval()
    acts, grads = reference(wrapped, img, labels, "mean")
    check_features(f"{BASE}/mine.h5", ["1", "3"], (acts, grads), ([0, 0], [0, 0]), "python")
    # a constructor that does not exist, or returns no module: named in the error
    for spec_, needle in ((f"{BASE}/mymodel.py:nothing", "has no nothing"),
                          (f"{BASE}/absent.py:make", "absent.py")):
        try:
            ex.main(["python", spec_, f"{BASE}/x.pt", "--layers", "1"])
        except SystemExit as e:
            assert needle in str(e), e
        else:
            raise AssertionError("no error for " + spec_)


def test_swin_channels_first_and_a_fixed_size_vit():
    # Swin's stages return [B, H, W, C]; a wrong permutation would pool over the wrong axes.
    wrapped, names = ex.torchvision_model("swin_t", seed=1)
    with torch.no_grad():
        hs, _ = wrapped(torch.randn(1, 3, 224, 224))
    assert [tuple(h.shape[1:]) for h in hs] == [(96, 56, 56), (192, 28, 28), (384, 14, 14),
                                                (768, 7, 7)], [h.shape for h in hs]
    # a model whose traced size is fixed (ViT) fails clearly at another size
    img = write_stimuli(f"{BASE}/s64.h5", 2, 64, seed=23)
    if os.path.exists(f"{BASE}/vit_b_16-user.pt"):
        expect_failure(["extract", "--stimuli", f"{BASE}/s64.h5", "--model",
                        f"torchscript:{BASE}/vit_b_16-user.pt", "--out", f"{BASE}/bad.h5"],
                       "vit_b_16-user.pt", "64 x 64", "export_torchscript.py wrap", ranks=1)
    del img


run_tests([test_torchvision_families_match_pytorch_at_224_px, test_a_model_from_a_python_constructor,
           test_swin_channels_first_and_a_fixed_size_vit])
