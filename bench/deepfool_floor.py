"""How close ddfast.deepfool is to what exact DeepFool cannot avoid, on CPU.

Trained MNIST MLP 784-500-150-10, the first N test images ([0, 1] pixels, mean subtracted
inside the model). Three timings, side by side in one run, medians of R interleaved runs:

* ``ddfast``: ``ddfast.deepfool(model, x)`` (max_iter 50, overshoot 0.02, all classes);
* ``floor``: only the class-gradient Jacobians (graph forward + a backward with the K-1
  directions ``e_k - e_ref``, the rows DeepFool's step needs, by the fastest route) for the
  same active-set sizes as ddfast's iterations: at step t, the samples not yet fooled. Exact
  DeepFool needs at least these;
* ``floor_check``: ``floor`` plus the one forward per sample at its last iterate that
  tells that it is done (also unavoidable: the floor alone never evaluates the model at
  the adversarial point of a sample that stops);
* ``naive``: :func:`ddfast.reference.deepfool_ref` (the spec), per-class ``autograd.grad`` with a
  masked exit.

With ``--clip`` ddfast reuses the Jacobian rows of samples whose activation pattern did not
change (:mod:`ddfast.regions`), so it needs fewer than the floor assumes and may run below it;
``ddfast_no_reuse`` times it with that turned off. ``jacobian_samples`` against ``sample_steps``
says for how many sample-steps ddfast took fresh Jacobians (K-1 rows each; where nearly all of a
graph batch needs them, the backward still runs over the whole batch, with zero directions on
the rest).

``--clip`` keeps the iterates in [0, 1] (as the peer comparison does; the naive DeepFool
cannot clip and is left out) and ``--batch-size B`` attacks in batches of B, both to measure
the setting of ``deepfool_throughput.py``.

Usage: ``python bench/deepfool_floor.py [--n 2000] [--repeat 5] [--clip] [--batch-size B] [--json FILE]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ddfast  # noqa: E402
from ddfast import attack as attack_module  # noqa: E402
from ddfast import jacobian  # noqa: E402
from ddfast.attack import concat_results  # noqa: E402
from ddfast.jacobian import competing_classes  # noqa: E402
from ddfast.reference import deepfool_ref  # noqa: E402


def active_sizes(res) -> list:
    """Samples still active at each step: step t runs on those with iterations > t."""
    it = res.iterations
    return [int((it > t).sum()) for t in range(int(it.max()))] if it.numel() else []


def floor_time(model, chunks, with_final_check=False):
    """The floor of every chunk ``(x, sizes, cand, ref)``: per step, the graph forward and the
    K-1 difference rows of the samples still active (the first ``n``: the same count, the
    work does not depend on which samples they are)."""
    def run():
        for x, sizes, cand, ref in chunks:
            shape = x.shape[1:]
            flat = x.flatten(1)
            with torch.enable_grad():
                for n in sizes:
                    xg, logits = jacobian.forward_with_graph(model, flat[:n], shape)
                    jacobian.class_grads(model, xg, logits, cand[:n], None, shape=shape, minus=ref[:n],
                                         method="batched")
            if with_final_check:
                finishing = [a - b for a, b in zip(sizes, sizes[1:] + [0])]   # samples whose last step is t
                with torch.no_grad():
                    for n in finishing:
                        if n:
                            model(x[:n])
    return run


def rho2(delta, x, mask):
    r = delta.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    return float(r[mask].mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clip", action="store_true", help="keep iterates in [0, 1] (no naive row)")
    ap.add_argument("--batch-size", type=int, default=None, help="attack in batches of this size (default: all)")
    ap.add_argument("--json", default=str(common.RESULTS / "deepfool_floor.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = common.trained_model("mlp")
    x, _ = common.mnist_test(args.n)
    bounds = (0.0, 1.0) if args.clip else None
    step = args.batch_size or len(x)
    xs = [x[i:i + step] for i in range(0, len(x), step)]

    def attack(reuse=True):
        return concat_results([ddfast.deepfool(model, xb, bounds=bounds, reuse_jacobians=reuse) for xb in xs])

    def attack_no_reuse():
        return attack(reuse=False)

    fresh, computed = attack_module._fresh_rows, [0]

    def counted(*a):
        g = fresh(*a)
        computed[0] += g.shape[0]
        return g
    attack_module._fresh_rows = counted
    try:
        res = attack()
    finally:
        attack_module._fresh_rows = fresh
    chunks = []
    for i, xb in enumerate(xs):
        with torch.no_grad():
            logits = model(xb)
        ref = logits.argmax(1)
        part = ddfast.DeepFoolResult(*(t[i * step:(i + 1) * step] for t in (
            res.delta, res.x_adv, res.iterations, res.success, res.label, res.adv_label)))
        chunks.append((xb, active_sizes(part), competing_classes(logits, ref, None), ref))
    sizes = [s for c in chunks for s in c[1]]
    fns = {
        "ddfast": attack,
        "floor": floor_time(model, chunks),
        "floor_check": floor_time(model, chunks, with_final_check=True),
    }
    if args.clip:
        fns["ddfast_no_reuse"] = attack_no_reuse
    else:
        fns["naive"] = lambda: deepfool_ref(model, x)
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(args.repeat):            # interleaved, so drifts in machine load hit all
        for k, fn in fns.items():
            t, outs[k] = common.timed(fn)
            times[k].append(t)
    # Medians: single runs of these memory-heavy loops vary by +-30% here (fresh 62 MB
    # Jacobians are page-faulted in, sometimes as huge pages), so a best-of would compare
    # one lucky run against another.
    best = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    rows = {
        "ddfast_s": best["ddfast"], "floor_s": best["floor"], "floor_check_s": best["floor_check"],
        "ddfast_over_floor": best["ddfast"] / best["floor"],
        "ddfast_over_floor_check": best["ddfast"] / best["floor_check"],
        "rho2_ddfast": rho2(res.delta, x, res.success), "fooled_ddfast": float(res.success.float().mean()),
        "mean_iterations": float(res.iterations.float().mean()), "active_sizes": sizes,
        "sample_steps": int(res.iterations.sum()), "jacobian_samples": computed[0],
        "min_s": fastest,
        "min_ratio_ddfast_over_floor": fastest["ddfast"] / fastest["floor"],
    }
    if "ddfast_no_reuse" in outs:
        rows.update({"ddfast_no_reuse_s": best["ddfast_no_reuse"],
                     "ddfast_no_reuse_over_floor": best["ddfast_no_reuse"] / best["floor"],
                     "no_reuse_over_ddfast": best["ddfast_no_reuse"] / best["ddfast"],
                     "same_result_without_reuse": bool(torch.equal(outs["ddfast_no_reuse"].delta, res.delta))})
    if "naive" in outs:
        delta, n_it, fooled = outs["naive"][:3]
        rows.update({"naive_s": best["naive"], "naive_over_ddfast": best["naive"] / best["ddfast"],
                     "rho2_naive": rho2(delta, x, fooled), "fooled_naive": float(fooled.float().mean())})
    payload = {"bench": "deepfool_floor", "model": "mlp 784-500-150-10", "n_images": args.n,
               "bounds": bounds, "batch_size": args.batch_size,
               "repeat": args.repeat, "threads": torch.get_num_threads(), "timing": "median of repeat runs, interleaved (min_s: the fastest run of each)", **rows}
    path = common.write_json(args.json, payload)
    for k in ("ddfast_s", "floor_s", "floor_check_s", "naive_s", "ddfast_over_floor",
              "ddfast_over_floor_check", "naive_over_ddfast", "ddfast_no_reuse_s", "ddfast_no_reuse_over_floor",
              "no_reuse_over_ddfast", "sample_steps", "jacobian_samples",
              "rho2_ddfast", "rho2_naive", "fooled_ddfast", "fooled_naive", "mean_iterations"):
        if k in rows:
            print(f"{k:>20}: {rows[k]:.4f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
