#!/usr/bin/env python3
"""Export a vision model to TorchScript in gradmap's model contract, and check the export.

Contract (docs/design.md): the saved module's
    forward(x: Tensor[B, 3, H, W]) -> Tuple[List[Tensor], Tensor]
returns the per-layer outputs in network order ([B, T, D] tokens, [B, C, H, W] feature maps or
[B, D]) and the final output (logits or embedding). Optional attributes:
    layer_names: List[str]   (default layer_00, layer_01, ...)
    input_size: int          (gradmap resizes images to it, bilinear + antialias; else stored size)
Images reach the model as float RGB in [0, 1] normalised with ImageNet mean/std.

Usage (run with /usr/bin/python3, Debian's python3-torch):
    export_torchscript.py demo-vit OUT.pt            # the small ViT used in gradmap's tests
    export_torchscript.py demo-cnn OUT.pt            # the small CNN with BatchNorm
    export_torchscript.py torchvision NAME OUT.pt [--weights W] [--layers a,b,c] [--input-size N]
    export_torchscript.py timm NAME OUT.pt [--layers ...] [--input-size N]
    export_torchscript.py hf NAME_OR_DIR OUT.pt [--input-size N]   # ViT / DINOv2 / DINOv3 hidden states
    export_torchscript.py python MODULE:FUNCTION OUT.pt --layers a,b,c [--input-size N]
                                                     # any model: FUNCTION() returns the nn.Module
                                                     # (MODULE: an importable name or a .py path)
    export_torchscript.py wrap IN.pt OUT.pt --input-size N [--layers a,b,c]
                                                     # add the contract's attributes to a module you
                                                     # traced yourself (trace keeps no attributes)
    export_torchscript.py layers NAME                # print the default layers of a torchvision model

torchvision / timm / python models are wrapped with forward hooks on the named submodules and
traced. The layers taken by default from torchvision (--layers overrides; names as in the output):
    vit_*                  every encoder block: encoder.layers.encoder_layer_i -> block01..blockNN
                           ([B, 197, D] tokens at 224 px; token 0 is CLS)
    resnet*, resnext*, wide_resnet*
                           the stem and the four stages: maxpool -> stem, layer1..layer4 -> stage1..4
    convnext_*             the stem and the four stages: features.0 -> stem, features.1/3/5/7 -> stage1..4
    swin_*                 the four stages: features.1/3/5/7 -> stage1..4 (Swin's feature maps are
                           channels-last [B, H, W, C]; the export returns them as [B, C, H, W])
    any other              the top-level children except the last (the head)
timm models default to the top-level children except the last; Hugging Face vision transformers with output_hidden_states=True
(each block's hidden states [B, T, D]; token 0 is CLS, so gradmap's --pooling cls and patch-mean
apply). After saving, the export is reloaded and its outputs compared with the original module.
"""
import argparse
import math
import sys
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------- demo models
class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DemoViT(nn.Module):
    layer_names: List[str]
    input_size: int

    def __init__(self, input_size=32, patch=8, dim=48, depth=3, heads=4, classes=10):
        super().__init__()
        self.input_size = input_size
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (input_size // patch) ** 2
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.layer_names = ["embed"] + [f"block{i}" for i in range(depth)]

    def forward(self, x) -> Tuple[List[torch.Tensor], torch.Tensor]:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        outs: List[torch.Tensor] = [t]
        for blk in self.blocks:
            t = blk(t)
            outs.append(t)
        return outs, self.head(self.norm(t)[:, 0])


class DemoCNN(nn.Module):
    layer_names: List[str]

    def __init__(self, classes=10):
        super().__init__()
        ch = [3, 12, 24, 32, 48]
        self.stages = nn.ModuleList()
        for i in range(4):
            self.stages.append(nn.Sequential(
                nn.Conv2d(ch[i], ch[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(ch[i + 1]), nn.ReLU(),
                nn.MaxPool2d(2) if i % 2 == 1 else nn.Identity()))
        self.head = nn.Linear(ch[-1], classes)
        self.layer_names = [f"stage{i + 1}" for i in range(4)]

    def forward(self, x) -> Tuple[List[torch.Tensor], torch.Tensor]:
        outs: List[torch.Tensor] = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return outs, self.head(x.mean((2, 3)))


def demo_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = DemoViT() if kind == "demo-vit" else DemoCNN()
    if kind == "demo-cnn":  # non-trivial BatchNorm running statistics, used in eval mode
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.weight.uniform_(0.8, 1.2)
                    mod.bias.uniform_(-0.1, 0.1)
    return m.eval()


# ---------------------------------------------------------------------- wrapped models
class HookWrapper(nn.Module):
    """Runs `model`, returns the outputs of the named submodules (captured by forward hooks).
    Submodules listed in `channels_last` return [B, H, W, C] maps, returned as [B, C, H, W]."""

    def __init__(self, model: nn.Module, layers: List[str], channels_last=()):
        super().__init__()
        self.model = model
        self.names = layers
        self._captured: List[torch.Tensor] = []
        mods = dict(model.named_modules())
        for name in layers:
            if name not in mods:
                raise SystemExit(f"no submodule {name!r}; choose from: {', '.join(list(mods)[1:40])} ...")
            mods[name].register_forward_hook(self._hook(name in channels_last))

    def _hook(self, permute: bool):
        def hook(_m, _i, out):
            if permute:  # the captured [B, C, H, W] view is what the rest of the network reads
                nchw = out.permute(0, 3, 1, 2)
                self._captured.append(nchw)
                return nchw.permute(0, 2, 3, 1)
            self._captured.append(out[0] if isinstance(out, (tuple, list)) else out)
            return None
        return hook

    def forward(self, x):
        self._captured = []
        y = self.model(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return list(self._captured), y


class HFWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = list(out.hidden_states[1:])
        final = out.pooler_output if getattr(out, "pooler_output", None) is not None else hidden[-1][:, 0]
        return hidden, final


class Contract(nn.Module):
    """Scripted shell around a traced model: carries the typed contract attributes."""
    layer_names: List[str]
    input_size: int

    def __init__(self, inner, layer_names: List[str], input_size: int):
        super().__init__()
        self.inner = inner
        self.layer_names = layer_names
        self.input_size = input_size

    def forward(self, x) -> Tuple[List[torch.Tensor], torch.Tensor]:
        layers, out = self.inner(x)
        return layers, out


# ------------------------------------------------------------- default layers per family
def torchvision_layers(name: str, model: nn.Module):
    """(submodules, names, channels-last submodules) taken from a torchvision model by default."""
    if name.startswith("vit_"):
        blocks = [n for n, _ in model.encoder.layers.named_children()]
        return ([f"encoder.layers.{b}" for b in blocks],
                [f"block{i + 1:02d}" for i in range(len(blocks))], ())
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return (["maxpool", "layer1", "layer2", "layer3", "layer4"],
                ["stem", "stage1", "stage2", "stage3", "stage4"], ())
    if name.startswith("convnext"):
        return (["features.0", "features.1", "features.3", "features.5", "features.7"],
                ["stem", "stage1", "stage2", "stage3", "stage4"], ())
    if name.startswith("swin"):
        mods = ["features.1", "features.3", "features.5", "features.7"]
        return mods, ["stage1", "stage2", "stage3", "stage4"], tuple(mods)
    children = [n for n, _ in model.named_children()][:-1]
    return children, children, ()


def torchvision_model(name: str, weights=None, layers=None, seed=0):
    """A torchvision model wrapped in forward hooks: (HookWrapper, layer names). weights=None
    keeps torchvision's random initialisation (seeded); a weights name needs its local cache."""
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=weights).eval()
    if weights is None:
        # torchvision initialises some heads to zero (ViT's): every gradient would be exactly zero
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.Linear) and not mod.weight.any():
                    nn.init.normal_(mod.weight, std=0.02)
    mods, names, channels_last = torchvision_layers(name, model)
    if layers:
        mods, names = layers, layers
        if name.startswith("swin"):  # every Swin feature map is channels-last
            channels_last = tuple(m for m in layers if m.startswith("features"))
    return HookWrapper(model, mods, channels_last).eval(), names


def python_model(spec: str):
    """MODULE:FUNCTION -> FUNCTION(); MODULE is an importable name or a path to a .py file."""
    import importlib
    import importlib.util
    import os
    if ":" not in spec:
        raise SystemExit(f"python: give MODULE:FUNCTION, not {spec!r}")
    mod_name, fn = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.exists(mod_name):
            raise SystemExit(f"python: no file {mod_name}")
        loader = importlib.util.spec_from_file_location("user_model", mod_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    if not hasattr(module, fn):
        raise SystemExit(f"python: {mod_name} has no {fn}")
    model = getattr(module, fn)()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"python: {spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def export(module: nn.Module, path: str, input_size: int, layer_names=None, script=False):
    module = module.eval()
    example = torch.randn(2, 3, input_size, input_size)
    if script:
        ts = torch.jit.script(module)
    else:
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        with torch.no_grad():
            n_layers = len(module(example)[0])
        names = layer_names or [f"layer_{i:02d}" for i in range(n_layers)]
        ts = torch.jit.script(Contract(traced, names, input_size))
    torch.jit.save(ts, path)
    check(path, module, example)


def check(path: str, module: nn.Module, example):
    """Reloads the export and compares its outputs with the original module."""
    loaded = torch.jit.load(path)
    with torch.no_grad():
        ref_layers, ref_out = module(example)
        layers, out = loaded(example)
    if len(layers) != len(ref_layers):
        raise SystemExit(f"export returns {len(layers)} layers, original {len(ref_layers)}")
    for i, (a, b) in enumerate(zip(layers, ref_layers)):
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        if err > 1e-5:
            raise SystemExit(f"layer {i}: export differs from the original (relative {err:.2e})")
    print(f"exported {path}: {len(layers)} layers, final output {tuple(out.shape)}; check passed")


def wrap(src: str, path: str, input_size, layer_names=None):
    """A TorchScript module already in the contract's forward (e.g. a user's own torch.jit.trace,
    which keeps no Python attributes), saved with input_size and layer_names."""
    if not input_size:
        raise SystemExit("wrap: give --input-size, the image size the module was traced at")
    inner = torch.jit.load(src).eval()
    example = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        n_layers = len(inner(example)[0])
    names = layer_names or [f"layer_{i:02d}" for i in range(n_layers)]
    if len(names) != n_layers:
        raise SystemExit(f"wrap: {len(names)} layer names for {n_layers} layer outputs")
    torch.jit.save(torch.jit.script(Contract(inner, names, input_size)), path)
    check(path, inner, example)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", choices=["demo-vit", "demo-cnn", "torchvision", "timm", "hf", "python",
                                       "wrap", "layers"])
    ap.add_argument("args", nargs="+", help="[NAME] OUT.pt")
    ap.add_argument("--layers", default=None, help="comma-separated submodule names to tap")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--weights", default=None, help="torchvision weights name (needs local cache)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.source.startswith("demo"):
        m = demo_model(a.source, a.seed)
        return export(m, a.args[0], a.input_size or 32, script=True)
    if a.source == "layers":
        import torchvision
        model = torchvision.models.get_model(a.args[0], weights=None)
        for mod, name in zip(*torchvision_layers(a.args[0], model)[:2]):
            print(f"{name}\t{mod}")
        return 0
    if len(a.args) != 2:
        ap.error("give NAME and OUT.pt")
    name, out = a.args
    if a.source == "wrap":
        return wrap(name, out, a.input_size, a.layers.split(",") if a.layers else None)
    size = a.input_size or 224
    layers = a.layers.split(",") if a.layers else None
    if a.source == "torchvision":
        wrapped, names = torchvision_model(name, a.weights, layers, a.seed)
        return export(wrapped, out, size, names)
    if a.source == "python":
        if not layers:
            ap.error("python: give --layers (the submodules to tap, in network order)")
        return export(HookWrapper(python_model(name), layers), out, size, layers)
    if a.source == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    else:
        from transformers import AutoModel
        model = AutoModel.from_pretrained(name)
        return export(HFWrapper(model), out, size, None)
    layers = layers or [n for n, _ in model.named_children()][:-1]
    return export(HookWrapper(model.eval(), layers), out, size, layers)


if __name__ == "__main__":
    sys.exit(main())
