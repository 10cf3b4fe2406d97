"""SuperDeepFool: ddfast's against adv-lib's sdf, df, ddn and alma, side by side in one run:
median L2 of the adversarials against time per image.

    python bench/superdeepfool.py [--n 200] [--n-slow 200] [--models mlp,lenet,convnet] [--json FILE]
                                  [--repeat 3] [--candidates all,5,3]

* Models (bench/common.py, trained here and cached): MNIST MLP, MNIST LeNet and the CIFAR
  ConvNet trained on MNIST in 3x32x32; all take [0, 1] images. Inputs: the first N correctly
  classified MNIST test images (the label is the class to leave); every attack keeps its
  iterates in [0, 1] (ddfast: ``bounds=(0, 1)``).
* Rows: ddfast ``deepfool`` and ``superdeepfool`` (defaults), adv-lib 0.2.8 ``df``, ``sdf``
  (its defaults: 100 steps, 100 DeepFool steps, a 10-step line search), ``ddn`` and ``alma``
  at 1000 steps (the L2 references, adv-lib's other defaults; on the first ``--n-slow`` images
  only, for their time: MLP 100, LeNet 100, ConvNet 50).
* ``median_l2``: median over the images of ||x_adv - x||_2 ([0, 1] pixel units), an image the
  attack did not fool (re-evaluated here: argmax f(x_adv) != label) counting as infinite;
  ``ratio_to_best``: that median over the smaller of ALMA's and DDN's medians on the same
  images (the rows of fast attacks are also measured on the slow prefix for this);
  ``s_per_image``: wall-clock seconds per image, batch by batch (every row runs on batch b,
  best of ``--repeat``, before any runs on batch b+1; ALMA and DDN run once).

Writes FILE (JSON) and FILE-stem.png (median L2 against seconds per image).
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ddfast  # noqa: E402
from ddfast.robustness import adv_lib_module  # noqa: E402

N_DEFAULT = {"mlp": 200, "lenet": 200, "convnet": 100}
N_SLOW = {"mlp": 100, "lenet": 100, "convnet": 50}    # ALMA and DDN at 1000 steps: minutes per 100 images
SLOW = ("adv_lib.ddn-1000", "adv_lib.alma-1000")


def _adv_lib() -> types.SimpleNamespace:
    """adv-lib's df, sdf, ddn and alma (:func:`ddfast.robustness.adv_lib_module`). DDN and ALMA
    import visdom (optional plots) and ALMA torchvision (its LPIPS distance), neither used here:
    where missing, empty stand-ins take their place, for this script only."""
    for name in ("torchvision", "visdom"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            if name == "torchvision":
                stub.models = types.ModuleType("torchvision.models")  # type: ignore[attr-defined]
                sys.modules["torchvision.models"] = stub.models  # type: ignore[attr-defined]
            else:
                stub.Visdom = object  # type: ignore[attr-defined]
            sys.modules[name] = stub
    m = adv_lib_module
    return types.SimpleNamespace(df=m("deepfool").df, sdf=m("superdeepfool").sdf,
                                 ddn=m("decoupled_direction_norm").ddn, alma=m("augmented_lagrangian").alma)


def _sdf_x_adv(model, x: Tensor, y: Tensor, candidates) -> Tensor:
    return ddfast.superdeepfool(model, x, y, bounds=(0.0, 1.0), candidates=candidates).x_adv


def attacks(model, candidates=()) -> Dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """name -> f(x, y) -> x_adv, every one in [0, 1]; ``candidates``: extra superdeepfool rows
    with these ``candidates`` (None: all classes)."""
    al = _adv_lib()
    box = (0.0, 1.0)
    extra = {f"ddfast.superdeepfool[candidates={k}]": functools.partial(_sdf_x_adv, model, candidates=k)
             for k in candidates}
    return {**extra,
        "ddfast.deepfool": lambda x, y: ddfast.deepfool(model, x, y, bounds=box).x_adv,
        "ddfast.superdeepfool": lambda x, y: ddfast.superdeepfool(model, x, y, bounds=box).x_adv,
        "adv_lib.df": lambda x, y: al.df(model, x, y),
        "adv_lib.sdf": lambda x, y: al.sdf(model, x, y),
        "adv_lib.ddn-1000": lambda x, y: al.ddn(model, x, y, steps=1000),
        "adv_lib.alma-1000": lambda x, y: al.alma(model, x, y, distance="l2", num_steps=1000),
    }


def correct_images(model, name: str, n: int):
    """The first n correctly classified test images of ``name``'s shape and their labels."""
    x, y = common.mnist_test(model=name)
    with torch.no_grad():
        ok = common.predict(model, x) == y
    return x[ok][:n].contiguous(), y[ok][:n].contiguous()


