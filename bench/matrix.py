"""The benchmark matrix: DeepFool img/s per model x batch size x implementation, and the
training step per method, side by side in one run; one JSON and one PNG.

    python bench/matrix.py [--device cpu|cuda] [--json FILE] [--budget-s S] [--parts deepfool,train]

Writes FILE (JSON), FILE-stem.png (img/s against batch size per model and implementation;
training-step time per method) and FILE-stem.md (the tables; bench/tables.py puts it in
bench/README.md). ``--render FILE`` redraws those two from a JSON (a GPU session's).

Part ``deepfool``: on the MNIST MLP, LeNet and the CIFAR-style ResNet-18 (bench/common.py,
trained here and cached; ResNet-18 briefly, on MNIST placed in 3x32x32), every implementation
of bench/peers.py that clips to [0, 1] (ddfast's default backend, foolbox, adv-lib's ``df``,
torchattacks, ART) runs DeepFool (50 steps, overshoot 0.02, all classes, the model's
prediction as the class to leave, parameters frozen) at each batch size of the profile
(:data:`PROFILES`: the GPU's 100 / 1000 / 10000, the CPU's smaller), timed batch by batch,
interleaved (``deepfool_throughput.measure``). Per row: img/s; ``speedup`` = the row's seconds
/ ddfast's seconds on the same images at the same batching (> 1: ddfast is faster); per-sample
agreement of ||delta|| with foolbox (median relative difference, share within 1e-3).
A peer that runs fewer images than the batch size runs them as one smaller batch (the row's
``batch_size`` says so); torchattacks loops over single images, so it runs in the smallest
batch size's cell only.

Part ``train``: one training step (forward, loss, backward, SGD momentum 0.9) on ResNet-18,
LeNet and the MLP for: cross-entropy, PGD-10 adversarial training and TRADES (10 steps) -- the library's
own, looked up in ``ddfast.paper.train`` at run time (:data:`LIBRARY_TRAINING`), rows marked
"not available" otherwise -- and DeepDefense (``ddfast.deepdefense_loss``, all classes and
``candidates=3``), eager and, on a GPU, captured in a CUDA graph (DeepDefense only through
``deepdefense_loss(..., capturable=True)`` where the function takes that argument). Methods
timed round-robin (``common.round_robin``), medians; peak memory per method from a separate
pass on a GPU (``torch.cuda.max_memory_allocated``, and its growth above what was allocated
before the method was built); on the CPU from the untimed warm-up round, methods one after
another (the process's peak RSS, monotone over the process, and how much each step raised it).

``--budget-s``: DeepFool cells that would start after that many seconds are skipped and
marked, so the run ends (and writes its JSON) within a stage's time limit; the JSON is also
rewritten after every cell.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import deepfool_throughput as dt  # noqa: E402
import peers  # noqa: E402

import ddfast  # noqa: E402

MODELS = ("mlp", "lenet", "resnet18")
TITLES = {"mlp": "MNIST MLP 784-500-150-10", "lenet": "MNIST LeNet",
          "resnet18": "ResNet-18 (CIFAR-style, 3x32x32, MNIST-trained)"}
IMPLS = ("ddfast", "foolbox", "advlib", "torchattacks", "art")
LABELS = {"ddfast": "ddfast", "foolbox": "foolbox", "advlib": "adv-lib df", "torchattacks": "torchattacks",
          "art": "ART"}
PER_IMAGE = {"torchattacks"}  # loop over single images whatever the batch size

#: images per implementation at each (model, batch size); ddfast's count is the cell's N.
#: GPU (one 10-minute device call, ~7 min for this script): the MLP and LeNet at 100 / 1000 /
#: 10000; ResNet-18 at 100 and 1000 only (batch 10000 holds ~64 GB of saved activations in one
#: forward graph, and its ~60 s of ddfast alone would not fit); ART, torchattacks and the
#: ResNet-18 peers on fewer images.
PROFILES: Dict[str, Dict[str, Dict[int, Dict[str, int]]]] = {
    "cuda": {
        "mlp": {100: dict(ddfast=10000, foolbox=2000, advlib=2000, art=500, torchattacks=10),
                1000: dict(ddfast=10000, foolbox=5000, advlib=5000, art=1000),
                10000: dict(ddfast=10000, foolbox=10000, advlib=10000, art=10000)},
        "lenet": {100: dict(ddfast=5000, foolbox=1000, advlib=1000, art=300, torchattacks=5),
                  1000: dict(ddfast=10000, foolbox=2000, advlib=2000, art=1000),
                  10000: dict(ddfast=10000, foolbox=10000, advlib=10000, art=10000)},
        "resnet18": {100: dict(ddfast=500, foolbox=200, advlib=200, art=100, torchattacks=2),
                     1000: dict(ddfast=1000, foolbox=1000, advlib=1000, art=1000)},
    },
    # CPU, 2 shared cores (busy ones, load ~10: ~25 min in all): LeNet at 100 and 500 (ART at
    # 100 only), ResNet-18 at batch 2 without torchattacks (50 single-image steps, minutes an image)
    "cpu": {
        "mlp": {100: dict(ddfast=1000, foolbox=500, advlib=1000, art=200, torchattacks=10),
                1000: dict(ddfast=1000, foolbox=1000, advlib=1000, art=1000)},
        "lenet": {100: dict(ddfast=200, foolbox=100, advlib=100, art=100, torchattacks=2),
                  500: dict(ddfast=500, foolbox=500, advlib=500)},
        "resnet18": {2: dict(ddfast=2, foolbox=2, advlib=2, art=1)},
    },
}
#: training-step part: model -> (batch, timed rounds) per profile
TRAIN = {"cuda": {"resnet18": (128, 10), "lenet": (128, 20), "mlp": (128, 20)},
         "cpu": {"resnet18": (8, 1), "lenet": (100, 3), "mlp": (100, 10)}}
#: the library's training procedures looked up in ddfast.paper.train: row -> function names tried,
#: each called ``fn(model, x, y, steps=10)`` and returning the step's scalar loss (with graph)
LIBRARY_TRAINING = {"pgd10": ("pgd_at_loss",), "trades10": ("trades_loss",)}
INNER_STEPS = 10


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- DeepFool part


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _guarded(label: str, fn: Callable, x_all: Tensor, errors: Dict[str, str], device: str) -> Callable:
    """``fn(lo, hi)``; after its first exception (an OOM at batch 10000) the error is kept in
    ``errors`` and later calls return the clean images, so the other rows still run."""
    def call(lo: int, hi: int) -> peers.Outcome:
        if label not in errors:
            try:
                return fn(lo, hi)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the cell goes on
                errors[label] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"   {label}: {errors[label]}")
                _free(device)
        return peers.Outcome(x_all[lo:hi].clone())
    return call


def _cell_plan(sizes: Dict[str, int], B: int, smallest: bool, available: Dict[str, Optional[str]],
               impls: List[str]) -> Tuple[int, List[Tuple[str, int]], Dict[str, str]]:
    """(N, [(impl, n_images)], {impl: why not run}) of one cell."""
    N = sizes["ddfast"]
    plan: List[Tuple[str, int]] = [("ddfast", N)]
    skipped: Dict[str, str] = {}
    for impl in IMPLS[1:]:
        if impl not in impls:
            continue
        if impl not in sizes:
            skipped[impl] = ("per-image loop: measured in the smallest batch size's cell" if impl in PER_IMAGE
                             and not smallest else "not in this profile's cell (see PROFILES)")
            continue
        if available.get(impl) is not None:
            skipped[impl] = f"not installed: {available[impl]}"
            continue
        plan.append((impl, min(sizes[impl], N)))
    return N, plan, skipped


def run_cell(model: nn.Module, name: str, x_all: Tensor, ref_all: Tensor, B: int, plan: List[Tuple[str, int]],
             args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every implementation of ``plan`` on the first images, batch by batch, interleaved; rows."""
    backend = peers.ddfast_backends(args.device)[0]
    N = plan[0][1]
    errors: Dict[str, str] = {}

    def runner(impl: str, bs: int) -> Callable:
        kw = {"backend": backend} if impl == "ddfast" else {}
        fn = peers.RUNNERS[impl]
        return lambda lo, hi: fn(model, x_all[lo:hi], ref_all[lo:hi], batch_size=bs, max_iter=args.max_iter,
                                 overshoot=args.overshoot, **kw)

    jobs: Dict[str, tuple] = {}
    for impl, n in plan:
        bs = 1 if impl in PER_IMAGE else B
        jobs[impl] = (_guarded(impl, runner(impl, bs), x_all, errors, args.device), n)
        if n % B and n < N:  # ddfast on the peer's last, partial batch: its reference time
            jobs.setdefault(f"_ref_{n}", (_guarded(f"_ref_{n}", runner("ddfast", B), x_all, errors, args.device),
                                          n, n - n % B))
    for impl, _ in plan:  # warm-up: imports, lazy native loads, allocator
        jobs[impl][0](0, 2)
    ns = types.SimpleNamespace(repeat=args.repeat, repeat_below_s=args.repeat_below_s, device=args.device)
    times, outs = dt.measure(jobs, N, B, ns)
    return _cell_rows(model, name, x_all, ref_all, B, plan, times, outs, errors, backend)


