"""Fuzz of the public ops' argument checks (``ddfast.ops.<op>``).

Each case is a valid call of one op with one or two arguments corrupted by a small grammar:
index values (huge, negative, out of range), shapes (a dim dropped or added, rows missing or
extra, empty rows), dtypes, the meta device, non-tensors, NaN / Inf / wrong-typed scalars,
NaN / Inf / huge / tiny values, and views of the same values (strided, transposed, the
negation bit). The cases run in child Pythons, many per child, so that a crash (a read out of
bounds) fails the case that caused it instead of killing the test session; the parent starts
a new child after the crashed case. In the child every case runs on every backend available
there: ``cpu``, ``torch``, and ``triton`` under ``TRITON_INTERPRET=1`` when triton is installed.

Every case must end, on every backend, either

* in the same ``ValueError`` / ``TypeError`` with the same message, naming a corrupted
  argument and short (no tensor printed), or
* in the same result (within a tolerance of the output dtype; ``l`` may differ only where the
  two classes' float64 distances tie within it);

a case that must be refused (an index out of range, a wrong shape, meta, a NaN scalar...) must
raise, and a case that only changes the layout or the integer dtype of the same values must
give exactly the result of the uncorrupted call on that backend.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

SEED = 1234
N_RANDOM = 24                 # random two-corruption cases after the single corruptions
B, K, C, D = 2, 5, 3, 4         # B small: triton's interpreter runs a program per row
HAS_TRITON = importlib.util.find_spec("triton") is not None
HERE = Path(__file__).resolve()

RAISE, BASE, ANY = "raise", "base", "any"
FLOAT_ARGS = {"logits", "grads", "fdiff", "w", "delta", "x", "x0", "r_tot", "r"}
INT_ARGS = {"cand", "ref"}
BOOL_ARGS = {"active", "correct"}
OPS = ("select_boundary", "select_boundary_diff", "boundary_step", "deepdefense_penalty",
       "deepfool_update")


# ------------------------------------------------------------------------ the valid calls
def base_args(op: str, tg: torch.Generator) -> dict:
    """The valid arguments of ``op`` (float32, B = 2 samples), in the op's parameter order."""
    rnd = lambda *shape: torch.randn(*shape, generator=tg)
    if op.startswith("select_boundary"):
        diff = op.endswith("diff")
        perm = torch.stack([torch.randperm(K, generator=tg) for _ in range(B)])
        ref = perm[:, 0].clone()
        cand = perm[:, 1:C + 1] if diff else perm[:, :C]          # diff: ref absent, C candidates
        return dict(logits=rnd(B, K), grads=rnd(B, C, D), cand=cand, ref=ref,
                    active=torch.tensor([True, False]), norm=2, eps=1e-4, diff=diff)
    if op == "boundary_step":
        return dict(fdiff=rnd(B), w=rnd(B, D), norm=2, eps=1e-4)
    if op == "deepdefense_penalty":
        return dict(delta=0.1 * rnd(B, D), x=rnd(B, D), correct=torch.tensor([True, False]),
                    c=25.0, d=5.0)
    return dict(x0=rnd(B, D), r_tot=0.1 * rnd(B, D), r=0.1 * rnd(B, D),
                active=torch.tensor([True, False]), overshoot=0.02, lo=-1.5, hi=1.5)


# ------------------------------------------------------------------------------ the grammar
def _same_values_views(t: torch.Tensor):
    """(label, view) pairs holding t's values in another layout."""
    out = []
    if t.dim() >= 1 and t.numel():
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        out.append(("step-2 view", big[..., ::2]))
    if t.dim() >= 2:
        out.append(("transposed storage", t.transpose(0, -1).contiguous().transpose(0, -1)))
    if hasattr(torch, "_neg_view") and t.dtype != torch.bool:
        out.append(("negation-bit view", torch._neg_view(-t)))
    return out


