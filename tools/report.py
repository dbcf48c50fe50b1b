#!/usr/bin/python3
"""Figures and the self-contained HTML page of `gradmap report` (called by the binary, which has
already written the CSV tables and NIfTI maps).  Usage: report.py STATS_DIR REPORT_DIR

Figures (PNG, matplotlib, Agg): score by layer per ROI for activations vs gradients; peak-layer
distributions of significant voxels; MEG r(t) per layer for both kinds; peak latency vs layer
with the biological-backpropagation expectation; headline statistics with CIs and p-values."""
import base64
import html
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KINDS = ("activations", "gradients")
COLORS = {"activations": "tab:blue", "gradients": "tab:red"}


def save(fig, out, name):
    path = os.path.join(out, "figures", name)
    fig.savefig(path + ".partial.png", dpi=110, bbox_inches="tight")
    os.replace(path + ".partial.png", path)
    plt.close(fig)
    return name


def fmri_figures(s, summ, out):
    g = s["/fmri"]
    layers = [str(x) for x in g.attrs["layers"]]
    level = g["groups/value"][()]
    names = None
    with h5py.File(g.attrs["scores"], "r") as sc:
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in sc["/groups/names"][()]]
    figs = []
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3.2), sharey=True, squeeze=False)
    for j, ax in enumerate(axes[0]):
        for k in KINDS:
            if f"{k}/group_r" in g:
                ax.plot(range(len(layers)), g[f"{k}/group_r"][:, j], "o-", color=COLORS[k], label=k, ms=3)
        ax.set_title(f"{names[j]} (level {level[j]:g})", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=6)
    axes[0][0].set_ylabel("mean test r over voxels")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("fMRI: encoding score by layer per ROI")
    figs.append(("Score by layer per ROI", save(fig, out, "fmri_roi_layer.png")))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.4
    for i, k in enumerate(KINDS):
        if f"{k}/peak_layer" not in g:
            continue
        pk = g[f"{k}/peak_layer"][()]
        pk = pk[pk >= 0]
        counts = np.bincount(pk, minlength=len(layers))
        ax.bar(np.arange(len(layers)) + (i - 0.5) * width, counts, width, color=COLORS[k],
               label=f"{k} ({len(pk)} significant voxels)")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, fontsize=7)
    ax.set_xlabel("peak layer (argmax of r)")
    ax.set_ylabel("voxels (q_BH < q)")
    ax.legend(fontsize=7)
    ax.set_title("fMRI: peak-layer distribution")
    figs.append(("Peak-layer distribution", save(fig, out, "fmri_peak_layers.png")))
    return figs


def meg_figures(s, summ, out):
    g = s["/meg"]
    layers = [str(x) for x in g.attrs["layers"]]
    times = g["groups/value"][()]
    figs = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, k in zip(axes, KINDS):
        if f"{k}/group_r" not in g:
            continue
        c = g[f"{k}/group_r"][()]
        for l in range(len(layers)):
            ax.plot(times, c[l], color=cmap(l / max(1, len(layers) - 1)), label=layers[l])
        ax.set_title(f"{k}")
        ax.set_xlabel("time (s)")
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("mean test r over sensors")
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("MEG: latency curves c_l(t) per layer")
    figs.append(("MEG r(t) per layer", save(fig, out, "meg_latency_curves.png")))

    fig, ax = plt.subplots(figsize=(5, 3.4))
    tau = {k: np.array(summ["meg"].get(f"peak_latency_{k}", []), dtype=float) for k in KINDS}
    for k in KINDS:
        if len(tau[k]):
            ax.plot(range(len(layers)), tau[k], "o-", color=COLORS[k], label=f"{k} (observed)")
    if len(tau["activations"]):
        a = tau["activations"]
        expect = a[-1] + (a[-1] - a)  # top-down, after the forward sweep, mirrored
        ax.plot(range(len(layers)), expect, "--", color=COLORS["gradients"], alpha=0.6,
                label="gradients if backprop were biological\n(top-down after the forward sweep)")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("peak latency (s)")
    ax.legend(fontsize=6)
    ax.set_title("MEG: peak latency by layer")
    figs.append(("Peak latency vs layer", save(fig, out, "meg_peak_latency.png")))
    return figs


VERDICT_COLORS = {"diverges": "tab:red", "consistent": "tab:green", "undetermined": "tab:grey"}
DIVERGENCE = (("fmri", "D_space", "Space (fMRI): are the gradients of layer l where the activations of layer l are?"),
              ("meg", "D_time", "Time (MEG): do the gradients arrive top-down, after the forward sweep?"))