def _seconds(times: Dict[str, Dict[Tuple[int, int], float]], label: str, n: int) -> float:
    return sum(t for (lo, hi), t in times[label].items() if hi <= n)


def _ddfast_seconds(times, n: int, B: int, N: int) -> float:
    """ddfast's seconds on the first n images, batched as a peer with n images is."""
    if n == N or n % B == 0:
        return _seconds(times, "ddfast", n)
    return _seconds(times, "ddfast", n - n % B) + _seconds(times, f"_ref_{n}", n)


def _cell_rows(model, name, x_all, ref_all, B, plan, times, outs, errors, backend) -> List[Dict[str, Any]]:
    N = plan[0][1]
    fb = None
    if "foolbox" in outs and "foolbox" not in errors:
        n_fb = dict(plan)["foolbox"]
        _, dn_fb, fooled_fb = dt.evaluate(model, x_all[:n_fb], ref_all[:n_fb], outs["foolbox"])
        fb = (dn_fb, fooled_fb)
    rows = []
    for impl, n in plan:
        row: Dict[str, Any] = {"model": name, "impl": impl, "label": LABELS[impl],
                               "backend": backend if impl == "ddfast" else None, "batch": B,
                               "batch_size": 1 if impl in PER_IMAGE else min(B, n), "n_images": n}
        if impl in errors:
            rows.append({**row, "error": errors[impl]})
            log(f"   {LABELS[impl]:12s} batch {B:5d}: {errors[impl]}")
            continue
        metrics, dn, fooled = dt.evaluate(model, x_all[:n], ref_all[:n], outs[impl])
        t = _seconds(times, impl, n)
        t_dd = None if any(k.startswith(("ddfast", "_ref_")) for k in errors) else _ddfast_seconds(times, n, B, N)
        row.update({"seconds": t, "img_per_s": n / t, "speedup": t / t_dd if t_dd else None, **metrics})
        if fb is not None:
            row.update(dt.per_sample(dn, fooled, *fb))
        rows.append(row)
        sp = "" if row["speedup"] is None else f"ddfast speedup {row['speedup']:.2f}x"
        log(f"   {LABELS[impl]:12s} batch {row['batch_size']:5d} n={n:5d} {row['img_per_s']:10.1f} img/s  {sp}  "
            f"fooled {row['fooled']:.3f}  vs foolbox {row.get('vs_ref_median_rel')}")
    return rows