def _with_values(t: torch.Tensor, g: random.Random, value) -> torch.Tensor:
    t = t.clone()
    if t.numel():
        flat = t.view(-1)
        for _ in range(g.randint(1, 2)):
            flat[g.randrange(flat.numel())] = value
    return t


def tensor_productions(name: str, t: torch.Tensor, op: str, g: random.Random):
    """(label, new value, expectation) for a tensor argument."""
    may_be_none = name == "active" and op.startswith("select_boundary")
    out = [("meta", t.to("meta"), RAISE), ("a list", t.tolist(), RAISE),
           ("None", None, ANY if may_be_none else RAISE),
           ("a dim dropped", t[0] if t.dim() == 1 else t.flatten(0, 1), RAISE),
           ("a dim added", t[None], RAISE), ("a row missing", t[:-1], RAISE),
           ("a row more", torch.cat([t, t[:1]]), RAISE), ("no rows", t[:0], RAISE)]
    out += [(label, v, BASE) for label, v in _same_values_views(t)]
    if name in FLOAT_ARGS:
        if t.dim() >= 2:
            out.append(("last dim doubled", torch.cat([t, t], -1), ANY))
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            out.append((f"dtype {dt}", t.to(dt), ANY))
        for dt in (torch.int64, torch.bool, torch.complex64) + tuple(
                getattr(torch, n) for n in ("float8_e4m3fn",) if hasattr(torch, n)):
            out.append((f"dtype {dt}", t.to(dt), RAISE))
        out += [("NaN entries", _with_values(t, g, math.nan), ANY),
                ("Inf entries", _with_values(t, g, g.choice([math.inf, -math.inf])), ANY),
                ("times 1e30", t * 1e30, ANY), ("times 1e-30", t * 1e-30, ANY),
                ("one row repeated", t[:1].expand_as(t), ANY)]
    if name in INT_ARGS:
        for v in (K, -1, 10**6, 2**31, 2**40, -2**40, 2**63 - 1, -2**63):
            out.append((f"an entry {v}", _with_values(t, g, v), RAISE))
        for dt in (torch.int32, torch.uint8):
            out.append((f"dtype {dt}", t.to(dt), BASE))
        for dt in (torch.float32, torch.bool) + tuple(
                getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)):
            try:
                out.append((f"dtype {dt}", t.to(dt), RAISE))
            except (RuntimeError, TypeError):   # a dtype this torch cannot convert to
                pass
    if name in BOOL_ARGS:
        out += [("dtype int64", t.long(), RAISE), ("dtype float32", t.float(), RAISE),
                ("all False", torch.zeros_like(t), ANY), ("all True", torch.ones_like(t), ANY)]
    return out


def scalar_productions(name: str, value, g: random.Random):
    """(label, new value, expectation) for a scalar argument."""
    np = _numpy()
    bad_type = [("a string", "0.5", RAISE), ("True", True, RAISE), ("a list", [value], RAISE)]
    if name == "norm":
        return bad_type + [("1", 1, RAISE), ("3", 3, RAISE), ("'l1'", "l1", RAISE), ("None", None, RAISE),
                           ("NaN", math.nan, RAISE), ("inf", math.inf, ANY), ("'linf'", "linf", ANY),
                           ("np.float64(2)", np.float64(2), BASE), ("np.int64(2)", np.int64(2), BASE)]
    if name == "diff":
        return [("'yes'", "yes", RAISE), ("1", 1, RAISE), ("None", None, RAISE),
                ("np.bool_", np.bool_(value), BASE)]
    if name in ("lo", "hi"):
        return bound_productions(name, g)
    out = bad_type + [("NaN", math.nan, RAISE), ("inf", math.inf, RAISE), ("-inf", -math.inf, RAISE),
                      ("None", None, RAISE), (f"np.float64({value})", np.float64(value), BASE),
                      (f"np.float32({value})", np.float32(value), ANY)]
    if name == "eps":
        out += [("-1", -1.0, RAISE), ("-1e-300", -1e-300, RAISE), ("np.int64(0)", np.int64(0), ANY)]
    if name in ("c", "d"):
        out += [(f"np.int64({int(value)})", np.int64(int(value)), BASE)]
    return out


