"""DeepFool on a test-set-sized batch with ``batch_size=None`` (memory-bounded chunks): the
CIFAR-shaped ConvNet on N MNIST images placed in 3x32x32, one call, with the chunk size the
budget chose and the process's peak memory.

    python bench/memory_bound.py [--n 10000] [--model convnet] [--json bench/results/memory_bound.json]
    python bench/memory_bound.py --model lenet --n 2000 --compare 100,250,500,None --json FILE

``--compare``: instead, time the same call at each ``batch_size`` (None: the budget's), one after
another in one process, and record img/s per chunking.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import ddfast  # noqa: E402
from ddfast import budget  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--json", default=str(common.RESULTS / "memory_bound.json"))
    ap.add_argument("--compare", default="", help="batch sizes to time side by side, e.g. 100,500,None")
    args = ap.parse_args(argv)
    model = common.trained_model(args.model)
    x = common.mnist_test(args.n, model=args.model)[0]
    if args.compare:
        return compare(model, x, args)
    rows = x.shape[0]
    k = model(x[:1]).shape[1]
    per_sample = budget.sample_bytes(model, x[:1], k)
    chunk = budget.chunk_size(model, x, k)
    t = time.perf_counter()
    res = ddfast.deepfool(model, x, bounds=(0.0, 1.0))
    seconds = time.perf_counter() - t
    out = {"bench": "memory_bound", "model": args.model, "n_images": rows,
           "budget_bytes": budget.memory_budget(x.device),
           "sample_bytes_estimate": per_sample, "chunk_size": chunk, "seconds": seconds, "img_per_s": rows / seconds,
           "rho2": float((res.norms() / x.flatten(1).norm(dim=1)).mean()), "fooled": float(res.success.float().mean()),
           "command": "python bench/memory_bound.py " + " ".join(argv or sys.argv[1:]), **common.peak_memory("cpu")}
    common.write_json(args.json, out)
    print({k: out[k] for k in ("n_images", "chunk_size", "seconds", "peak_mib", "fooled")})


def compare(model, x, args) -> None:
    """img/s of ``deepfool(model, x, bounds=(0, 1), batch_size=b)`` for each b of ``--compare``."""
    rows = []
    for b in args.compare.split(","):
        bs = None if b == "None" else int(b)
        t = time.perf_counter()
        res = ddfast.deepfool(model, x, bounds=(0.0, 1.0), batch_size=bs)
        seconds = time.perf_counter() - t
        rows.append({"batch_size": bs, "chunk": bs or budget.chunk_size(model, x, model(x[:1]).shape[1]),
                     "seconds": seconds, "img_per_s": x.shape[0] / seconds,
                     "rho2": float((res.norms() / x.flatten(1).norm(dim=1)).mean())})
        print(rows[-1], flush=True)
    common.write_json(args.json, {"bench": "memory_bound_compare", "model": args.model, "n_images": x.shape[0],
                                  "command": "python bench/memory_bound.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