def headline_figure(summ, out):
    """Left: the hierarchy statistics with their intervals. Right: the divergence verdicts."""
    rows = []
    for mod, rho in (("fmri", "rho_space"), ("meg", "rho_time")):
        for k in KINDS:
            if mod in summ and k in summ[mod].get(rho, {}):
                rows.append((f"{rho} ({k})", summ[mod][rho][k]))
    verdicts = [(mod, d, q, summ[mod][d]) for mod, d, q in DIVERGENCE if mod in summ and d in summ[mod]]
    if not rows and not verdicts:
        return []
    fig, (ax, vx) = plt.subplots(1, 2, figsize=(9, 0.45 * max(len(rows), 2 * len(verdicts)) + 1.5),
                                 gridspec_kw={"width_ratios": [1.2, 1]})
    for i, (name, st) in enumerate(rows):
        v, (lo, hi) = st["value"], st["ci"]
        if v is None:
            continue
        lo = -1 if lo is None else lo  # an infinite bound (undefined replicates) runs to the edge
        hi = 1 if hi is None else hi
        ax.hlines(i, lo, hi, color="k", lw=1)
        ax.plot([lo, hi], [i, i], "|", color="k", ms=8)
        ax.plot(v, i, "o", color="k")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_xlabel("Spearman rho with bootstrap CI")
    ax.set_xlim(-1.1, 1.1)
    ax.invert_yaxis()
    ax.set_title("Hierarchy", fontsize=10)
    vx.axis("off")
    vx.set_title("Biological backprop: verdicts", fontsize=10)
    for i, (mod, d, question, st) in enumerate(verdicts):
        y = 0.9 - i * 0.45
        vx.text(0.0, y, question, fontsize=7, va="top", wrap=True)
        vx.text(0.0, y - 0.12, st.get("verdict", "n/a").upper(), fontsize=14, weight="bold", va="top",
                color=VERDICT_COLORS.get(st.get("verdict"), "k"))
        vx.text(0.0, y - 0.27, f"p(diverges) = {fmt_p(st['p'], summ[mod])}, "
                f"p(consistent) = {fmt_p(st.get('p_consistent'), summ[mod])}", fontsize=7, va="top")
    return [("Hierarchy and divergence verdicts", save(fig, out, "headline.png"))]


def fmt_p(p, mod_summ):
    return "n/a" if p is None else f"{p:.3g}"


def sentence(mod, d, st):
    """One plain sentence saying what a divergence verdict means."""
    where = "in space (fMRI)" if mod == "fmri" else "in time (MEG)"
    if d.endswith("_unique"):
        where += ", on the gradients' unique variance beyond the activations"
    return f"{where}: <b>{html.escape(st.get('verdict', 'n/a'))}</b>: {html.escape(st.get('reason', ''))}."


def control_rows(label, summ):
    """One row per modality: the headline counts and verdicts of one analysis."""
    rows = []
    for mod, d in (("fmri", "D_space"), ("meg", "D_time")):
        m = summ.get(mod)
        if not m:
            continue
        sig = m.get("significant", {})
        best = lambda k: max(sig[k]["bh"]) if k in sig and sig[k]["bh"] else "n/a"  # noqa: E731
        u = m.get("unique_gradients", {})
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{mod}</td><td>{best('activations')}</td>"
                    f"<td>{best('gradients')}</td><td>{u.get('n_significant_bh', 'n/a')}</td>"
                    f"<td>{html.escape(m.get(d, {}).get('verdict', 'n/a'))}</td>"
                    f"<td>{html.escape(m.get(d + '_unique', {}).get('verdict', 'n/a'))}</td></tr>")
    return rows


def summaries_in(folder, skip=None):
    """[(name, summary.json)] of every <folder>/<name>/stats/summary.json (sorted by name)."""
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name, "stats", "summary.json")
        if name != skip and os.path.exists(path):
            found.append((name, json.load(open(path))))
    return found


def comparison_table(title, intro, first, others, summ):
    parts = [f"<h2>{title}</h2><p>{intro} Counts: targets significant (BH, q = {summ.get('q', 0.05):g}) in "
             "the best layer; unique: targets with significant unique gradient variance beyond the "
             "activations and the nuisance features (loss, gradient norms) in any layer.</p>",
             "<table><tr><th>analysis</th><th>modality</th><th>activations</th><th>raw gradients</th>"
             "<th>unique gradient variance</th><th>divergence (raw)</th><th>divergence (unique)</th></tr>"]
    parts += control_rows(first, summ)
    for name, cs in others:
        parts += control_rows(name, cs)
    parts.append("</table>")
    return parts