def _capped(cells: Dict[int, Dict[str, int]], cap: Optional[int]) -> Dict[int, Dict[str, int]]:
    return cells if cap is None else {b: {k: min(n, cap) for k, n in c.items()} for b, c in cells.items()}


def deepfool_part(args: argparse.Namespace, profile: Dict, available: Dict[str, Optional[str]],
                  out: Dict[str, Any], flush: Callable[[], None]) -> None:
    dev = torch.device(args.device)
    for name in args.models:
        cells = _capped(profile[name], args.max_images)
        batches = [b for b in sorted(cells) if not args.batches or b in args.batches]
        if not batches:
            continue
        model = common.trained_model(name, log=log, train_device=args.device).to(dev).requires_grad_(False)
        out["weights"][name] = common.state_fingerprint(model)
        x_all, y_all = common.mnist_test(max(cells[b]["ddfast"] for b in batches), model=name)
        x_all = x_all.to(dev)
        ref_all = common.predict(model, x_all)
        out["accuracy"][name] = float((ref_all.cpu() == y_all).float().mean())
        log(f"== {TITLES[name]}: clean accuracy {out['accuracy'][name]:.4f} on {len(x_all)} images")
        for B in batches:
            N, plan, skipped = _cell_plan(cells[B], B, B == min(cells), available, args.impls)
            if time.perf_counter() - out["_t0"] > args.budget_s:
                log(f"   batch {B}: skipped (time budget of {args.budget_s:.0f} s spent)")
                out["rows"].append({"model": name, "batch": B, "skipped": f"time budget {args.budget_s:.0f} s"})
                continue
            log(f"-- {name}, batch {B}: " + ", ".join(f"{LABELS[i]} {n}" for i, n in plan) + " images")
            out["rows"] += run_cell(model, name, x_all[:N], ref_all[:N], B, plan, args)
            out["rows"] += [{"model": name, "impl": impl, "label": LABELS[impl], "batch": B, "skipped": why}
                            for impl, why in skipped.items()]
            _free(args.device)
            flush()


