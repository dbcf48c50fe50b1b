#!/usr/bin/python3
"""THINGS-MEG epochs (MNE .fif, split files followed automatically) -> the MEG part of gradmap's
brain_meg.h5, streamed in blocks of epochs so memory stays at one block.

Called by `gradmap import-things-meg` (rank 0), which then validates what this wrote, maps the
trials to the images it decodes, and renames the file into place. Writes to OUT (a .partial
name chosen by the caller):
  /brain/responses   float32 [trials, sensors, times]  (catch trials dropped)
  /brain/times       float64 [times] (s)
  /brain/sensor_names             the picked MEG channels (bad channels excluded)
  /things/image_path, /things/trial_type   strings per kept trial
  /things/session_nr, /things/things_category_nr, /things/things_image_nr  int64 (-1 if absent)
  attrs on /brain: sfreq, source, epochs_file, n_catch_dropped
Exit status 3 with a one-line message on stderr for bad input (no metadata, missing columns).
"""
import argparse
import sys

import numpy as np


def fail(msg):
    print("things_meg_convert: " + msg, file=sys.stderr)
    sys.exit(3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block", type=int, default=256, help="epochs read per block")
    a = ap.parse_args()
    import h5py
    import mne

    try:
        ep = mne.read_epochs(a.epochs, preload=False, verbose="error")
    except FileNotFoundError as e:
        fail(f"{a.epochs}: missing ({e})")
    except Exception as e:  # noqa: BLE001 - MNE raises many kinds for a corrupt file
        fail(f"{a.epochs}: not readable as MNE epochs ({type(e).__name__}: {e})")
    md = ep.metadata
    if md is None:
        fail(f"{a.epochs}: the epochs carry no metadata (THINGS-MEG's trial_type, image_path, ... "
             "are needed to map trials to images)")
    for col in ("trial_type", "image_path"):
        if col not in md.columns:
            fail(f"{a.epochs}: metadata has no '{col}' column (columns: {', '.join(map(str, md.columns))})")
    picks = mne.pick_types(ep.info, meg=True, ref_meg=False, exclude="bads")
    if len(picks) == 0:
        fail(f"{a.epochs}: no MEG channels")
    ttype = md["trial_type"].astype(str).to_numpy()
    keep = np.flatnonzero(ttype != "catch")
    if len(keep) == 0:
        fail(f"{a.epochs}: no exp/test trials")
    n, c, t = len(keep), len(picks), len(ep.times)
    str_dt = h5py.string_dtype()
    with h5py.File(a.out, "w") as f:
        b = f.create_group("brain")
        b.attrs["sfreq"] = float(ep.info["sfreq"])
        b.attrs["source"] = "THINGS-MEG (MNE epochs)"
        b.attrs["epochs_file"] = a.epochs
        b.attrs["n_catch_dropped"] = int(len(ttype) - n)
        resp = b.create_dataset("responses", (n, c, t), dtype="f4")
        b.create_dataset("times", data=np.asarray(ep.times, dtype="f8"))
        b.create_dataset("sensor_names", data=[ep.ch_names[i] for i in picks], dtype=str_dt)
        g = f.create_group("things")
        g.create_dataset("image_path", data=md["image_path"].astype(str).to_numpy()[keep], dtype=str_dt)
        g.create_dataset("trial_type", data=ttype[keep], dtype=str_dt)
        for col in ("session_nr", "things_category_nr", "things_image_nr"):
            v = md[col].to_numpy() if col in md.columns else np.full(len(md), -1)
            g.create_dataset(col, data=np.asarray(v, dtype="i8")[keep])
        for i0 in range(0, n, a.block):
            idx = keep[i0:i0 + a.block]
            x = ep[idx].get_data(picks=picks)
            if not np.all(np.isfinite(x)):
                bad = idx[np.flatnonzero(~np.isfinite(x).all(axis=(1, 2)))[0]]
                fail(f"{a.epochs}: epoch {bad} holds NaN or Inf")
            resp[i0:i0 + len(idx)] = x.astype(np.float32)
            print(f"things_meg_convert: {min(i0 + a.block, n)}/{n} epochs", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
