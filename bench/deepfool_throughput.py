"""DeepFool throughput: ddfast against foolbox, torchattacks, ART, deeprobust and a naive batched
torch DeepFool, side by side in one run, same models, same inputs, same device.

    python bench/deepfool_throughput.py [--quick] [--json FILE] [--device cpu|cuda]

* Models (bench/common.py, trained here and cached): MNIST MLP 784-500-150-10, MNIST LeNet,
  and the paper's CIFAR-10 ConvNet trained on MNIST placed in 3x32x32 (CIFAR-10 is not shipped).
  Every model takes images on the [0, 1] pixel scale (the mean image is subtracted inside).
* Inputs: the shipped MNIST test set, first N images (10000 for the MLP, 500 LeNet, 200 ConvNet;
  ``--quick``: 1000 images, MLP only). Slow implementations run on a prefix of the same images
  (``n_images`` per row), and their speedup is against ddfast on that same prefix.
* Every implementation leaves the model's prediction at x (``ref``), runs 50 steps at most,
  overshoot 0.02, all classes, the same batch size (ART's ``batch_size`` set, its default is 1),
  and (where it has bounds) keeps the iterates in [0, 1].
* Timing: batch by batch, every implementation runs on batch b (best of ``--repeat``) before
  any runs on batch b+1, so the shared machine's load drifts hit all alike; per row the best
  per-batch times are summed. ``img_per_s`` = images / those seconds; ``rho2`` = mean over the images the implementation fooled of
  ||x_adv - x||_2 / ||x||_2 (x on the [0, 1] pixel scale, so this is *not* the paper's rho_2 on
  mean-subtracted images); ``fooled`` = fraction of images with argmax f(x_adv) != ref;
  ``mean_iterations`` where the implementation reports it; ``speedup`` = the ddfast (default
  backend, same bounds) speedup over this row: this row's time / ddfast's time on the same
  images (> 1: ddfast is faster); ``vs_ref_*`` = per-sample
  relative difference of ||delta|| to the reference of the row's group on the images both
  fooled (rows that clip to [0, 1]: foolbox; rows that cannot clip: ddfast without bounds).
* Also the candidates trade-off: ddfast and foolbox with the top-k classes, k in {2, 3, 5, 10}.

Writes FILE (JSON), FILE-stem.png (bar chart), FILE-stem_candidates.png, FILE-stem.md (table).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

MODEL_TITLES = {
    "mlp": "MNIST MLP 784-500-150-10",
    "lenet": "MNIST LeNet",
    "convnet": "CIFAR ConvNet (3x32x32, MNIST-trained)",
}
#: images per model (full run): all rows, the slow peers, the candidates trade-off.
#: The conv nets cost ~100x the MLP per image on CPU, so they get fewer images.
N_FULL = {"mlp": 10000, "lenet": 500, "convnet": 200}
N_CANDIDATES = {"mlp": 1000, "lenet": 200, "convnet": 100}
SLOW = {  # implementations too slow for the full image set: images per model (full run)
    "torchattacks": {"mlp": 300, "lenet": 30, "convnet": 10},
    "art": {"mlp": 2000, "lenet": 100, "convnet": 20},
    "deeprobust": {"mlp": 2000, "lenet": 100, "convnet": 50},
}
SLOW_QUICK = {"torchattacks": 100, "art": 500, "deeprobust": 500}  # --quick (MLP, 1000 images)
PEERS_CLIPPED = ["foolbox", "torchattacks", "art"]  # keep iterates in [0, 1], like ddfast with bounds
PEERS_UNCLIPPED = ["naive", "deeprobust"]  # cannot clip: compared with ddfast without bounds


def log(msg: str) -> None:
    print(msg, flush=True)


def norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).double().norm(dim=1)


def evaluate(model, x, ref, out: peers.Outcome) -> Dict[str, object]:
    x_adv = out.x_adv.to(x.device, torch.float32)
    fooled = common.predict(model, x_adv).cpu() != ref.cpu()
    dn = norms(x_adv - x).cpu()
    ratio = dn / norms(x).cpu()
    row = {
        "rho2": float(ratio[fooled].mean()) if fooled.any() else None,
        "fooled": float(fooled.float().mean()),
        "mean_iterations": None if out.iterations is None else float(out.iterations.float().mean()),
        "mean_l2": float(dn[fooled].mean()) if fooled.any() else None,
    }
    return row, dn, fooled


def per_sample(dn, fooled, dn_ref, fooled_ref) -> Dict[str, Optional[float]]:
    """||delta|| per image against the group's reference implementation, on the images both fooled."""
    n = min(len(dn), len(dn_ref))
    both = fooled[:n] & fooled_ref[:n] & (dn_ref[:n] > 0)
    if not both.any():
        return {"vs_ref_median_rel": None, "vs_ref_max_rel": None, "vs_ref_within_1e-3": None}
    rel = (dn[:n][both] - dn_ref[:n][both]).abs() / dn_ref[:n][both]
    return {"vs_ref_median_rel": float(rel.median()), "vs_ref_max_rel": float(rel.max()),
            "vs_ref_within_1e-3": float((rel <= 1e-3).float().mean())}