def controls_table(stats_dir, summ):
    """The controls `gradmap run` analysed beside this model (<dir>/controls/<control>/stats),
    side by side with it; and, for a run among several models x objectives (OUT/runs/<tag>/),
    the sensitivity table across all of them."""
    here = os.path.dirname(os.path.normpath(stats_dir))
    parts = []
    found = summaries_in(os.path.join(here, "controls"))
    if found:
        parts += comparison_table(
            "Controls", "The same analysis with the model's weights permuted within each tensor "
            "(random-weights) or with the labels of the cross-entropy objective shuffled across images "
            "(shuffled-labels). A learning-signal claim needs the model to differ from its controls.",
            "model", found, summ)
    runs = os.path.dirname(here)
    if os.path.basename(runs) == "runs":
        others = summaries_in(runs, skip=os.path.basename(here))
        if others:
            parts += comparison_table(
                "Sensitivity across models and objectives", "This analysis (first row) and the other "
                "model x objective runs of the same `gradmap run` (OUT/runs/&lt;model&gt;__&lt;objective&gt;): "
                "a conclusion that holds for one objective only is a statement about that objective.",
                os.path.basename(here) + " (this report)", others, summ)
    return parts


def main(stats_dir, out):
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    summ = json.load(open(os.path.join(stats_dir, "summary.json")))
    figs = []
    with h5py.File(os.path.join(stats_dir, "stats.h5"), "r") as s:
        figs += headline_figure(summ, out)
        if "fmri" in s:
            figs += fmri_figures(s, summ, out)
        if "meg" in s:
            figs += meg_figures(s, summ, out)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>gradmap report</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:0 8px}"
             "img{max-width:100%;height:auto}"  # figures scale to the page, never overflow it
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
             "</head><body><h1>gradmap report</h1>",
             f"<p>Statistics: <code>{html.escape(os.path.basename(os.path.normpath(stats_dir)))}</code></p>",
             "<h2>Does the brain look like it runs backpropagation?</h2><ul>"]
    for mod, d, _ in DIVERGENCE:
        for dd in (d, d + "_unique"):
            if mod in summ and dd in summ[mod]:
                parts.append(f"<li>{sentence(mod, dd, summ[mod][dd])}</li>")
    for mod in ("fmri", "meg"):
        u = summ.get(mod, {}).get("unique_gradients")
        if u:
            parts.append(f"<li>{mod}: {u['n_significant_bh']} of {u['targets']} targets have significant unique "
                         f"gradient variance beyond the activations in some layer (BH across layers; per layer "
                         f"{', '.join(map(str, u['n_significant_bh_per_layer']))}). Raw gradient scores partly "
                         "re-encode the activations; only this count speaks for a learning signal "
                         "(docs/statistics.md, \"Unique variance\").</li>")
    vox = summ.get("fmri", {}).get("D_space_voxels")
    if vox:
        a = vox["all"]
        parts.append(f"<li>voxel by voxel (fMRI, the {a['tested']} voxels with signal in both kinds, BH at "
                     f"q = {vox['q']:g}): {a['diverges']} diverge, {a['consistent']} are consistent, "
                     f"{a['undetermined']} undetermined (map: maps/D_space_voxel_verdict.nii).</li>")
    parts.append("</ul><h2>Headline numbers</h2><table><tr><th>statistic</th><th>value</th><th>CI</th>"
                 "<th>p</th><th>verdict</th></tr>")
    for mod, rho, d in (("fmri", "rho_space", "D_space"), ("meg", "rho_time", "D_time")):
        if mod not in summ:
            continue
        items = [(f"{mod} {rho} ({k})", summ[mod][rho][k]) for k in (*KINDS, "unique_gradients")
                 if k in summ[mod].get(rho, {})]
        for dd in (d, d + "_unique"):
            if dd in summ[mod]:
                items.append((f"{mod} {dd}", summ[mod][dd]))
        B = summ[mod].get("permutations")
        for name, st in items:
            fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
            p = fmt(st["p"])
            if rho in name and B and st["p"] is not None and st["p"] <= 1 / (B + 1) * (1 + 1e-9):
                p = f"&lt; 1/(B+1), B = {B}"  # the permutation floor, not a measured 0.000999
            parts.append(f"<tr><td>{name}</td><td>{fmt(st['value'])}</td>"
                         f"<td>[{fmt(st['ci'][0])}, {fmt(st['ci'][1])}]</td><td>{p}</td>"
                         f"<td>{html.escape(st.get('verdict', ''))}</td></tr>")
    parts.append("</table>")
    parts += controls_table(stats_dir, summ)
    for title, name in figs:
        data = base64.b64encode(open(os.path.join(out, "figures", name), "rb").read()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Files</h2><ul>")
    for sub in ("tables", "maps", "figures"):
        d = os.path.join(out, sub)
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            parts.append(f"<li><a href='{sub}/{f}'>{sub}/{f}</a></li>")
    parts.append("</ul><p>Definitions: docs/statistics.md.</p></body></html>")
    tmp = os.path.join(out, "index.html.partial")
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, os.path.join(out, "index.html"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