# ----------------------------------------------------------------------------- training part


def _accepts(fn: Callable, arg: str) -> bool:
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _library_loss(row: str) -> Tuple[Optional[Callable], str]:
    """The library's PGD-AT / TRADES step loss ``(fn(model, x, y, capturable) -> loss, where from)``,
    or ``(None, why not)``."""
    from ddfast.paper import train

    for fname in LIBRARY_TRAINING[row]:
        fn = getattr(train, fname, None)
        if callable(fn):
            if not _accepts(fn, "steps"):
                return None, f"ddfast.paper.train.{fname} takes no `steps` argument"
            return (lambda m, x, y, cap, fn=fn: fn(m, x, y, steps=INNER_STEPS, **({"capturable": True} if cap and
                                                 _accepts(fn, "capturable") else {}))), \
                f"ddfast.paper.train.{fname}(model, x, y, steps={INNER_STEPS})"
    names = ", ".join(LIBRARY_TRAINING[row])
    return None, f"not available in this checkout: ddfast.paper.train has no {names}"


def training_methods() -> Dict[str, Tuple[Optional[Callable], str]]:
    """row -> (loss(model, x, y, captured) or None, what it calls / why not)."""
    def ce(m, x, y, cap=False):
        return F.cross_entropy(m(x), y)

    def dd(k: Optional[int]) -> Tuple[Optional[Callable], str]:
        def loss(m, x, y, cap):
            kw = {"capturable": True} if cap else {}
            return ce(m, x, y) + ddfast.deepdefense_loss(m, x, y, candidates=k, **kw)
        return loss, f"cross_entropy + ddfast.deepdefense_loss(model, x, y, candidates={k}) (library defaults)"

    return {"ce": (ce, "F.cross_entropy(model(x), y)"), "pgd10": _library_loss("pgd10"),
            "trades10": _library_loss("trades10"), "deepdefense": dd(None), "deepdefense_top3": dd(3)}


def _captured_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, x: Tensor, y: Tensor
                   ) -> Callable[[Tensor, Tensor], None]:
    """The whole step (forward, loss, backward, SGD) captured in one CUDA graph (static x, y);
    warm-up steps on a side stream first, as torch.cuda.graphs' whole-network example."""
    sx, sy = x.clone(), y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, sx, sy, True).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(model, sx, sy, True).backward()
        opt.step()

    def step(xb: Tensor, yb: Tensor) -> None:
        sx.copy_(xb)
        sy.copy_(yb)
        graph.replay()
    return step