def bound_productions(name: str, g: random.Random):
    """(label, lo or hi, expectation) for deepfool_update's bounds."""
    np = _numpy()
    sign = -1.0 if name == "lo" else 1.0
    row = sign * (torch.rand(D) + 0.5)
    rows = sign * (torch.rand(B, D) + 0.5)
    nan_rows = rows.clone()
    nan_rows[g.randrange(B), g.randrange(D)] = math.nan
    return [("None", None, ANY), ("NaN", math.nan, RAISE), ("a string", "0", RAISE), ("True", True, RAISE),
            ("inf", sign * math.inf, ANY), ("-inf bound", -sign * math.inf, ANY),
            ("np.float32", np.float32(sign * 0.5), ANY), ("np.int64", np.int64(int(sign)), ANY),
            ("[D]", row, ANY), ("[1, D]", row[None], ANY), ("[B, D]", rows, ANY),
            ("0-d", torch.tensor(sign * 0.5), ANY), ("[B, D] int64", rows.long(), ANY),
            ("[B, D] float64", rows.double(), ANY), ("[B, D] step-2 view", _same_values_views(rows)[0][1], ANY),
            ("[B + 1, D]", torch.cat([rows, rows[:1]]), RAISE), ("[D, 1]", row[:, None], RAISE), ("[B, D + 1]", torch.cat([rows, rows[:, :1]], 1), RAISE),
            ("[B, D] with NaN", nan_rows, RAISE), ("meta", rows.to("meta"), RAISE),
            ("bool", rows > 0, RAISE), ("complex", rows.to(torch.complex64), RAISE), ("a list", rows.tolist(), RAISE),
            ("beyond the other bound", -sign * (rows.abs() + 3.0), RAISE)]


def _numpy():
    import numpy
    return numpy


def productions(op: str, args: dict, name: str, g: random.Random):
    v = args[name]
    if isinstance(v, torch.Tensor):
        return tensor_productions(name, v, op, g)
    return scalar_productions(name, v, g)


def make_cases(seed: int = SEED, n_random: int = N_RANDOM):
    """[(op, args, expectation, corrupted names, description)]: every single corruption of
    every argument of every op, then ``n_random`` random pairs (at most one that must raise)."""
    g = random.Random(seed)
    tg = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                          # the bounds' values
    cases = []
    for op in OPS:
        args = base_args(op, tg)
        for name in args:
            for label, value, expect in productions(op, args, name, g):
                cases.append((op, {**args, name: value}, expect, {name}, f"{op}: {name} = {label}"))
    for _ in range(n_random):
        op = g.choice(OPS)
        args = base_args(op, tg)
        a, b = g.sample(list(args), 2)
        pa = g.choice(productions(op, args, a, g))
        pb = g.choice([p for p in productions(op, args, b, g) if p[2] != RAISE] or [None])
        if pb is None:
            continue
        new = {**args, a: pa[1], b: pb[1]}
        expect = RAISE if RAISE in (pa[2], pb[2]) else BASE if pa[2] == pb[2] == BASE else ANY
        cases.append((op, new, expect, {a, b}, f"{op}: {a} = {pa[0]}, {b} = {pb[0]}"))
    return cases


# --------------------------------------------------------------------------- the child side
def run_call(op: str, args: dict, backend: str):
    """('ok', outputs tuple) or ('raise', type name, message)."""
    from ddfast import ops
    fn = getattr(ops, "select_boundary" if op.startswith("select_boundary") else op)
    try:
        out = fn(**args, backend=backend)
    except Exception as exc:       # noqa: BLE001  (every exception is the outcome under test)
        return ("raise", type(exc).__name__, str(exc))
    return ("ok", out if isinstance(out, tuple) else (out,))


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)


