"""What gradmap extract must compute, in PyTorch (docs/design.md's preprocessing, objectives and
poolings), and the comparison of a features file with it; shared by the extract reference tests."""
import h5py
import numpy as np
import torch
import torch.nn.functional as F

from philox import Philox

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def write_stimuli(path, n, size, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random images (not white noise) so that features vary meaningfully.
    coarse = rng.integers(0, 256, (n, size // 4 + 1, size // 4 + 1, 3)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 4, 1), 4, 2)[:, :size, :size]
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["gradmap_schema"] = np.int64(1)
        f["/stimuli/images"] = img
        f["/stimuli/ids"] = np.arange(n, dtype=np.int64)
        if labels:
            f["/stimuli/labels"] = rng.integers(0, 10, n).astype(np.int64)
    return img


def resize(x, size):
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def augmented_view(x01, index, seed, out_size):
    """The augmented view of one image [1, 3, H, W] in [0, 1], drawn as gradmap documents it."""
    h, w = x01.shape[-2:]
    rng = Philox(seed, "augmentation", index, 1)
    area = rng.uniform(0.4, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(max(round(np.sqrt(area * ratio) * w), 1), w))
    ch = int(min(max(round(np.sqrt(area / ratio) * h), 1), h))
    x0, y0 = rng.below(w - cw + 1), rng.below(h - ch + 1)
    flip = rng.below(2) == 1
    v = resize(x01[:, :, y0:y0 + ch, x0:x0 + cw], out_size)
    return v.flip(3) if flip else v


def reference(module, images, labels, pooling, input_size=None, objective="cross-entropy", seed=0):
    """What gradmap must compute: docs/design.md's preprocessing, the summed objective, dL/dh_l."""
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = x01
    if input_size and x.shape[-1] != input_size:
        x = resize(x, input_size)
    x = ((x - MEAN) / STD).requires_grad_(True)
    hs, out = module(x)
    if objective == "cross-entropy":
        target = out.detach().argmax(1) if labels is None else torch.from_numpy(labels)
        loss = F.cross_entropy(out, target, reduction="sum")
    else:
        size = input_size or x01.shape[-1]
        views = torch.cat([augmented_view(x01[i:i + 1], i, seed, size) for i in range(len(x01))])
        with torch.no_grad():
            teacher = module((views - MEAN) / STD)[1]
        if isinstance(objective, torch.nn.Module):
            target = out.detach().argmax(1) if labels is None else torch.from_numpy(labels)
            loss = objective(out, teacher, target).sum()
        elif objective == "cosine":
            loss = (1 - F.cosine_similarity(out, teacher, dim=1)).sum()
        else:  # dino: fixed random prototypes, student temperature 0.1, teacher 0.04, centre 0
            d, k = out.shape[1], 256
            rng = Philox(seed, "projection")
            w = torch.tensor([rng.normal() / np.sqrt(d) for _ in range(d * k)], dtype=torch.float32).view(d, k)
            s = F.normalize(out, dim=1) @ w / 0.1
            t = torch.softmax(F.normalize(teacher, dim=1) @ w / 0.04, 1)
            loss = -(t * torch.log_softmax(s, 1)).sum()
    gs = torch.autograd.grad(loss, hs)

    def pool(h):
        if h.dim() == 4:
            if pooling.startswith("grid:"):
                g = int(pooling[5:])
                return F.adaptive_avg_pool2d(h, (g, g)).flatten(1)
            return h.mean((2, 3))
        return {"mean": lambda t: t.mean(1), "cls": lambda t: t[:, 0],
                "patch-mean": lambda t: t[:, 1:].mean(1),
                "cls+patch-mean": lambda t: torch.cat([t[:, 0], t[:, 1:].mean(1)], 1)}[pooling](h)
    return [pool(h).detach().numpy() for h in hs], [pool(g).numpy() for g in gs]


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(features, module, images, labels, pooling, input_size=None, tol=1e-5,
            objective="cross-entropy", seed=0):
    acts, grads = reference(module, images, labels, pooling, input_size, objective, seed)
    with h5py.File(features) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["/features"].attrs["layers"]]
        assert names == list(module.layer_names), names
        nonzero = 0
        for l, name in enumerate(names):
            a = f[f"/features/activations/{name}"][()]
            g = f[f"/features/gradients/{name}"][()]
            ea = rel_err(a, acts[l])
            if np.abs(grads[l]).max() == 0:
                # e.g. patch tokens of the last block under a CLS head: exactly no gradient
                eg = float(np.abs(g).max())
            else:
                eg = rel_err(g, grads[l])
                nonzero += 1
            assert ea < tol and eg < tol, f"{name}: activation error {ea:.2e}, gradient error {eg:.2e}"
        assert nonzero >= len(names) - 1, "reference gradients are zero: the test would be vacuous"