def _steps_per_batch(out: peers.Outcome, B: int) -> Optional[float]:
    """Mean over batches of the steps a batch ran: the library's own count (ART), else the
    largest per-image iteration count of each batch of B."""
    if out.steps_per_batch is not None:
        return out.steps_per_batch
    if out.iterations is None:
        return None
    return float(torch.stack([c.max() for c in out.iterations.split(B)]).double().mean())


def measure(jobs, N: int, B: int, args):
    """Time every job batch by batch, interleaved: for each batch of B images, each job that covers
    it runs on it (``repeat`` times, best kept, unless its first run took over ``repeat_below_s``
    per batch), before the next batch starts. Load drifts of the shared machine thus hit every
    job alike at the granularity of one batch. A job ``(fn(lo, hi) -> Outcome, n[, first])`` covers the
    batches from ``first`` (default 0) below n (the last one cut at n). Returns per-job ``{(lo, hi): best seconds}`` and the
    concatenated outcomes."""
    times = {k: {} for k in jobs}
    parts = {k: [] for k in jobs}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t_start = time.perf_counter()
    for lo in range(0, N, B):
        for r in range(args.repeat):
            for k, (fn, n, *first) in jobs.items():
                hi = min(lo + B, N, n)
                if hi <= lo or (first and lo < first[0]):
                    continue
                if r > 0 and times[k][(lo, hi)] > args.repeat_below_s:
                    continue
                sync()
                t0 = time.perf_counter()
                out = fn(lo, hi)
                sync()
                t = time.perf_counter() - t0
                times[k][(lo, hi)] = min(times[k].get((lo, hi), math.inf), t)
                if r == 0:
                    parts[k].append(out)
        # a hiccup of the shared machine (one run several times slower than this job's usual batch)
        # that was not repeated above gets one more run
        for k, (fn, n, *first) in jobs.items():
            hi = min(lo + B, N, n)
            prev = [t for (a, b), t in times[k].items() if a < lo and b - a == hi - lo]
            if (lo, hi) in times[k] and len(prev) >= 2 and times[k][(lo, hi)] > 3 * statistics.median(prev):
                sync()
                t0 = time.perf_counter()
                fn(lo, hi)
                sync()
                times[k][(lo, hi)] = min(times[k][(lo, hi)], time.perf_counter() - t0)
        if lo == 0 or (lo // B) % 10 == 0:
            log(f"   batch {lo // B + 1}/{-(-N // B)} done ({time.perf_counter() - t_start:.0f} s)")
    outs = {}
    for k, ps in parts.items():
        its = [p.iterations for p in ps]
        if not ps:
            continue
        steps = [p.steps_per_batch for p in ps]
        outs[k] = peers.Outcome(torch.cat([p.x_adv for p in ps]),
                                None if any(i is None for i in its) else torch.cat(its),
                                None if any(v is None for v in steps) else statistics.mean(steps))
    return times, outs


def bench_model(name: str, args, available: Dict[str, Optional[str]]) -> Dict[str, list]:
    dev = torch.device(args.device)
    model = common.trained_model(name, log=log).to(dev)
    # DeepFool needs input gradients only. Libraries that call .backward() (foolbox, torchattacks,
    # ART) also compute and accumulate the parameters' gradients when those require grad, which
    # roughly doubles their backward cost; frozen parameters give every library its best case
    # (bit-identical results; ddfast's cost does not change).
    model.requires_grad_(bool(args.keep_param_grad))
    x_all, y_all = common.mnist_test(args.n or N_FULL[name], model=name)
    x_all = x_all.to(dev)
    ref_all = common.predict(model, x_all)
    acc = float((ref_all.cpu() == y_all).float().mean())
    log(f"== {MODEL_TITLES[name]}: {len(x_all)} images, clean accuracy {acc:.4f}, batch {args.batch_size}")
    B = args.batch_size

    backends = peers.ddfast_backends(dev) if available.get("ddfast") is None else []
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    # (label, impl, runner kwargs, n_images)
    plan = []
    for i, b in enumerate(backends):
        label = f"ddfast[{b}]" + (" (default)" if i == 0 else "")
        plan.append((label, "ddfast", dict(backend=b), len(x_all), b, "[0,1]"))
    for p in PEERS_CLIPPED + ["ddfast, no bounds"] + PEERS_UNCLIPPED:
        if p == "ddfast, no bounds":
            if backends:
                plan.append((p, "ddfast", dict(backend=backends[0], bounds=None), len(x_all), backends[0], None))
            continue
        if p not in args.impls:
            continue
        if available.get(p) is not None:
            log(f"   skipping {p}: {available[p]}")
            continue
        n = min(len(x_all), SLOW_QUICK[p] if args.quick else SLOW[p][name]) if p in SLOW else len(x_all)
        if args.n_slow is not None and p in SLOW:
            n = min(len(x_all), args.n_slow)
        plan.append((p if p in PEERS_CLIPPED else f"{p} (no clip)", p, {}, n, None,
                     "[0,1]" if p in PEERS_CLIPPED else None))

    def runner(impl, kw):
        fn = peers.RUNNERS[impl]
        return lambda lo, hi: fn(model, x_all[lo:hi], ref_all[lo:hi], batch_size=B, max_iter=args.max_iter,
                                 overshoot=args.overshoot, **kw)

    jobs = {label: (runner(impl, kw), n) for (label, impl, kw, n, _, _) in plan}
    # ddfast (default backend, same bounds) on the partial batch of a peer that runs fewer than B
    # images beyond a multiple of B: the reference time for that peer's speedup
    for (label, impl, kw, n, _, bounds) in plan:
        if n % B and n != len(x_all):
            kw_ref = dict(backend=backends[0]) if bounds else dict(backend=backends[0], bounds=None)
            jobs.setdefault(f"_ref_{n}_{bounds}", (runner("ddfast", kw_ref), n, n - n % B))

    # warm-up: one small call each (imports, lazy native loads, allocator)
    for (label, impl, kw, n, _, _) in plan:
        runner(impl, kw)(0, 2)
    times, outs = measure(jobs, len(x_all), B, args)

    def t_on(label, n):
        """seconds of `label` on the first n images (sum of its per-batch best times)."""
        return sum(t for (lo, hi), t in times[label].items() if hi <= n)

    rows = []
    refs = {}  # per-sample reference of each group: foolbox (clipped), ddfast without bounds (unclipped)
    for bounds, ref_label in (("[0,1]", "foolbox"), (None, "ddfast, no bounds")):
        if ref_label in outs:
            n_r = jobs[ref_label][1]
            _, dn_r, fooled_r = evaluate(model, x_all[:n_r], ref_all[:n_r], outs[ref_label])
            refs[bounds] = (ref_label, dn_r, fooled_r)
    for (label, impl, kw, n, backend, bounds) in plan:
        metrics, dn, fooled = evaluate(model, x_all[:n], ref_all[:n], outs[label])
        t = t_on(label, n)
        t_ref = None
        if backends:
            ref_label = plan[0][0] if bounds else "ddfast, no bounds"
            if n == len(x_all) or n % B == 0:
                t_ref = t_on(ref_label, n)
            else:  # full batches of the default row + ddfast on the peer's partial last batch
                t_ref = t_on(ref_label, n - n % B) + t_on(f"_ref_{n}_{bounds}", n)
        row = {
            "model": name, "impl": impl, "label": label, "backend": backend, "bounds": bounds,
            "n_images": n, "batch_size": B if impl not in ("torchattacks", "deeprobust") else 1,
            "seconds": t, "img_per_s": n / t,
            "speedup": (t / t_ref) if t_ref else None,
            "steps_per_batch": _steps_per_batch(outs[label], B) if impl not in ("torchattacks", "deeprobust")
            else None,
            **metrics,
        }
        if n < len(x_all) and backends:  # a prefix: ddfast's rho_2 on the same images, to compare with
            same = plan[0][0] if bounds else "ddfast, no bounds"
            row["rho2_ddfast_same_images"] = evaluate(model, x_all[:n], ref_all[:n],
                                                      peers.Outcome(outs[same].x_adv[:n]))[0]["rho2"]
        if bounds in refs:
            row["per_sample_reference"] = refs[bounds][0]
            row.update(per_sample(dn, fooled, *refs[bounds][1:]))
        row["differences"] = peers.DIFFERENCES[impl] if impl != "ddfast" or bounds else \
            "ddfast without bounds: the like-for-like baseline of the rows that cannot clip"
        rows.append(row)
        log(f"   {label:22s} n={n:5d} {row['img_per_s']:9.1f} img/s  ddfast speedup "
            f"{row['speedup'] if row['speedup'] is None else round(row['speedup'], 2)}  rho2 {row['rho2']:.4f}  "
            f"fooled {row['fooled']:.3f}  iters {row['mean_iterations']}")

    cands = []
    if args.candidates and backends:
        ks = [k for k in (2, 3, 5, 10) if k <= int(model(x_all[:1]).shape[1])]
        n = min(len(x_all), args.n_candidates or N_CANDIDATES[name])
        cjobs = {}
        for k in ks:
            cjobs[("ddfast", k)] = (lambda lo, hi, k=k: peers.ddfast_run(
                model, x_all[lo:hi], ref_all[lo:hi], batch_size=B, max_iter=args.max_iter,
                overshoot=args.overshoot, candidates=k, backend=backends[0]), n)
            if "foolbox" in args.impls and available.get("foolbox") is None:
                cjobs[("foolbox", k)] = (lambda lo, hi, k=k: peers.foolbox_run(
                    model, x_all[lo:hi], ref_all[lo:hi], batch_size=B, max_iter=args.max_iter,
                    overshoot=args.overshoot, candidates=k), n)
        ctimes, couts = measure(cjobs, n, B, args)
        for (impl, k) in cjobs:
            t = sum(ctimes[(impl, k)].values())
            metrics, _, _ = evaluate(model, x_all[:n], ref_all[:n], couts[(impl, k)])
            cands.append({"model": name, "impl": impl, "candidates": k, "n_images": n, "seconds": t,
                          "img_per_s": n / t, **metrics})
            log(f"   candidates {impl:8s} k={k:2d} {n / t:9.1f} img/s  rho2 {metrics['rho2']:.4f}  "
                f"fooled {metrics['fooled']:.3f}")
    return {"rows": rows, "candidates": cands, "accuracy": acc}


# ----------------------------------------------------------------------------- outputs


PARAMS = {False: "Model parameters frozen (requires_grad=False) for every implementation: the libraries "
                 "that call .backward() then compute no weight gradients",
          True: "Model parameters requiring grad, as a model comes: foolbox, torchattacks and ART also "
                "compute (and ART/torchattacks accumulate) weight gradients in every backward"}


def write_markdown(path: Path, payload) -> None:
    lines = [f"DeepFool on {payload['device']}, torch {payload['torch']}, {payload['torch_threads']} threads; "
             f"max_iter {payload['settings']['max_iter']}, overshoot {payload['settings']['overshoot']}, "
             f"all classes, batch {payload['settings']['batch_size']}; "
             f"rho_2 = mean ||delta||_2/||x||_2 over fooled images, x in [0, 1] pixels. "
             f"Speedup = this row's time / ddfast's time on the same images (same bounds) "
             f"(> 1: ddfast is faster). {PARAMS[bool(payload['settings'].get('keep_param_grad'))]}. "
             f"`{payload['command']}`", ""]
    for model in payload["models"]:
        lines += [f"**{MODEL_TITLES[model]}** (clean accuracy {payload['accuracy'][model]:.4f})", "",
                  "| implementation | clip [0,1] | images | img/s | ddfast speedup | rho_2 (ddfast on the same images) "
                  "| fooled | mean iters | steps / batch "
                  "| per-sample ‖δ‖ vs reference: median rel. diff / share within 1e-3 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in payload["rows"]:
            if r["model"] != model:
                continue
            sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            it = "" if r["mean_iterations"] is None else f"{r['mean_iterations']:.2f}"
            vs = "" if r.get("vs_ref_median_rel") is None else \
                f"{r['vs_ref_median_rel']:.1e} / {r['vs_ref_within_1e-3']:.3f} (vs {r['per_sample_reference']})"
            rho = "" if r["rho2"] is None else f"{r['rho2']:.4f}"
            if r.get("rho2_ddfast_same_images") is not None:
                rho += f" ({r['rho2_ddfast_same_images']:.4f})"
            st = "" if r.get("steps_per_batch") is None else f"{r['steps_per_batch']:.1f}"
            lines.append(f"| {r['label']} | {'yes' if r['bounds'] else 'no'} | {r['n_images']} | "
                         f"{r['img_per_s']:.1f} | {sp} | {rho} | {r['fooled']:.3f} | {it} | {st} | {vs} |")
        lines.append("")
        cands = [c for c in payload["candidates"] if c["model"] == model]
        if cands:
            lines += ["| candidates (top-k) | " + " | ".join(f"{c['impl']} k={c['candidates']}" for c in cands) + " |",
                      "|---|" + "---:|" * len(cands),
                      "| img/s | " + " | ".join(f"{c['img_per_s']:.1f}" for c in cands) + " |",
                      "| rho_2 | " + " | ".join(f"{c['rho2']:.4f}" for c in cands) + " |",
                      "| fooled | " + " | ".join(f"{c['fooled']:.3f}" for c in cands) + " |", ""]
    path.write_text("\n".join(lines))


def plot(payload, bar_png: Path, cand_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 0.45 * 9 * len(models) + 0.6), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rows = [r for r in payload["rows"] if r["model"] == model]
        labels = [r["label"] for r in rows]
        vals = [r["img_per_s"] for r in rows]
        colors = ["tab:blue" if r["impl"] == "ddfast" else "tab:gray" for r in rows]
        y = range(len(rows))
        bars = ax.barh(list(y), vals, color=colors)
        for b, r in zip(bars, rows):
            if not r["bounds"]:
                b.set_hatch("//")
                b.set_alpha(0.6)
        ax.set_xscale("log")
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            rho = "-" if r["rho2"] is None else f"{r['rho2']:.4f}"
            ax.text(vals[i], i, f"  {vals[i]:.1f} img/s, rho2 {rho}, fooled {r['fooled']:.2f}", va="center",
                    fontsize=8)
        ax.set_xlim(min(vals) / 2, max(vals) * 60)
        ax.set_title(f"DeepFool throughput, {MODEL_TITLES[model]}", fontsize=10)
        ax.set_xlabel("images / s (log); hatched: no clip to [0, 1] (compare with 'ddfast, no bounds')")
    fig.suptitle(f"{payload['device']}, torch {payload['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(bar_png, dpi=110)
    plt.close(fig)

    cands = payload["candidates"]
    if not cands:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"mlp": "o", "lenet": "s", "convnet": "^"}
    for model in models:
        for impl, color in (("ddfast", "tab:blue"), ("foolbox", "tab:gray")):
            pts = sorted((c for c in cands if c["model"] == model and c["impl"] == impl), key=lambda c: c["candidates"])
            if not pts:
                continue
            ax.plot([c["img_per_s"] for c in pts], [c["rho2"] for c in pts], marker=markers.get(model, "o"),
                    color=color, label=f"{impl}, {model}")
            for c in pts:
                ax.annotate(f"k={c['candidates']}", (c["img_per_s"], c["rho2"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log)")
    ax.set_ylabel("rho_2 (lower = stronger attack)")
    ax.set_title("DeepFool candidates (top-k classes): speed vs quality", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cand_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 images, MLP only (a few minutes on 2 cores)")
    ap.add_argument("--json", default=None, help="output JSON (default bench/results/deepfool_throughput[_quick].json)")
    ap.add_argument("--models", default=None, help="comma list of mlp,lenet,convnet (default all; --quick: mlp)")
    ap.add_argument("--n", type=int, default=None,
                    help=f"images per model (default {N_FULL}; --quick 1000)")
    ap.add_argument("--n-slow", type=int, default=None,
                    help=f"images for the slow peers (default {SLOW}; --quick {SLOW_QUICK})")
    ap.add_argument("--n-candidates", type=int, default=None,
                    help=f"images for the candidates trade-off (default {N_CANDIDATES})")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row, best of (default 3)")
    ap.add_argument("--repeat-below-s", type=float, default=10.0,
                    help="repeat a job on a batch only if its first run on it took less (default 10 s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--overshoot", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impls", default="foolbox,torchattacks,art,naive,deeprobust", help="peers to run")
    ap.add_argument("--backends", default=None, help="ddfast backends to run (default all available)")
    ap.add_argument("--no-candidates", dest="candidates", action="store_false")
    ap.add_argument("--keep-param-grad", action="store_true",
                    help="keep the model's parameters requiring grad, as a model comes (default: frozen, so that "
                         "libraries that call .backward() do not also compute weight gradients)")
    ap.add_argument("--tf32", action="store_true",
                    help="on a GPU, leave TF32 convolutions on (PyTorch's default; default here: off)")
    args = ap.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    if args.models is None:
        args.models = "mlp" if args.quick else "mlp,lenet,convnet"
    models = [m for m in args.models.split(",") if m]
    if args.quick and args.n is None:
        args.n = 1000
    json_path = Path(args.json or common.RESULTS / ("deepfool_throughput_quick.json" if args.quick
                                                   else "deepfool_throughput.json"))
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("art").setLevel(logging.ERROR)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not args.tf32:
        # exact float32 as on the CPU: with TF32 convolutions (cuDNN's default) DeepFool's
        # final iterates lie within the logits' rounding of the boundary and "fooled" drifts
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    load_start = os.getloadavg()
    available = peers.available()
    log("implementations: " + ", ".join(f"{k} ({'ok' if v is None else 'missing'})" for k, v in available.items()))
    t_start = time.perf_counter()
    all_rows, all_cands, accs = [], [], {}
    for name in models:
        res = bench_model(name, args, available)
        all_rows += res["rows"]
        all_cands += res["candidates"]
        accs[name] = res["accuracy"]
    payload = {
        "bench": "deepfool_throughput",
        "command": "python bench/deepfool_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": models,
        "accuracy": accs,
        "settings": {"max_iter": args.max_iter, "overshoot": args.overshoot, "batch_size": args.batch_size,
                     "tf32": bool(args.tf32) if args.device.startswith("cuda") else None,
                     "classes": "all", "repeat": args.repeat, "repeat_below_s": args.repeat_below_s,
                     "quick": args.quick,
                     "inputs": "MNIST test set, first n images, [0, 1] pixel scale (mean subtracted inside the model)",
                     "ref": "the model's prediction at x",
                     "timing": "wall clock per batch, all implementations interleaved batch by batch, "
                               "best of repeat per batch (one run where the first took over repeat_below_s), "
                               "summed over the batches; after a warm-up call",
                     "rho2": "mean over fooled images of ||x_adv - x||_2 / ||x||_2, x in [0, 1] pixels",
                     "speedup": "row seconds / ddfast (default backend, same bounds) seconds on the same images",
                     "keep_param_grad": bool(args.keep_param_grad),
                     "params": ("requires_grad kept: libraries calling .backward() also compute weight gradients"
                                if args.keep_param_grad else "frozen (requires_grad=False) for every implementation")},
        "unavailable": {k: v for k, v in available.items() if v is not None},
        "rows": all_rows,
        "candidates": all_cands,
        "wall_s": time.perf_counter() - t_start,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    path = common.write_json(json_path, payload, device=args.device)
    import json

    payload = json.loads(path.read_text())
    stem = path.with_suffix("")
    write_markdown(stem.with_name(stem.name + ".md"), payload)
    plot(payload, stem.with_name(stem.name + ".png"), stem.with_name(stem.name + "_candidates.png"))
    log(f"wrote {path}, {stem.name}.md, {stem.name}.png, {stem.name}_candidates.png ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
