#!/usr/bin/env python3
"""Benchmark: images/s of `gradmap extract` against a Python PyTorch loop doing the same work
(preprocessing, forward, one backward for dL/dh_l of every layer, pooling) on the same
TorchScript model, with the same number of threads, in the same session.

Usage: /usr/bin/python3 bench/extract_bench.py [--gradmap build/src/gradmap] [--threads 2]
       [--images 1024] [--batch 32] [--model vit|cnn|vit_s16|resnet50] [--repeats 3]
Prints the environment (threads, OPENBLAS_CORETYPE, and the settings that change PyTorch's own
speed in the Python process: GLIBC_TUNABLES, ATEN_CPU_CAPABILITY), both rates (best of
--repeats), and the ratio gradmap / python.

gradmap re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages
for large buffers; src/cli/main.cpp) unless GLIBC_TUNABLES is set. A Python process does not: for
a comparison with the same allocator run the benchmark with that variable exported (both sides
then have it), and without it for PyTorch as users run it. gradmap's rate is taken from its own
progress line (the extraction loop, excluding process start-up and model loading) and also from
the wall clock of the command.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import export_torchscript as ex  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# Forward multiply-accumulates per 224 px image: ViT-S/16 (12 blocks of 197 tokens x 384, MLP
# 1536, patch embedding, head) and torchvision's ResNet-50.
GMACS = {"vit_s16": 4.60, "resnet50": 4.09}


def sgemm_peak(n=2048):
    x = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    x @ x
    t = time.perf_counter()
    for _ in range(3):
        x @ x
    return 3 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9


def python_loop(model, images, labels, batch, pooling):
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float().div(255)
        x = ((x - MEAN) / STD).requires_grad_(True)
        hs, out = model(x)
        loss = F.cross_entropy(out, torch.from_numpy(labels[s:s + batch]), reduction="sum")
        gs = torch.autograd.grad(loss, hs)
        feats = []
        for h, g in zip(hs, gs):
            if h.dim() == 4:
                feats += [h.detach().mean((2, 3)), g.mean((2, 3))]
            else:
                feats += [h.detach()[:, 0] if pooling == "cls" else h.detach().mean(1),
                          g[:, 0] if pooling == "cls" else g.mean(1)]
        _ = [f.numpy().copy() for f in feats]
    return len(images) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gradmap", default="build/src/gradmap")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", choices=["vit", "cnn", "vit_s16", "resnet50"], default="vit",
                    help="vit / cnn: small demo models at 64 px; vit_s16 (ViT-S/16) and resnet50: "
                         "torchvision architectures with random weights at 224 px, traced")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = tempfile.mkdtemp(prefix="gradmap-bench-")
    torch.manual_seed(0)
    size, script, names = 64, True, None
    if a.model == "vit":
        model = ex.DemoViT(input_size=64, patch=8, dim=192, depth=6, heads=6).eval()
        pooling = "cls"
    elif a.model == "cnn":
        model = ex.demo_model("demo-cnn")
        pooling = "mean"
    elif a.model == "vit_s16":
        import torchvision
        vit = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12,
                                                   num_heads=6, hidden_dim=384, mlp_dim=1536)
        with torch.no_grad():  # torchvision's head starts at zero: no gradient would flow
            vit.heads.head.weight.normal_(std=0.02)
        mods, names, _ = ex.torchvision_layers("vit_s_16", vit)
        model, size, script, pooling = ex.HookWrapper(vit.eval(), mods).eval(), 224, False, "cls"
    else:
        model, names = ex.torchvision_model("resnet50")
        size, script, pooling = 224, False, "mean"
    path = f"{d}/model.pt"
    ex.export(model, path, size, layer_names=names, script=script)
    scripted = torch.jit.load(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, a.images).astype(np.int64)
    with h5py.File(f"{d}/stimuli.h5", "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f["/stimuli/images"] = images
        f["/stimuli/ids"] = np.arange(a.images)
        f["/stimuli/labels"] = labels

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
    flags = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    py, py_cold, eager = [], [], []
    gm_loop, gm_wall = [], []
    for _ in range(a.repeats):
        # The TorchScript module with the optimising executor off: with it on, Python returns
        # layer outputs disconnected from the loss after warm-up (no gradient reaches them).
        with torch.jit.optimized_execution(False):
            # cold: a freshly loaded module, as every gradmap run is (JIT profiling included)
            py_cold.append(python_loop(torch.jit.load(path), images, labels, a.batch, pooling))
            py.append(python_loop(scripted, images, labels, a.batch, pooling))  # warm module
        eager.append(python_loop(model, images, labels, a.batch, pooling))
        # --bind-to none: Open MPI binds a lone rank to one core, which would halve its 2 threads
        t0 = time.perf_counter()
        p = subprocess.run(["mpiexec", "-n", "1", *flags, "--bind-to", "none", a.gradmap, "extract",
                            "--stimuli", f"{d}/stimuli.h5", "--model", f"torchscript:{path}",
                            "--pooling", pooling, "--batch-size", str(a.batch), "--threads",
                            str(a.threads), "--no-resume", "--block", str(a.images),
                            "--out", f"{d}/features.h5"],
                           capture_output=True, text=True, env=env, check=True)
        gm_wall.append(a.images / (time.perf_counter() - t0))
        gm_loop.append(float(re.search(r"extract: done \d+ images in \S+ \(([\d.e+]+) images/s\)",
                                       p.stderr).group(1)))
    print(f"model {a.model} (TorchScript), {a.images} images {size}x{size}, batch {a.batch}, "
          f"{a.threads} threads, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
          f"torch {torch.__version__}; this Python process: "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}")
    print(f"python loop        : {max(py):8.1f} images/s (TorchScript module, warm; best of {a.repeats}: {', '.join(f'{x:.1f}' for x in py)})")
    print(f"python loop (cold) : {max(py_cold):8.1f} images/s (freshly loaded TorchScript module, as gradmap)")
    print(f"python loop (eager): {max(eager):8.1f} images/s (the nn.Module before export)")
    print(f"gradmap extract    : {max(gm_loop):8.1f} images/s (extraction loop)")
    print(f"gradmap extract    : {max(gm_wall):8.1f} images/s (whole command incl. start-up, I/O)")
    base = max(max(py), max(eager))
    if a.model in GMACS:
        # model FLOPs per image: the forward pass and the backward pass to the layer outputs
        # (activation gradients only, no weight gradients): 2 x 2 x the forward MACs
        flops = 4 * GMACS[a.model]
        peak = sgemm_peak()
        print(f"model FLOPs per image {flops:.1f} G (forward {GMACS[a.model]} GMACs); SGEMM peak "
              f"(numpy, same BLAS, this session) {peak:.0f} GFLOP/s; gradmap loop "
              f"{max(gm_loop) * flops:.0f} GFLOP/s = {100 * max(gm_loop) * flops / peak:.0f}% of it; "
              f"Python warm {base * flops:.0f} GFLOP/s = {100 * base * flops / peak:.0f}%")
    print(f"ratio gradmap/python: {max(gm_loop) / max(py_cold):.2f}x (loop, both cold); "
          f"{max(gm_loop) / base:.2f}x (loop vs the faster warm Python loop); "
          f"{max(gm_wall) / base:.2f}x (whole command vs warm Python)")

if __name__ == "__main__":
    main()
