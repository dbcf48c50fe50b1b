#!/usr/bin/env python3
"""Projects the time of the full study (docs/scaling.md) from rates measured on this machine.

The encode cost of one subject and model is counted in floating-point operations (the GEMMs
that dominate it, docs/scaling.md gives the terms) and divided by the effective rate measured in
a rehearsal (--encode-gflops, per core). Extraction: images x (forward + backward FLOPs) over
the effective rate measured for a real model at 224 px (--extract-gflops, per core on CPU;
--gpu-tflops per GPU is an assumption, not a measurement: no GPU was available).

Usage: /usr/bin/python3 bench/project_study.py --encode-gflops X --extract-gflops Y
       [--cores-per-node 128] [--nodes 16] [--gpus 8] [--gpu-tflops 20]
"""
import argparse

A = 10           # alphas
W = 3            # band weights of --joint
NQ_PER_LAYER = 1  # nuisance columns: the loss plus one gradient norm per layer
PCA = 1024
B, BB = 10000, 1000  # permutations, bootstraps

# layer widths after pooling (mean; ViT: cls), capped by --pca 1024; forward GFLOPs at 224 px
MODELS = {
    "resnet18@112 (rehearsal)": ([64, 64, 128, 256, 512], 0.45),
    "resnet50": ([64, 256, 512, 1024, 2048], 4.1),
    "convnext_tiny": ([96, 96, 192, 384, 768], 4.5),
    "swin_t": ([96, 192, 384, 768], 4.5),
    "vit_b_16": ([768] * 12, 17.6),
}
DATASETS = {  # training images n, test images m, targets T, trials, subjects
    "NSD": (9000, 1000, 30000, 30000, 8),
    "THINGS-MEG": (22248, 200, 271 * 281, 24648, 4),
}


def encode_flops(dims, n, m, t, joint=True):
    """GEMM flops of encode --joint for one subject: per fitted design of width p (rank r =
    min(n, p)) over all t targets, U^T Y and one prediction per alpha (2 (A + 1) n r t) plus
    the test predictions (2 m r t); the SVD of each design once (4 n r^2); the permutations and
    bootstraps of each kind and layer (2 m t (B + 5 B_b))."""
    dims = [min(d, PCA) for d in dims]
    L = len(dims)
    nq = 1 + L * NQ_PER_LAYER

    def fit(p):
        r = min(n, p)
        return 2 * (A + 1) * n * r * t + 2 * m * r * t

    def svd(p):
        r = min(n, p)
        return 4 * n * r * r

    kinds = 2 * sum(fit(d) + svd(d) for d in dims)
    total = kinds
    if joint:
        pa = sum(dims) + nq
        refs = [pa] + [d + nq for d in dims]
        total += sum(fit(p) + svd(p) for p in refs)
        # each target's joint fits use its chosen activation model: R_0 (all layers) as the bound
        total += sum(W * fit(pa + d) for d in dims)
        total += sum(W * svd(p + d) for p in refs for d in dims)  # every design, once
    replicates = 2 * m * t * (B + 5 * BB) * (2 + (1 if joint else 0)) * L
    return total + replicates


def sides_bytes(dims, n, m, joint=True):
    """Encode's cached training sides per rank (every rank holds all of them): per design of
    width p, U in float64 and float32 and X_test V (12 n r + 8 m r bytes, r = min(n, p)), as
    encode's memory plan counts them (src/encoding/encode_plan.cpp)."""
    dims = [min(d, PCA) for d in dims]
    nq = 1 + len(dims) * NQ_PER_LAYER
    widths = 2 * dims
    if joint:
        refs = [sum(dims) + nq] + [d + nq for d in dims]
        widths += refs + [p + d for p in refs for d in dims for _ in range(W)]
    return sum(12 * n * min(n, p) + 8 * m * min(n, p) for p in widths)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encode-gflops", type=float, required=True, help="measured, per core")
    ap.add_argument("--extract-gflops", type=float, required=True, help="measured, per core (CPU)")
    ap.add_argument("--cores-per-node", type=int, default=128)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-tflops", type=float, default=20.0, help="assumed, per GPU")
    ap.add_argument("--study", default="resnet50,convnext_tiny,swin_t" + ",vit_b_16" * 6,
                    help="the study's models (9: three CNNs and six ViT-B-sized backbones)")
    a = ap.parse_args()
    cores = a.cores_per_node * a.nodes
    print(f"| model | dataset | encode Tflop per subject | encode, 1 core (h) | encode per subject on "
          f"{a.nodes} x {a.cores_per_node} cores (min) | cached sides per rank (GiB) | "
          f"extract per subject, 1 GPU (min) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = {"encode_core_h": 0.0, "extract_gpu_h": 0.0}
    study = a.study.split(",")
    for name, (dims, gf) in MODELS.items():
        for ds, (n, m, t, _trials, subjects) in DATASETS.items():
            f = encode_flops(dims, n, m, t)
            core_h = f / (a.encode_gflops * 1e9) / 3600
            images = n + m
            ext_gpu_min = images * 3 * gf * 1e9 / (a.gpu_tflops * 1e12) / 60
            sides = sides_bytes(dims, n, m) / 2**30
            print(f"| {name} | {ds} | {f / 1e12:.0f} | {core_h:.0f} | {core_h * 60 / cores:.1f} | "
                  f"{sides:.0f} | {ext_gpu_min:.1f} |")
            copies = study.count(name)
            totals["encode_core_h"] += copies * core_h * subjects
            totals["extract_gpu_h"] += copies * ext_gpu_min / 60 * subjects
    print()
    print(f"The study ({len(study)} models: {a.study}) over both datasets (8 + 4 subjects): encode "
          f"{totals['encode_core_h']:.0f} core-hours ({totals['encode_core_h'] / cores:.1f} h on "
          f"{cores} cores), extract {totals['extract_gpu_h']:.1f} GPU-hours "
          f"({totals['extract_gpu_h'] / a.gpus:.2f} h on {a.gpus} GPUs, assumed "
          f"{a.gpu_tflops} TFLOP/s each); on CPU at the measured {a.extract_gflops} GFLOP/s per "
          f"core: {totals['extract_gpu_h'] * a.gpu_tflops * 1e3 / a.extract_gflops:.0f} core-hours.")


if __name__ == "__main__":
    main()