@torch.no_grad()
def norms_if_fooled(model, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
    """[n] ||x_adv - x||_2, inf where argmax f(x_adv) == y (or x_adv leaves [0, 1])."""
    fooled = common.predict(model, x_adv) != y
    inside = (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    d = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(fooled & inside, d, torch.full_like(d, math.inf))


def run_model(name: str, n: int, n_slow: int, batch: int, repeat: int, log, candidates=(),
              device: str = "cpu") -> Dict[str, Dict]:
    """Every attack on ``name``'s first n images (the slow ones on the first n_slow), on ``device``."""
    model = common.trained_model(name, log=log).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = (t.to(device) for t in correct_images(model.cpu(), name, n))
    model.to(device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fns = attacks(model, candidates)
    for a in [a for a in fns if a not in SLOW]:   # warm-up: lazy imports, native loads, the allocator
        fns[a](x[:2], y[:2])
    seconds = {a: 0.0 for a in fns}
    norms: Dict[str, List[Tensor]] = {a: [] for a in fns}
    for b in range(0, x.shape[0], batch):
        for a, fn in fns.items():
            if a in SLOW:                      # only the first n_slow images
                if b >= n_slow:
                    continue
                xb, yb = x[b:min(b + batch, n_slow)], y[b:min(b + batch, n_slow)]
            else:
                xb, yb = x[b:b + batch], y[b:b + batch]
            best = math.inf
            for _ in range(1 if a in SLOW else repeat):
                sync()
                t0 = time.perf_counter()
                x_adv = fn(xb, yb)
                sync()
                best = min(best, time.perf_counter() - t0)
            seconds[a] += best
            norms[a].append(norms_if_fooled(model, xb, x_adv.detach(), yb))
        log(f"  {name}: images {b}..{min(b + batch, x.shape[0]) - 1} done")
    return summarize(norms, seconds, n_slow)


def summarize(norms: Dict[str, List[Tensor]], seconds: Dict[str, float], n_slow: int) -> Dict[str, Dict]:
    """Per attack: images, median L2 (all and on the slow prefix), fooled, s/image, ratios."""
    rows = {}
    for a, parts in norms.items():
        d = torch.cat(parts)
        rows[a] = {"n_images": d.numel(), "median_l2": d.median().item(),
                   "median_l2_slow_prefix": d[:n_slow].median().item(),
                   "fooled": torch.isfinite(d).double().mean().item(), "s_per_image": seconds[a] / d.numel()}
    best = min(rows[a]["median_l2_slow_prefix"] for a in SLOW)
    for r in rows.values():
        r["ratio_to_best"] = r["median_l2_slow_prefix"] / best
        r["time_vs_ddfast_deepfool"] = r["s_per_image"] / rows["ddfast.deepfool"]["s_per_image"]
    return rows


def _defaults() -> Dict[str, object]:
    import inspect

    sdf = sys.modules["ddfast.superdeepfool"]
    params = inspect.signature(ddfast.superdeepfool).parameters
    out: Dict[str, object] = {k: params[k].default for k in ("max_iter", "df_steps", "overshoot", "candidates")}
    out["restart_candidates"] = sdf.RESTART_CANDIDATES
    return out


def plot(results: Dict[str, Dict[str, Dict]], sizes: Dict[str, Dict[str, int]], path: Path,
         device: str = "cpu") -> None:
    """Median L2 (on the ALMA / DDN images) against seconds per image, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        for a, r in rows.items():
            mine = a.startswith("ddfast.")
            ax.scatter(r["s_per_image"], r["median_l2_slow_prefix"], s=50, marker="o" if mine else "s",
                       color="tab:red" if mine else "tab:gray")
            ax.annotate(a.replace("adv_lib.", "adv-lib "), (r["s_per_image"], r["median_l2_slow_prefix"]),
                        fontsize=8, xytext=(4, -11 if mine else 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"seconds per image ({device}, wall clock, log)")
        ax.set_ylabel("median L2 ([0, 1] pixels)")
        ax.set_title(f"{name}: {sizes[name]['n_slow']} images")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,lenet,convnet")
    ap.add_argument("--n", type=int, default=None, help="images per model (default: mlp 200, lenet 200, convnet 100)")
    ap.add_argument("--n-slow", type=int, default=None,
                    help="images for ALMA and DDN (default: mlp 100, lenet 100, convnet 50)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per fast row and batch, best of")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--candidates", default="",
                    help="extra superdeepfool rows with these candidates, e.g. 'all,5,3' (default: none)")
    ap.add_argument("--json", default=str(common.RESULTS / "superdeepfool.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: Dict[str, Dict[str, Dict]] = {}
    sizes: Dict[str, Dict[str, int]] = {}
    path = Path(args.json)
    command = "python bench/superdeepfool.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.models.split(","):
        n = args.n or N_DEFAULT[name]
        n_slow = min(n, args.n_slow or N_SLOW[name])
        sizes[name] = {"n": n, "n_slow": n_slow}
        print(f"{name}: {n} images ({n_slow} for ALMA and DDN)", flush=True)
        extra = [None if k == "all" else int(k) for k in args.candidates.split(",") if k]
        results[name] = run_model(name, n, n_slow, args.batch_size, args.repeat, lambda s: print(s, flush=True), extra,
                                  args.device)
        for a, r in results[name].items():
            print(f"  {a:38s} median L2 {r['median_l2_slow_prefix']:.4f} ({r['ratio_to_best']:.3f} of best) "
                  f"fooled {r['fooled']:.3f}  {1e3 * r['s_per_image']:.2f} ms/image "
                  f"({r['time_vs_ddfast_deepfool']:.2f}x ddfast.deepfool)", flush=True)
        common.write_json(path, {"benchmark": "superdeepfool", "command": command,   # after every model
                                 "backend": ddfast.available_backends("cpu")[0], "adv_lib": common._version("adv-lib"),
                                 "sizes": sizes, "batch_size": args.batch_size, "repeat": args.repeat,
                                 "attack_device": args.device,
                                 "superdeepfool_defaults": _defaults(), "results": results})
    plot(results, sizes, path.with_suffix(".png"), args.device.upper())
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
