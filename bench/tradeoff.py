"""Clean accuracy against robustness, one line per training method, from a ``ddfast reproduce``
output: its results.json rows plus every ``sweep/<name>/eval.json`` (``ddfast eval --robust``).

    python bench/tradeoff.py bench/results/reproduce-fashion-mlp   # -> .../tradeoff.png

Panels: robust accuracy (%) at L2 eps 0.5 and 2.0 and the median minimal L2 norm (adv-lib's
attacks, [0, 1] pixels) against clean accuracy (%) on all test images. A sweep folder's method
is read from its name (``pgd_at_eps0.5``, ``trades_eps1.0``, ``deepdefense_c5``, ``c10``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

PANELS = (("L2 robust acc % at eps 0.5", lambda r: 100 * r["robust_acc"]["l2"]["0.5"]),
          ("L2 robust acc % at eps 2.0", lambda r: 100 * r["robust_acc"]["l2"]["2.0"]),
          ("median minimal L2 norm", lambda r: r["min_norm_l2_median"]))


def _setting(method: str, settings: Dict) -> str:
    """The row's c or eps as a point label."""
    if method == "deepdefense":
        return f"c {settings.get('deepdefense_c', '?'):g}"
    if method in ("pgd_at", "trades"):
        return f"eps {settings.get('finetune', {}).get('pgd_eps', '?'):g}"
    return ""


def points(run: Path) -> Dict[str, List[Tuple[str, Dict]]]:
    """method -> [(label, row)] for every row with robust_acc, sweep rows included."""
    res = json.loads((run / "results.json").read_text())
    out: Dict[str, List[Tuple[str, Dict]]] = {}
    for r in res["rows"]:
        if r.get("robust_acc"):
            out.setdefault(r["method"], []).append((_setting(r["method"], res["settings"]), r))
    for f in sorted((run / "sweep").glob("*/eval.json")):
        m = re.fullmatch(r"(?:(pgd_at|trades)_eps|(deepdefense)_c|(c))([0-9.]+)", f.parent.name)
        if m is None:
            raise ValueError(f"{f.parent}: cannot tell the method from the folder's name")
        method = m.group(1) or "deepdefense"
        label = f"eps {m.group(4)}" if m.group(1) else f"c {m.group(4)}"
        out.setdefault(method, []).append((label, json.loads(f.read_text())))
    return out


def plot(pts: Dict[str, List[Tuple[str, Dict]]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (ylabel, value) in zip(axes, PANELS):
        for method, rows in pts.items():
            rows = sorted(rows, key=lambda lr: lr[1]["acc"])
            xs = [100 * r["acc"] for _, r in rows]
            ys = [value(r) for _, r in rows]
            line, = ax.plot(xs, ys, marker="o", label=method)
            for (label, _), x, y in zip(rows, xs, ys):
                if label:
                    ax.annotate(label, (x, y), fontsize=6, color=line.get_color(), xytext=(3, 3),
                                textcoords="offset points")
        ax.set(xlabel="clean accuracy % (all test images)", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: clean accuracy against robustness (adv-lib, first 1000 test images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a `ddfast reproduce` output folder (results.json, sweep/)")
    ap.add_argument("--png", type=Path, help="default: RUN/tradeoff.png")
    a = ap.parse_args()
    png = a.png or a.run / "tradeoff.png"
    plot(points(a.run), png, a.run.name)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
