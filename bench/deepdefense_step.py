"""Cost of one DeepDefense training step against a plain cross-entropy step.

A full training step (forward, loss, backward, SGD with momentum 0.9 and weight decay 5e-4)
at batch 100 on trained MNIST models (:func:`common.trained_model`), for:

* ``ce``: ``F.cross_entropy(model(x), y)``;
* ``ddfast``: ``ce + ddfast.regularizer.deepdefense_loss(model, x, y)`` (max_iter 5);
* ``ddfast_top3``: the same with ``candidates=3``;
* ``naive``: ``ce +`` :func:`naive_deepdefense`, a straightforward batched implementation
  that builds the full Jacobian ``[B, K, D]`` with ``create_graph`` (one ``autograd.grad`` per
  class) at every step and keeps finished samples in the batch under a mask.

The methods are timed round-robin in the same process (each on its own copy of the model and
optimizer), so the 2 shared cores' noise hits them alike; the median per method is reported,
and the ratios to ``ce`` come from the same run (``naive``, ~45-65x a plain step, joins only the
first ``--naive-rounds`` rounds). ``naive`` and ``ddfast`` are checked to give
the same regularizer value on the first batch.

    python bench/deepdefense_step.py [--models mlp lenet] [--rounds 20] [--naive-rounds 5] [--threads N]

Writes ``bench/results/deepdefense_step.json``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import common  # noqa: E402  (bench/common.py; puts the checkout on sys.path)
from ddfast.reference import deepdefense_ref  # noqa: E402
from ddfast.regularizer import deepdefense_loss  # noqa: E402

LAM, C, D, MAX_ITER, OVERSHOOT = 15.0, 25.0, 5.0, 5, 0.02


def naive_deepdefense(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """R by :func:`ddfast.reference.deepdefense_ref`: every class gradient with
    ``create_graph`` by its own autograd call, done samples masked, no compaction."""
    return deepdefense_ref(model, x, y, lam=LAM, c=C, d=D, max_iter=MAX_ITER, overshoot=OVERSHOOT)[0]


def _losses() -> Dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    def ce(m, x, y):
        return F.cross_entropy(m(x), y)

    return {
        "ce": ce,
        "ddfast": lambda m, x, y: ce(m, x, y) + deepdefense_loss(m, x, y, lam=LAM, c=C, d=D,
                                                                 max_iter=MAX_ITER, overshoot=OVERSHOOT),
        "ddfast_top3": lambda m, x, y: ce(m, x, y) + deepdefense_loss(m, x, y, lam=LAM, c=C, d=D,
                                                                      max_iter=MAX_ITER, overshoot=OVERSHOOT,
                                                                      candidates=3),
        "naive": lambda m, x, y: ce(m, x, y) + naive_deepdefense(m, x, y),
    }


def bench_model(name: str, rounds: int, naive_rounds: int, batch: int = 100, log=print,
                device: str = "cpu") -> Dict:
    base = common.trained_model(name, log=log)
    x_all, y_all = common.mnist_test(n=batch * (rounds + 2), model=name)
    # same values from both implementations on the first batch (float64 to compare tightly)
    m64 = copy.deepcopy(base).double()
    xb, yb = x_all[:batch].double(), y_all[:batch]
    a, info = deepdefense_loss(m64, xb, yb, return_info=True)
    a, b = a.item(), naive_deepdefense(m64, xb, yb).item()
    check = {"ddfast_R": a, "naive_R": b, "rel_diff": abs(a - b) / abs(b),
             "correct": int(info.correct.sum()), "mean_iterations": float(info.iterations.float().mean())}
    log(f"{name}: R ddfast {a:.10g} naive {b:.10g} (rel diff {check['rel_diff']:.1e}); "
        f"{check['correct']}/{batch} correct, mean {check['mean_iterations']:.2f} steps")

    losses = _losses()
    dev = torch.device(device)
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    state = {}
    for k in losses:
        m = copy.deepcopy(base).to(dev).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        state[k] = (m, opt)
    times = {k: [] for k in losses}
    for r in range(rounds + 1):                      # round 0 is warm-up
        i = (r % (rounds + 2)) * batch
        x, y = x_all[i:i + batch], y_all[i:i + batch]
        for k, fn in losses.items():
            if k == "naive" and r > naive_rounds:
                continue
            m, opt = state[k]
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = fn(m, x, y)
            loss.backward()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["ce"] for k in med}
    out = {"median_s": med, "min_s": {k: min(v) for k, v in times.items()},
           "ratio_to_ce": ratios, "naive_over_ddfast": med["naive"] / med["ddfast"],
           "check": check, "rounds": rounds, "naive_rounds": naive_rounds, "batch": batch}
    log(f"{name}: " + ", ".join(f"{k} {med[k] * 1e3:.1f} ms ({ratios[k]:.1f}x)" for k in med)
        + f"; naive/ddfast {out['naive_over_ddfast']:.2f}x")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--naive-rounds", type=int, default=5, help="rounds that also time the (slow) naive step")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(common.RESULTS / "deepdefense_step.json"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (the float64 value check stays on the CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # exact float32, as on the CPU (cuDNN convolutions default to TF32)
        torch.backends.cudnn.allow_tf32 = False
    results = {name: bench_model(name, args.rounds, min(args.rounds, args.naive_rounds), device=args.device)
               for name in args.models}
    payload = {"benchmark": "deepdefense_step", "lam": LAM, "c": C, "d": D, "max_iter": MAX_ITER,
               "overshoot": OVERSHOOT, "optimizer": "SGD lr 1e-3 momentum 0.9 wd 5e-4",
               "note": "full training step, batch 100, methods timed round-robin in one process; "
                       "ratios of medians to the plain cross-entropy step", "results": results}
    path = common.write_json(args.out, payload, args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
