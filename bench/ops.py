"""Speed of the fused ddfast ops per backend against the same computation as a torch
composition (:mod:`ddfast.reference`), measured in the same run on the same inputs.

    python bench/ops.py --json bench/results/ops_cpu.json                 # CPU backends
    python bench/ops.py --device cuda --json bench/results/ops_<card>.json  # GPU backends

JSON: ``{"device": ..., "rows": [{"op", "backend", "shape": {"B", "K", "C", "D"}, "ms",
"torch_ms", "speedup"}, ...], ...}`` plus, on a GPU, ``gbps`` (achieved bandwidth of the
bytes an op must move at least) and ``hbm_fraction`` for every op when the card's
peak is known (``--peak-gbps`` or the table below). Times are medians in milliseconds.
Shapes (float32, K = C = 10 candidate classes): MNIST B=256 D=784, CIFAR B=256 D=3072,
ImageNet top-10 B=32 D=150528.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402  (bench/common.py; puts the checkout on sys.path)

import ddfast  # noqa: E402
from ddfast import ops, reference  # noqa: E402

SHAPES = {"mnist": (256, 10, 10, 784), "cifar": (256, 10, 10, 3072),
          "imagenet": (32, 10, 10, 150528)}
OPS = ("select_boundary", "boundary_step", "deepdefense_penalty", "deepfool_update")
#: HBM peak (GB/s) of cards by a substring of torch.cuda.get_device_name()
HBM_PEAK = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
            "H100 NVL": 3900.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0,
            "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "B200": 8000.0, "L40S": 864.0}


def median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def make_inputs(B: int, K: int, C: int, D: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cand = torch.stack([torch.randperm(K, generator=g)[:C] for _ in range(B)])
    t = dict(device=device, dtype=dtype)
    return {
        "logits": torch.randn(B, K, generator=g).to(**t),
        "grads": (torch.randn(B, C, D, generator=g) / math.sqrt(D)).to(**t),
        "cand": cand.to(device),
        "ref": cand[:, 0].clone().to(device),
        "active": torch.ones(B, dtype=torch.bool, device=device),
        "fdiff": torch.randn(B, generator=g).to(**t),
        "w": torch.randn(B, D, generator=g).to(**t),
        "x": torch.randn(B, D, generator=g).to(**t),
        "delta": (0.01 * torch.randn(B, D, generator=g)).to(**t),
        "correct": torch.rand(B, generator=g).to(device) > 0.2,
        "r": torch.randn(B, D, generator=g).to(**t),
    }


def calls(op: str, a: Dict[str, torch.Tensor], backend: Optional[str]) -> Callable[[], object]:
    """The op on the inputs: through ``ddfast.ops`` with ``backend``, or (None) the torch
    composition of :mod:`ddfast.reference`."""
    f = getattr(ops, op) if backend else getattr(reference, op)
    kw = {"backend": backend} if backend else {}
    if op == "select_boundary":
        return lambda: f(a["logits"], a["grads"], a["cand"], a["ref"], a["active"], 2.0, 1e-4, **kw)
    if op == "boundary_step":
        return lambda: f(a["fdiff"], a["w"], 2.0, 1e-4, **kw)
    if op == "deepdefense_penalty":
        return lambda: f(a["delta"], a["x"], a["correct"], 25.0, 5.0, **kw)
    return lambda: f(a["x"], a["delta"], a["r"], a["active"], 0.02, 0.0, 1.0, **kw)


def min_bytes(op: str, B: int, C: int, D: int, elt: int) -> int:
    """Bytes the op must move at least (each input row read once, outputs written once)."""
    return {"select_boundary": (B * C * D + B * D) * elt,
            "boundary_step": 2 * B * D * elt,
            "deepdefense_penalty": 2 * B * D * elt,
            "deepfool_update": 5 * B * D * elt}[op]


def peak_gbps(device: torch.device, given: Optional[float]) -> Optional[float]:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in HBM_PEAK.items() if k in name), None)


def run(device: torch.device, backends: List[str], ops_: List[str], shapes: List[str],
        repeat: int, peak: Optional[float]) -> List[dict]:
    rows = []
    for shape in shapes:
        B, K, C, D = SHAPES[shape]
        a = make_inputs(B, K, C, D, device, torch.float32)
        for op in ops_:
            torch_ms = median_ms(calls(op, a, None), device, repeat)
            for b in backends:
                ms = median_ms(calls(op, a, b), device, repeat)
                row = {"op": op, "backend": b, "shape": {"B": B, "K": K, "C": C, "D": D},
                       "name": shape, "ms": round(ms, 4), "torch_ms": round(torch_ms, 4),
                       "speedup": round(torch_ms / ms, 3)}
                if device.type == "cuda":
                    gbps = min_bytes(op, B, C, D, 4) / (ms * 1e-3) / 1e9
                    row["gbps"] = round(gbps, 1)
                    if peak:
                        row["hbm_fraction"] = round(gbps / peak, 3)
                rows.append(row)
                print(f"{shape:9s} {op:20s} {b:7s} {ms:9.3f} ms   torch {torch_ms:9.3f} ms   "
                      f"x{torch_ms / ms:6.2f}" + (f"   {row['gbps']:8.1f} GB/s" if "gbps" in row else ""),
                      flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backends", nargs="*", help="default: every non-torch backend available")
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--peak-gbps", type=float, help="the card's HBM peak, for hbm_fraction")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or [b for b in ddfast.available_backends(device) if b != "torch"]
    load_before = os.getloadavg()
    rows = run(device, backends, args.ops, args.shapes, args.repeat, peak_gbps(device, args.peak_gbps))
    if args.json:
        payload = {"rows": rows, "repeat": args.repeat, "dtype": "float32", "norm": 2,
                   "load_average_before_after": [load_before[0], os.getloadavg()[0]]}
        if device.type == "cuda":
            payload["hbm_peak_gbps"] = peak_gbps(device, args.peak_gbps)
        print(f"wrote {write_json(args.json, payload, str(device))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
