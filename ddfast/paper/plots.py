"""Figures of the reproduction (matplotlib, Agg backend, PNG files).

* :func:`convergence`: test accuracy and rho_2 per epoch for each method (paper Fig. 2).
* :func:`example_grid`: test images, their DeepFool adversarial examples for each model, the
  class they are pushed to and ``||D||/||x||`` (paper Fig. 3), perturbations on a second row.
* :func:`histograms`: per-sample ``||D||_2/||x||_2`` of each model.
* :func:`c_sweep`: accuracy against rho_2 for DeepDefense runs with different ``c`` (Fig. 4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from .extras import import_extra

__all__ = ["convergence", "example_grid", "histograms", "c_sweep"]


#: one colour per method in every figure
COLORS = {"reference": "tab:gray", "clean": "tab:blue", "deepdefense": "tab:orange", "adversarial": "tab:green",
          "parseval": "tab:red", "pgd_at": "tab:purple", "trades": "tab:brown", "deepdefense_scratch": "tab:olive"}


def _plt():
    matplotlib = import_extra("matplotlib", "the plots")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, grid_axes=()) -> Path:
    """Grid and legend on ``grid_axes``, then write ``fig`` to ``path`` (PNG) and close it."""
    for ax in grid_axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def convergence(logs: Mapping[str, List[dict]], path: Path, title: str = "") -> Path:
    """Two panels: test accuracy (%) and rho_2 against epoch, one line per method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        ep = [e["epoch"] for e in log]
        axes[0].plot(ep, [100 * e["test_acc"] for e in log], marker="o", label=name, color=COLORS.get(name))
        axes[1].plot(ep, [e["rho2"] for e in log], marker="o", label=name, color=COLORS.get(name))
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{title} accuracy".strip())
    axes[1].set(xlabel="epoch", ylabel=r"$\rho_2$ (test subset)", title=rf"{title} $\rho_2$".strip())
    return _save(plt, fig, path, axes)


def example_grid(images: np.ndarray, adv: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[int]],
                 ratios: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Fig. 3: for each test image (rows, uint8 ``[N, H, W]``), the clean image and per model
    (``adv[name]`` uint8 ``[N, H, W]``) the adversarial example titled ``-> class, ratio``;
    under each image row, the perturbation ``adv - image`` (white = 0, one colour scale per row)."""
    plt = _plt()
    names = list(adv)
    n = images.shape[0]
    fig, axes = plt.subplots(2 * n, 1 + len(names), figsize=(1.9 * (1 + len(names)), 2.0 * 2 * n), squeeze=False)
    for i in range(n):
        vmax = max(float(np.abs(adv[k][i].astype(np.float32) - images[i]).max()) for k in names) or 1.0
        axes[2 * i, 0].imshow(images[i], cmap="gray", vmin=0, vmax=255)
        axes[2 * i, 0].set_title("clean", fontsize=9)
        axes[2 * i + 1, 0].set_axis_off()
        for j, name in enumerate(names, 1):
            axes[2 * i, j].imshow(adv[name][i], cmap="gray", vmin=0, vmax=255)
            axes[2 * i, j].set_title(f"{name}\n-> {labels[name][i]}, {ratios[name][i]:.3f}", fontsize=8)
            diff = adv[name][i].astype(np.float32) - images[i].astype(np.float32)
            axes[2 * i + 1, j].imshow(diff, cmap="seismic", vmin=-vmax, vmax=vmax)
        for ax in axes[2 * i].tolist() + axes[2 * i + 1].tolist():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(r"DeepFool adversarial examples (title: new class, $\|D\|/\|x\|$); row below: perturbation",
                 fontsize=9)
    return _save(plt, fig, path)


def histograms(ratios: Mapping[str, np.ndarray], path: Path) -> Path:
    """Overlaid histograms of per-sample ``||D||_2/||x||_2`` with each model's mean marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    hi = max(float(np.quantile(r, 0.995)) for r in ratios.values())
    bins = np.linspace(0, hi, 60)
    for name, r in ratios.items():
        line = ax.hist(r, bins=bins, histtype="step", lw=1.5, label=f"{name} (mean {np.mean(r):.3f})",
                       color=COLORS.get(name))
        ax.axvline(np.mean(r), color=line[2][0].get_edgecolor(), ls="--", lw=1)
    ax.set(xlabel=r"$\|D\|_2 / \|x\|_2$ (DeepFool, test set)", ylabel="images")
    ax.legend()
    return _save(plt, fig, path)


def c_sweep(points: Sequence[Dict], path: Path, reference: Optional[Dict] = None) -> Path:
    """Fig. 4: test accuracy (%) against rho_2 of DeepDefense runs, each point labelled by ``c``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted(points, key=lambda p: p["c"])
    ax.plot([p["rho2"] for p in pts], [100 * p["acc"] for p in pts], marker="o", label="DeepDefense")
    for p in pts:
        ax.annotate(f"c={p['c']:g}", (p["rho2"], 100 * p["acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if reference is not None:
        ax.scatter([reference["rho2"]], [100 * reference["acc"]], marker="*", s=120, color="k", label="reference")
    ax.set(xlabel=r"$\rho_2$", ylabel="test accuracy (%)")
    return _save(plt, fig, path, [ax])


def robust_accuracy(rows: Sequence[Dict], path: Path, title: str = "") -> Path:
    """Two panels, L2 and Linf: robust accuracy (%, adv-lib's attacks) against eps ([0, 1] pixels),
    one line per row that has ``robust_acc``; eps 0 is the clean accuracy of the evaluated images."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, norm, label in zip(axes, ("l2", "linf"), ("L2", r"L$\infty$")):
        for r in rows:
            acc = r.get("robust_acc")
            if not acc:
                continue
            eps = [0.0] + [float(k) for k in acc[norm]]
            vals = [100 * r["evaluator"]["clean_acc"]] + [100 * v for v in acc[norm].values()]
            ax.plot(eps, vals, marker="o", label=r["method"], color=COLORS.get(r["method"]))
        ax.set(xlabel=f"{label} eps ([0, 1] pixels)", ylabel="robust accuracy (%)",
               title=f"{title} {label} (adv-lib)".strip())
    return _save(plt, fig, path, axes)