def _work_tol(args: dict) -> float:
    """The tolerance of the narrowest float dtype among the float tensor arguments (the
    precision a backend may compute in)."""
    return max([_tol(v.dtype) for n, v in args.items() if n in FLOAT_ARGS and isinstance(v, torch.Tensor)
                and v.is_floating_point()] or [1e-9])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return False
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    keep = ~torch.isnan(a)
    a, b = a[keep], b[keep]
    inf = torch.isinf(b)
    if not torch.equal(a[inf], b[inf]):
        return False
    a, b = a[~inf], b[~inf]
    if not b.numel():
        return True
    scale = float(b.abs().max())
    return bool(((a - b).abs() <= tol * b.abs() + tol * scale + 1e-30).all())


def _dist64(args: dict, l: torch.Tensor) -> torch.Tensor:
    """[B] float64 distance of the class l[i] in each row (the reference's rule)."""
    from ddfast import reference
    from ddfast.validate import norm_value
    logits, grads = args["logits"].double(), args["grads"].double()
    cand, ref = args["cand"].long(), args["ref"].long()
    rows = torch.arange(grads.shape[0])
    pos = (cand == l[:, None]).long().argmax(1)
    w = grads[rows, pos]
    if not args["diff"]:
        w = w - grads[rows, (cand == ref[:, None]).long().argmax(1)]
    n = reference.dual_norm(w, norm_value(args["norm"]))
    f = (logits[rows, l] - logits[rows, ref]).abs()
    d = torch.where(n > 0, f / torch.where(n > 0, n, torch.ones_like(n)), torch.full_like(n, math.inf))
    return torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)


def same_result(op: str, args: dict, got: tuple, want: tuple) -> str:
    """'' when the outputs agree (see the module docstring), else why not."""
    if len(got) != len(want):
        return f"{len(got)} outputs vs {len(want)}"
    for a, b in zip(got, want):
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return f"output {a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)}"
    keep, tol = None, _work_tol(args)
    if op.startswith("select_boundary"):
        same = got[0] == want[0]
        if not bool(same.all()):
            da, db = _dist64(args, got[0]), _dist64(args, want[0])
            tie = torch.isclose(da, db, rtol=tol, atol=0) | (torch.isinf(da) & torch.isinf(db))
            if not bool(tie[~same].all()):
                return f"l {got[0].tolist()} vs {want[0].tolist()}: not a tie"
        keep = same
    for k, (a, b) in enumerate(zip(got, want)):
        if not a.is_floating_point():
            if keep is None and not torch.equal(a, b):
                return f"output {k} differs"
            continue
        if keep is not None:
            a, b = a[keep], b[keep]
        t = max(tol, _tol(a.dtype))
        if not _close(a, b, t):
            return f"output {k} differs by more than {t}"
    return ""


def identical(got: tuple, want: tuple) -> bool:
    return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
               and torch.equal(torch.isnan(a), torch.isnan(b)) if a.is_floating_point() else torch.equal(a, b)
               for a, b in zip(got, want))


def judge(op: str, args: dict, expect: str, names: set, base: dict, backends) -> str:
    """'' when the case behaves (module docstring) on every backend, else why not."""
    outcomes = {}
    for b in backends:
        out = run_call(op, args, b)
        if out[0] == "raise" and "cannot run here" in out[2]:
            continue                                # a dtype this backend does not take
        outcomes[b] = out
    if not outcomes:
        return "no backend ran the case"
    kinds = {o[0] for o in outcomes.values()}
    if len(kinds) > 1:
        return "backends disagree: " + "; ".join(f"{b}: {o[0]} {o[1] if o[0] == 'raise' else ''}"
                                                  for b, o in outcomes.items())
    first_b, first = next(iter(outcomes.items()))
    if first[0] == "raise":
        for b, o in outcomes.items():
            if o[1:] != first[1:]:
                return f"{b} raised {o[1]}({o[2]!r}), {first_b} {first[1]}({first[2]!r})"
        if first[1] not in ("ValueError", "TypeError"):
            return f"raised {first[1]}: {first[2][:300]}"
        if not any(n in first[2] for n in names):
            return f"the message names none of {sorted(names)}: {first[2][:300]!r}"
        if len(first[2]) > 400:
            return f"message of {len(first[2])} characters (a tensor printed?)"
        return ""
    if expect == RAISE:
        return "accepted, but must be refused"
    for b, o in outcomes.items():
        why = same_result(op, args, o[1], first[1])
        if why:
            return f"{b} vs {first_b}: {why}"
        if expect == BASE and not identical(o[1], base[b]):
            return f"{b}: not the result of the uncorrupted call"
    return ""