def _make_step(base: nn.Module, loss_fn: Callable, captured: bool, x0: Tensor, y0: Tensor
               ) -> Callable[[Tensor, Tensor], None]:
    m = copy.deepcopy(base).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    if captured:
        return _captured_step(m, opt, loss_fn, x0, y0)

    def step(xb: Tensor, yb: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(m, xb, yb, False).backward()
        opt.step()
    return step


def _variants(device: str) -> List[Tuple[str, bool]]:
    return [("eager", False)] + ([("cuda_graph", True)] if torch.device(device).type == "cuda" else [])


def _unavailable(row: str, fn: Optional[Callable], why: str, captured: bool) -> Optional[str]:
    if fn is None:
        return why
    if captured and row.startswith("deepdefense") and not _accepts(ddfast.deepdefense_loss, "capturable"):
        return "not available: ddfast.deepdefense_loss takes no `capturable` argument in this checkout"
    return None


def _memory_pass(base, methods, device, x0, y0) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Peak memory of each runnable (method, variant): built and stepped once, alone."""
    out = {}
    for row, (fn, why) in methods.items():
        for variant, cap in _variants(device):
            if _unavailable(row, fn, why, cap):
                continue
            _free(device)
            before = torch.cuda.memory_allocated(device) if device.startswith("cuda") else None
            rss_before = common.peak_memory("cpu")["peak_mib"]
            common.reset_peak_memory(device)
            try:
                _make_step(base, fn, cap, x0, y0)(x0, y0)
            except Exception as e:  # noqa: BLE001 - the timing pass reports it
                out[(row, variant)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            mem = common.peak_memory(device)
            mem["growth_mib"] = mem["peak_mib"] - (before / 2**20 if before is not None else rss_before)
            out[(row, variant)] = mem
    _free(device)
    return out


def _step_and_memory(step: Callable, x: Tensor, y: Tensor, row: Dict[str, Any], record_rss: bool) -> None:
    """``step(x, y)``, unless it failed before (then ``row["unavailable"]`` holds the error); with
    ``record_rss`` (the CPU's warm-up round, methods one after another) the process's peak RSS
    after it, and how much this step raised it, go into ``row``."""
    if "unavailable" in row:
        return
    before = common.peak_memory("cpu")["peak_mib"]
    try:
        step(x, y)
    except Exception as e:  # noqa: BLE001 - recorded in the row, the other methods go on
        row["unavailable"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        return
    if record_rss:
        mem = common.peak_memory("cpu")
        row.update(mem, growth_mib=mem["peak_mib"] - before)


def train_model(name: str, args: argparse.Namespace, batch: int, rounds: int) -> List[Dict[str, Any]]:
    dev = torch.device(args.device)
    base = common.trained_model(name, log=log, train_device=args.device).to(dev)
    x_all, y_all = common.mnist_test(batch * (rounds + 1), model=name)
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    methods = training_methods()
    x0, y0 = x_all[:batch], y_all[:batch]
    on_gpu = dev.type == "cuda"
    memory = _memory_pass(base, methods, args.device, x0, y0) if on_gpu else {}
    fns, rows = {}, {}
    for row, (fn, why) in methods.items():
        for variant, cap in _variants(args.device):
            key = f"{row}/{variant}"
            rows[key] = {"model": name, "method": row, "variant": variant, "batch": batch, "calls": why}
            bad = _unavailable(row, fn, why, cap) or memory.get((row, variant), {}).get("error")
            if bad:
                rows[key]["unavailable"] = bad
                continue
            try:
                step = _make_step(base, fn, cap, x0, y0)
            except Exception as e:  # noqa: BLE001 - a capture that fails is a row with its error
                rows[key]["unavailable"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                continue
            fns[key] = (lambda r, step=step, row=rows[key]: _step_and_memory(
                step, x_all[(r % (rounds + 1)) * batch:][:batch], y_all[(r % (rounds + 1)) * batch:][:batch],
                row, r == 0 and not on_gpu))
            rows[key].update(memory.get((row, variant), {}))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = common.round_robin(fns, rounds, sync)
    ce = statistics.median(times["ce/eager"]) if "ce/eager" in times else None
    for key, ts in times.items():
        if "unavailable" in rows[key]:
            continue
        med = statistics.median(ts)
        rows[key].update({"median_s": med, "min_s": min(ts), "rounds": len(ts),
                          "ratio_to_ce": med / ce if ce else None})
    for r in rows.values():
        log(f"   {name:8s} {r['method']:17s} {r['variant']:10s} " + (
            f"{r['median_s'] * 1e3:9.1f} ms  x{r['ratio_to_ce']:.2f} of CE  peak {r.get('peak_mib', 0):.0f} MiB"
            if "median_s" in r else r["unavailable"]))
    return list(rows.values())


def train_part(args: argparse.Namespace, out: Dict[str, Any], flush: Callable[[], None]) -> None:
    for name, (batch, rounds) in TRAIN[args.profile].items():
        if name not in args.models:
            continue
        rounds = args.train_rounds or rounds
        log(f"== training step, {TITLES[name]}, batch {batch}, {rounds} rounds")
        out["train_rows"] += train_model(name, args, batch, rounds)
        _free(args.device)
        flush()


# ----------------------------------------------------------------------------- targets, outputs


def _find(rows, **kw) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "img_per_s" in r), None)


def targets(out: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's targets, each with the figure this run measured (None where not run)."""
    rows, checks = out["rows"], []
    for B, goal in ((100, 40000.0), (10000, 150000.0)):
        r = _find(rows, model="mlp", impl="ddfast", batch=B)
        checks.append({"target": f"ddfast MNIST MLP >= {goal:.0f} img/s at batch {B}", "goal": goal,
                       "value": r and r["img_per_s"]})
    batches = sorted({r["batch"] for r in rows if r.get("model") == "mlp" and "img_per_s" in r})
    for peer, goal in (("advlib", 5.0), ("foolbox", 10.0)):
        for B in batches:
            r = _find(rows, model="mlp", impl=peer, batch=B)
            checks.append({"target": f"ddfast >= {goal:g}x {LABELS[peer]} (MLP, batch {B})", "goal": goal,
                           "value": r and r["speedup"]})
    for B in sorted({r["batch"] for r in rows if r.get("model") == "resnet18" and "img_per_s" in r}):
        r = _find(rows, model="resnet18", impl="advlib", batch=B)
        checks.append({"target": f"ddfast >= 5x adv-lib df (ResNet-18, batch {B})", "goal": 5.0,
                       "value": r and r["speedup"]})
    tr = {(r["method"], r["variant"]): r.get("median_s") for r in out["train_rows"] if r["model"] == "resnet18"}
    for variant in sorted({v for _, v in tr}, key=lambda v: v != "eager") or ["eager"]:
        dd, pgd = tr.get(("deepdefense", variant)), tr.get(("pgd10", variant))
        checks.append({"target": f"DeepDefense step <= PGD-10 step (ResNet-18, {variant}; ratio dd/pgd <= 1)",
                       "goal": 1.0, "value": dd / pgd if dd and pgd else None, "lower_is_better": True})
    for c in checks:
        v = c["value"]
        c["met"] = None if v is None else (v <= c["goal"] if c.get("lower_is_better") else v >= c["goal"])
    return checks


def plot(out: Dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = [m for m in MODELS if any(r.get("model") == m for r in out["rows"] + out["train_rows"])]
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(5 * max(1, len(models)), 8.5), squeeze=False)
    colors = {"ddfast": "tab:blue", "foolbox": "tab:gray", "advlib": "tab:orange", "torchattacks": "tab:green",
              "art": "tab:red"}
    for ax, model in zip(axes[0], models):
        for impl in IMPLS:
            pts = sorted((r["batch_size"], r["img_per_s"]) for r in out["rows"]
                         if r.get("model") == model and r.get("impl") == impl and "img_per_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[impl], label=LABELS[impl])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size (log)")
        ax.set_ylabel("DeepFool images / s (log)")
        ax.set_title(TITLES[model], fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax, model in zip(axes[1], models):
        rows = [r for r in out["train_rows"] if r["model"] == model and "median_s" in r]
        if not rows:
            ax.set_axis_off()
            continue
        labels = [f"{r['method']} ({r['variant']})" for r in rows]
        vals = [r["median_s"] * 1e3 for r in rows]
        ax.barh(range(len(rows)), vals, color=["tab:purple" if r["variant"] != "eager" else "tab:blue" for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f} ms", va="center", fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())   # a narrow log range labels every minor tick
        ax.set_xlabel(f"training step, ms (median, log), batch {rows[0]['batch']}")
        ax.set_title(f"training step, {model}", fontsize=9)
    fig.suptitle(f"{out['device']}, torch {out['torch']}, commit {out['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _fmt(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def _deepfool_table(out: Dict[str, Any], model: str) -> List[str]:
    lines = [f"**{TITLES[model]}** (clean accuracy {_fmt(out['accuracy'].get(model), '.4f')}, "
             f"weights {out['weights'].get(model)})", "",
             "| batch | implementation | batch size run | images | img/s | ddfast speedup | fooled | mean iters "
             "| ‖δ‖ vs foolbox: median rel. diff / share within 1e-3 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in out["rows"]:
        if r.get("model") != model:
            continue
        head = f"| {r['batch']} | {r.get('label', '')} |"
        if "img_per_s" not in r:
            lines.append(f"{head} | | | | | | {r.get('error') or r.get('skipped')} |")
            continue
        vs = "" if r.get("vs_ref_median_rel") is None else \
            f"{r['vs_ref_median_rel']:.1e} / {r['vs_ref_within_1e-3']:.3f}"
        lines.append(f"{head} {r['batch_size']} | {r['n_images']} | {r['img_per_s']:.4g} | "
                     f"{_fmt(r['speedup'], '.2f', 'x')} | {r['fooled']:.3f} | "
                     f"{_fmt(r['mean_iterations'], '.2f')} | {vs} |")
    return lines + [""]


def _train_table(out: Dict[str, Any]) -> List[str]:
    lines = ["| model | batch | method | variant | median ms | x CE step | peak MiB (growth) | calls |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for r in out["train_rows"]:
        head = f"| {r['model']} | {r['batch']} | {r['method']} | {r['variant']} |"
        if "median_s" not in r:
            lines.append(f"{head} | | | {r.get('unavailable')} |")
            continue
        mem = f"{r['peak_mib']:.0f} ({r['growth_mib']:.0f})" if "peak_mib" in r else ""
        lines.append(f"{head} {r['median_s'] * 1e3:.1f} | {_fmt(r['ratio_to_ce'], '.2f')} | {mem} | {r['calls']} |")
    return lines + [""]


def write_markdown(out: Dict[str, Any], path: Path) -> None:
    lines = [f"{out['device']}, torch {out['torch']}, {out['torch_threads']} threads, commit {out['git_commit']}, "
             f"{out['date']}; `{out['command']}` ({out['wall_s']:.0f} s). DeepFool: max_iter "
             f"{out['settings']['max_iter']}, overshoot {out['settings']['overshoot']}, all classes, [0, 1] clipping, "
             "parameters frozen; speedup = the row's seconds / ddfast's on the same images at the same batching "
             "(> 1: ddfast faster).", ""]
    for model in MODELS:
        if any(r.get("model") == model for r in out["rows"]):
            lines += _deepfool_table(out, model)
    if out["train_rows"]:
        lines += ["**Training step** (SGD momentum 0.9, train mode; median of the rounds, methods round-robin; "
                  f"peak memory: {out['train_rows'][0].get('peak_kind', '')})", ""] + _train_table(out)
    lines += ["| target | measured | met |", "|---|---:|---|"]
    for c in out["targets"]:
        met = "not measured" if c["met"] is None else "yes" if c["met"] else "no"
        lines.append(f"| {c['target']} | {_fmt(c['value'], '.4g')} | {met} |")
    path.write_text("\n".join(lines) + "\n")


def render(path: Path) -> None:
    """The PNG and the markdown table of a matrix JSON, beside it."""
    out = json.loads(path.read_text())
    plot(out, path.with_suffix(".png"))
    write_markdown(out, path.with_suffix(".md"))


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", default=None, choices=sorted(PROFILES), help="image counts (default: the device's)")
    ap.add_argument("--json", default=None, help="output JSON (default bench/results/matrix_<profile>.json); "
                                                 "the PNG beside it")
    ap.add_argument("--models", default="mlp,resnet18,lenet",
                    help="run order (default: the targets' models first, so a time budget cuts LeNet)")
    ap.add_argument("--batches", default=None, help="comma list: only these batch sizes of the profile")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--max-images", type=int, default=None, help="cap every image count of the profile (smoke runs)")
    ap.add_argument("--parts", default="train,deepfool")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="skip the DeepFool cells that would start after this many seconds")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per batch, best of (default 2)")
    ap.add_argument("--repeat-below-s", type=float, default=5.0,
                    help="repeat a batch only if its first run took less (default 5 s)")
    ap.add_argument("--train-rounds", type=int, default=None, help="timed training rounds (default: TRAIN)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--overshoot", type=float, default=0.02)
    ap.add_argument("--render", default=None, metavar="JSON", help="only redraw the PNG and .md of a matrix JSON")
    args = ap.parse_args(argv)
    args.profile = args.profile or ("cuda" if args.device.startswith("cuda") else "cpu")
    args.models = [m for m in args.models.split(",") if m]
    args.impls = [i for i in args.impls.split(",") if i]
    args.parts = [p for p in args.parts.split(",") if p]
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    return args


def main(argv: Optional[List[str]] = None) -> Path:
    args = parse_args(argv)
    if args.render:
        render(Path(args.render))
        return Path(args.render)
    warnings.filterwarnings("ignore")
    logging.getLogger("art").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # exact float32, as on the CPU (see deepfool_throughput --tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    path = Path(args.json or common.RESULTS / f"matrix_{args.profile}.json")
    available = peers.available()
    log("implementations: " + ", ".join(f"{k} ({'ok' if v is None else 'missing'})" for k, v in available.items()))
    out: Dict[str, Any] = {
        "bench": "matrix", "_t0": time.perf_counter(), "git_commit_at_start": common._git_commit(),
        "command": "python bench/matrix.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "profile": args.profile,
        "sizes": {m: _capped(PROFILES[args.profile][m], args.max_images) for m in args.models},
        "settings": {"max_iter": args.max_iter, "overshoot": args.overshoot, "classes": "all", "bounds": [0, 1],
                     "ref": "the model's prediction at x", "params": "frozen (requires_grad=False) for DeepFool",
                     "repeat": args.repeat, "repeat_below_s": args.repeat_below_s, "budget_s": args.budget_s,
                     "tf32": False if args.device.startswith("cuda") else None,
                     "speedup": "row seconds / ddfast seconds on the same images, same batching (> 1: ddfast faster)",
                     "train_optimizer": "SGD lr 1e-3 momentum 0.9 wd 5e-4, model in train mode",
                     "library_training_lookup": {"functions": LIBRARY_TRAINING}},
        "unavailable": {k: v for k, v in available.items() if v is not None},
        "weights": {}, "accuracy": {}, "rows": [], "train_rows": [], "partial": True,
    }

    def flush() -> None:
        out["wall_s"] = time.perf_counter() - out["_t0"]
        out["targets"] = targets(out)
        common.write_json(path, {k: v for k, v in out.items() if not k.startswith("_")}, device=args.device)

    if "train" in args.parts:
        train_part(args, out, flush)
    if "deepfool" in args.parts:
        deepfool_part(args, PROFILES[args.profile], available, out, flush)
    out["partial"] = False
    flush()
    render(path)
    for c in out["targets"]:
        v = "not measured" if c["value"] is None else f"{c['value']:.4g}"
        log(f"target: {c['target']}: {v} ({'' if c['met'] is None else 'met' if c['met'] else 'NOT met'})")
    log(f"wrote {path}, {path.with_suffix('.png').name}, {path.with_suffix('.md').name} ({out['wall_s']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
