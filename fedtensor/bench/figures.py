"""Benchmark figures (matplotlib, Agg, PNG): RD curves, storage-size bars, side-by-side panels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fedtensor.bench.harness import LOSSLESS, num, panel_path

DPI = 90
CT_WINDOW = (40.0, 400.0)  # soft-tissue window: level, width (HU)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
            "#393b79", "#637939", "#843c39")
_LOSSLESS_LIKE = {"fedtensor-lossless": "fedtensor", "jpeg2000-lossless": "jpeg2000"}


def codec_style(codec: str, order: Sequence[str]) -> dict:
    """Colour and marker of a codec: fedtensor bold red, the others from a palette without red."""
    codec = _LOSSLESS_LIKE.get(codec, codec)
    if codec == "fedtensor":
        return {"color": "#d62728", "lw": 2.6, "marker": "o", "zorder": 5}
    if codec == "zstd":
        return {"color": "#303030", "lw": 1.4, "marker": "x", "zorder": 3}
    others = [c for c in order if c != "fedtensor"]
    i = others.index(codec) if codec in others else len(others)
    return {"color": _PALETTE[i % len(_PALETTE)], "lw": 1.4, "marker": "sD^v<>phX*P8"[i % 12], "zorder": 3}


def _log_axis(ax, axis: str = "x") -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    a.set_major_formatter(FormatStrFormatter("%g"))
    a.set_minor_formatter(FormatStrFormatter(""))


def _save(fig, path: Path, max_bytes: int = 190_000) -> str:
    """Atomic PNG write (temp + rename); a PNG above ``max_bytes`` is re-encoded with a 256-colour palette."""
    import io

    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if len(data) > max_bytes:
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        pal = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        out = io.BytesIO()
        pal.save(out, format="PNG", optimize=True)
        data = out.getvalue()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return str(path)


def rd_figure(out: Path, rows, spec, codecs) -> str | None:
    from fedtensor.bench.report import curve, ordered_codecs
    from fedtensor.baselines import BASELINES

    plt = _plt()
    order = [c for c in ordered_codecs(codecs) if not BASELINES[c].lossless]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    drawn = 0
    for c in order:
        pts = curve(rows, spec.label, c)
        if not pts:
            continue
        st = codec_style(c, order)
        x = [num(p["bpv"]) for p in pts]
        kw = dict(color=st["color"], lw=st["lw"], marker=st["marker"], ms=5, zorder=st["zorder"],
                  label=BASELINES[c].label)
        ax1.plot(x, [num(p["psnr"]) for p in pts], **kw)
        ax2.plot(x, [num(p.get("ssim")) for p in pts], **kw)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for ax, yl in ((ax1, "PSNR (dB)"), (ax2, "3D SSIM")):
        ax.set_xscale("log")
        _log_axis(ax, "x")
        ax.set_xlabel("bits per voxel (log)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_title(f"{spec.label}: PSNR vs rate")
    ax2.set_title(f"{spec.label}: SSIM vs rate")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, out / f"rd_{spec.label}.png")


def storage_figure(out: Path, rows, specs, codecs, target: float) -> str | None:
    """The paper's storage chart: compressed size of every method at equal quality, per volume."""
    from fedtensor.bench.report import ordered_codecs
    from fedtensor.baselines import BASELINES

    plt = _plt()
    order = ordered_codecs(codecs)
    lossy = [c for c in order if not BASELINES[c].lossless]
    n, m = len(specs), len(order)
    fig, ax = plt.subplots(figsize=(max(8, 1.9 * n + 3), 5.2))
    width = 0.84 / m
    any_bar = False
    for j, c in enumerate(order):
        xs, ys = [], []
        for i, s in enumerate(specs):
            cell = next((r for r in rows if r["volume"] == s.label and r["codec"] == c and r.get("status") == "ok"
                         and (r["target"] == LOSSLESS or float(r["target"]) == float(target))), None)
            if cell is not None:
                xs.append(i - 0.42 + (j + 0.5) * width)
                ys.append(num(cell["bytes"]) / 2**20)
        if not xs:
            continue
        any_bar = True
        lossless = BASELINES[c].lossless
        st = codec_style(c, lossy)
        ax.bar(xs, ys, width * 0.95, color=st["color"], hatch="///" if lossless else None,
               alpha=0.55 if lossless else 1.0, edgecolor="black" if c == "fedtensor" else "white", linewidth=0.8,
               label=BASELINES[c].label + ("" if lossless else f" @ {target:g} dB"))
    if not any_bar:
        plt.close(fig)
        return None
    for i, s in enumerate(specs):  # the original size, for scale
        ax.hlines(s.nbytes / 2**20, i - 0.45, i + 0.45, colors="black", linestyles=":", lw=1)
    ax.set_yscale("log")
    _log_axis(ax, "y")
    ax.set_xticks(range(n), [f"{s.label}\n({s.nbytes / 2**20:.1f} MiB raw)" for s in specs], fontsize=8)
    ax.set_ylabel("compressed size (MiB, log)")
    ax.set_title(f"Storage size at equal quality: PSNR ≥ {target:g} dB (hatched: lossless; dotted: raw)",
                 fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    return _save(fig, out / f"storage_{target:g}dB.png")


def display_window(original: np.ndarray, modality: str) -> tuple[float, float]:
    """CT in Hounsfield units: soft-tissue window (L 40, W 400); otherwise 0.5–99.5 % of the nonzero voxels."""
    if modality == "CT" and float(original.min()) <= -500:
        level, width = CT_WINDOW
        return level - width / 2, level + width / 2
    v = original[original != 0] if np.any(original != 0) else original.reshape(-1)
    lo, hi = np.percentile(v.astype(np.float64), [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def panel_figure(out: Path, spec) -> str | None:
    path = panel_path(out, spec)
    if not path.exists():
        return None
    plt = _plt()
    z = np.load(path)
    def view(a: np.ndarray) -> np.ndarray:  # array axes (i, j) -> image (rows = j, anterior up)
        img = a.astype(np.float64).T
        if "flip_ud" in z and bool(z["flip_ud"]):
            img = img[::-1]
        if "flip_lr" in z and bool(z["flip_lr"]):
            img = img[:, ::-1]
        return img

    orig, j2k, ft = view(z["original"]), view(z["jpeg2000"]), view(z["fedtensor"])
    spacing = z["spacing"]
    modality = str(z["modality"])
    lo, hi = display_window(orig, modality)
    dj, df = np.abs(orig - j2k), np.abs(orig - ft)
    dmax = float(np.percentile(np.concatenate([dj.ravel(), df.ravel()]), 99.5)) or 1.0
    aspect = float(spacing[1] / spacing[0])  # image rows run along the second array axis
    vox = int(z["voxels"])

    def bpv(nbytes) -> float:
        return 8.0 * float(nbytes) / vox

    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.8))
    show = dict(cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
    axes[0, 0].imshow(orig, **show)
    axes[0, 0].set_title(f"original (slice {int(z['slice'])})\nwindow {lo:.4g}…{hi:.4g}", fontsize=9)
    axes[0, 1].imshow(j2k, **show)
    axes[0, 1].set_title(f"JPEG2000 — {bpv(z['jpeg2000_bytes']):.3f} bpv\nPSNR {float(z['jpeg2000_psnr']):.2f} dB, "
                         f"SSIM {float(z['jpeg2000_ssim']):.4f}", fontsize=9)
    axes[0, 2].imshow(ft, **show)
    axes[0, 2].set_title(f"fedtensor — {bpv(z['fedtensor_bytes']):.3f} bpv\nPSNR {float(z['fedtensor_psnr']):.2f} dB, "
                         f"SSIM {float(z['fedtensor_ssim']):.4f}", fontsize=9)
    dshow = dict(cmap="magma", vmin=0, vmax=dmax, origin="lower", aspect=aspect, interpolation="nearest")
    axes[1, 1].imshow(dj, **dshow)
    axes[1, 1].set_title("|original − JPEG2000|", fontsize=9)
    im = axes[1, 2].imshow(df, **dshow)
    axes[1, 2].set_title("|original − fedtensor|", fontsize=9)
    fig.colorbar(im, ax=axes[1, 1:].tolist(), shrink=0.85, label="absolute error (original units)")
    axes[1, 0].axis("off")
    axes[1, 0].text(0.02, 0.5, f"{spec.label}\n\nsame file size:\nJPEG2000 ≤ fedtensor\n"
                    f"(fedtensor at PSNR ≥ {float(z['target']):g} dB)\n\nerror maps share one scale\n"
                    f"(0 … {dmax:.3g}, 99.5th pct.)", fontsize=9, va="center")
    for ax in axes.ravel()[[0, 1, 2, 4, 5]]:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, out / f"panel_{spec.label}.png")


def write_figures(out: Path, rows, specs, codecs, targets) -> list[str]:
    out = Path(out)
    written = []
    for s in specs:
        p = rd_figure(out, rows, s, codecs)
        if p:
            written.append(p)
    mid = sorted(targets)[len(targets) // 2]
    p = storage_figure(out, rows, specs, codecs, mid)
    if p:
        written.append(p)
    for s in specs:
        p = panel_figure(out, s)
        if p:
            written.append(p)
    return written