def child(start: int) -> None:
    """Run the cases from ``start`` on, one JSON line before ('start') and after each."""
    import ddfast
    backends = ["torch", "cpu"] + (["triton"] if "triton" in ddfast.available_backends("cpu") else [])
    print(json.dumps({"backends": backends}), flush=True)
    cases = make_cases()
    cache = {}
    for i in range(start, len(cases)):
        op, args, expect, names, desc = cases[i]
        print(json.dumps({"start": i}), flush=True)
        base = _base_for(op, args, names, backends, cache) if expect == BASE else None
        why = judge(op, args, expect, names, base, backends)
        print(json.dumps({"done": i, "desc": desc, "why": why}), flush=True)
    print(json.dumps({"end": len(cases)}), flush=True)


def _base_for(op: str, args: dict, names: set, backends, cache: dict) -> dict:
    """The outputs of the call with the corrupted arguments given back their plain values
    (cached by the identity of the untouched arguments: the cases of one base share them)."""
    np = _numpy()
    clean = dict(args)
    for n in names:
        v = args[n]
        if isinstance(v, torch.Tensor):
            clean[n] = v.resolve_neg().contiguous().long() if n in INT_ARGS else v.resolve_neg().contiguous()
        elif isinstance(v, np.generic):
            clean[n] = v.item()
    key = (op, tuple(sorted(names)), tuple(id(v) for n, v in args.items() if n not in names))
    if key not in cache:
        cache[key] = {b: run_call(op, clean, b)[1] for b in backends}
    return cache[key]


# -------------------------------------------------------------------------- the parent side
def run_children(env) -> tuple:
    """(results by case, crashes, number of cases, backends): children run until every case ran,
    each crash (a child that died mid-case) recorded and skipped."""
    results, crashes, start, total, backends = {}, [], 0, None, None
    while total is None or start < total:
        proc = subprocess.run([sys.executable, str(HERE), str(start)], env=env, cwd=str(HERE.parent),
                              capture_output=True, text=True, timeout=600)
        started = None
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            backends = rec.get("backends", backends)
            if "start" in rec:
                started = rec["start"]
            if "done" in rec:
                results[rec["done"]] = rec
                started = None
            if "end" in rec:
                total = rec["end"]
        if total is not None and started is None:
            break
        if started is None:
            raise AssertionError(f"the fuzz child failed before any case (rc {proc.returncode}): "
                                 f"{proc.stderr[-3000:]}")
        crashes.append((started, proc.returncode, proc.stderr[-500:]))
        start = started + 1
        if total is None:
            total = len(make_cases())
    return results, crashes, total, backends


def test_fuzz_op_arguments():
    from conftest import child_env
    env = child_env(TRITON_INTERPRET="1") if HAS_TRITON else child_env()
    env.pop("DDFAST_BACKEND", None)
    results, crashes, total, backends = run_children(env)
    cases = make_cases()
    assert total == len(cases) and len(results) + len(crashes) == total
    assert {"torch", "cpu"} <= set(backends) and (not HAS_TRITON or "triton" in backends), backends
    problems = [f"case {i} ({cases[i][4]}): crashed the child (rc {rc}) {err}" for i, rc, err in crashes]
    problems += [f"case {i} ({r['desc']}): {r['why']}" for i, r in sorted(results.items()) if r["why"]]
    assert not problems, f"{len(problems)} of {total} cases misbehave:\n" + "\n".join(problems[:40])


if __name__ == "__main__":
    child(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
