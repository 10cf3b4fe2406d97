"""Conformance of every ddfast backend to :mod:`ddfast.reference`, and backend choice.

The rule (DESIGN.md "Tolerances"): on the same inputs, a backend running in float32
passes when, elementwise, ``|backend - ref64| <= 2 * |ref32 - ref64| + 1e-6`` where
``ref64`` is the reference in float64 and ``ref32`` the reference in float32. For float16
and bfloat16 outputs the same rule holds on the largest error of each output tensor (the
form FlashAttention uses): there one rounding of the output is as large as the errors
compared, so elementwise the half-precision reference is sometimes luckily closer.
float64 backends must match ``ref64`` to rounding. ``l`` must equal the float64 reference's choice except where the two
candidates' float64 distances tie within float32 rounding (rel. 1e-5).

Backends x devices: ``cpu`` on CPU; ``triton`` on CPU only under ``TRITON_INTERPRET=1``
(``tests/test_triton.py`` runs this module's triton cases in such a subprocess, because
the variable must be set before triton is imported and it would make every other test of
the session pick the interpreted backend); ``triton`` and ``cuda`` on a GPU (marked gpu).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import ddfast
from ddfast import backends, ops, reference, validate

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
NORMS = [2.0, math.inf]
LOW = (torch.float32, torch.float16, torch.bfloat16)

COMBOS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interpret"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]


def need(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip, saying why, unless ``backend`` runs ``device`` tensors of ``dtype`` here."""
    if device == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA device")
    if backend == "triton" and device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU runs only under TRITON_INTERPRET=1: tests/test_triton.py "
                    "runs these cases in such a subprocess")
    if backend not in ddfast.available_backends(device, dtype):
        pytest.skip(f"backend {backend!r} does not take {device} {dtype} here "
                    f"({backends._load_errors.get(backend, 'unsupported dtype')})")


def dtypes_of(backend: str):
    return [torch.float32, torch.float64] if backend == "cpu" else list(LOW)


def shapes_of(backend: str, device: str):
    """(B, K, C, D): B = 1, C = 2, D = 1, D not a multiple of any block; the compiled CPU
    backend also gets long rows (split across threads) that the interpreter would crawl on."""
    small = [(1, 2, 2, 1), (3, 7, 4, 37), (4, 10, 10, 50), (2, 12, 12, 3)]
    if backend == "cpu" or device == "cuda":
        small += [(1, 10, 3, 5003), (9, 10, 5, 1500)]
    if device == "cuda":
        small += [(2, 10, 10, 150528 + 7), (300, 10, 10, 785)]
    return small


# ------------------------------------------------------------------------------ comparison
def assert_rule(out: torch.Tensor, ref_lo: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """DESIGN.md's tolerance rule, elementwise; infinities must agree exactly."""
    out64, lo64 = out.double().cpu(), ref_lo.double().cpu()
    ref64 = ref64.cpu()
    inf = torch.isinf(ref64)          # must be the same inf; a finite ref64 that the dtype
    assert torch.equal(out64[inf], ref64[inf]), f"{what}: infinities differ"  # cannot hold
    # may be inf in the output only where the reference in that dtype overflows too (below)
    fin = ~inf
    err = (out64[fin] - ref64[fin]).abs()
    bound = 2 * (lo64[fin] - ref64[fin]).abs() + 1e-6
    if ref64.dtype == out.dtype == torch.float64:
        bound = 1e-10 * ref64[fin].abs() + 1e-12
    assert not torch.isnan(err).any(), f"{what}: NaN"
    if out.dtype in (torch.float16, torch.bfloat16) and err.numel():
        # Half outputs: a single rounding of the output is as large as the errors compared,
        # so elementwise the reference can be luckily closer; FlashAttention's own form of the
        # rule compares the largest errors of the tensor.
        err, bound = err.max(), 2 * (lo64[fin] - ref64[fin]).abs().max() + 1e-6
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off; worst error "
                           f"{float((err - bound).max()):.3g} over the bound")


def all_dists64(logits, grads, cand, ref, norm, diff=False):
    """[B, C] float64 distances of every candidate (inf for ref and w == 0)."""
    lg, g = logits.double().cpu(), grads.double().cpu()
    cand, ref = cand.cpu(), ref.cpu()
    B = g.shape[0]
    pos = (cand == ref[:, None]).long().argmax(1)
    w = g if diff else g - g[torch.arange(B), pos][:, None]
    n = reference.dual_norm(w, norm)
    f = (lg.gather(1, cand) - lg.gather(1, ref[:, None])).abs()
    d = torch.where(n > 0, f / torch.where(n > 0, n, torch.ones_like(n)), torch.full_like(n, math.inf))
    return torch.where(cand == ref[:, None], torch.full_like(d, math.inf), d)


# ----------------------------------------------------------------------------- case makers
def select_case(B, K, C, D, dtype, device, kind="random", seed=0):
    """Inputs of select_boundary. kinds: random; inactive (all rows off); zero (row 0: every
    w == 0; row 1: one candidate equal to the reference); strided (grads a transposed view)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=gen) * 3
    cand = torch.stack([torch.randperm(K, generator=gen)[:C] for _ in range(B)])
    ref = cand[torch.arange(B), torch.randint(0, C, (B,), generator=gen)]
    if kind == "strided":
        grads = torch.randn(C, B, D, generator=gen).transpose(0, 1)
    else:
        grads = torch.randn(B, C, D, generator=gen)
    grads = grads / math.sqrt(D)
    active = torch.rand(B, generator=gen) > 0.25
    active[0] = True
    if kind == "inactive":
        active[:] = False
    if kind == "zero":
        grads[0] = grads[0, :1].clone()
        if B > 1:
            pos = int((cand[1] == ref[1]).nonzero()[0])
            grads[1, (pos + 1) % C] = grads[1, pos]
            active[1] = True
    to = dict(device=device)
    return (logits.to(dtype=dtype, **to), grads.to(dtype=dtype, **to), cand.to(**to),
            ref.to(**to), active.to(**to))


# ------------------------------------------------------------------------ select_boundary
def without_ref(args):
    """The difference form's usual inputs: each row's reference column dropped from cand and
    grads ([B, C - 1]; the grads rows then stand for g_cand - g_ref)."""
    logits, grads, cand, ref, active = args
    keep = cand != ref[:, None]
    B, C, D = grads.shape
    return logits, grads[keep].view(B, C - 1, D), cand[keep].view(B, C - 1), ref, active


def check_select(backend, args, norm, diff=False):
    logits, grads, cand, ref, active = args
    l, dist, r = ops.select_boundary(logits, grads, cand, ref, active, norm, diff=diff, backend=backend)
    assert l.dtype == torch.int64 and dist.dtype == logits.dtype and r.dtype == grads.dtype
    assert r.shape == grads.shape[::2] and l.shape == dist.shape == ref.shape
    l64, dist64, r64 = reference.select_boundary(logits.double(), grads.double(), cand, ref, active, norm,
                                                 diff=diff)
    l_lo, dist_lo, r_lo = reference.select_boundary(logits, grads, cand, ref, active, norm, diff=diff)
    same = l == l64
    if not bool(same.all()):  # allowed only on ties within float32 rounding
        d = all_dists64(logits, grads, cand, ref, norm, diff)
        rows = (~same).nonzero().flatten().cpu()
        for i in rows.tolist():
            pb = int((cand[i] == l[i]).nonzero()[0])
            pr = int((cand[i] == l64[i]).nonzero()[0])
            assert math.isclose(d[i, pb], d[i, pr], rel_tol=1e-5), (
                f"row {i}: l {int(l[i])} (dist {float(d[i, pb])}) vs reference {int(l64[i])} "
                f"(dist {float(d[i, pr])}): not a tie")
    keep = same.cpu()
    assert_rule(dist.cpu()[keep], dist_lo.cpu()[keep], dist64.cpu()[keep], "dist")
    assert_rule(r.cpu()[keep], r_lo.cpu()[keep], r64.cpu()[keep], "r")
    assert not torch.isnan(r).any()
    return l, dist, r


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("norm", NORMS)
def test_select_boundary_conforms(backend, device, norm):
    for dtype in dtypes_of(backend):
        need(backend, device, dtype)
        for s, (B, K, C, D) in enumerate(shapes_of(backend, device)):
            check_select(backend, select_case(B, K, C, D, dtype, device, seed=s), norm)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("ref_in_cand", [False, True], ids=["ref-absent", "ref-present"])
def test_select_boundary_difference_form_conforms(backend, device, norm, ref_in_cand):
    """diff=True: the rows are the boundary normals themselves; a candidate equal to ref (when
    present) is skipped, whatever its row holds."""
    for dtype in dtypes_of(backend):
        need(backend, device, dtype)
        for s, (B, K, C, D) in enumerate(shapes_of(backend, device)):
            args = select_case(B, K, C, D, dtype, device, seed=s)
            check_select(backend, args if ref_in_cand else without_ref(args), norm, diff=True)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("kind", ["inactive", "zero", "strided"])
def test_select_boundary_special_rows(backend, device, kind):
    need(backend, device)
    for norm in NORMS:
        args = select_case(5, 9, 6, 41, torch.float32, device, kind=kind, seed=3)
        l, dist, r = check_select(backend, args, norm)
        active = args[4]
        if kind == "inactive":
            assert torch.equal(l, args[3]) and not dist.any() and not r.any()
        if kind == "zero":  # every w zero: dist inf, r 0, l the first candidate (torch.argmin)
            assert math.isinf(float(dist[0])) and not r[0].any() and int(l[0]) == int(args[2][0, 0])
        assert not r[~active].any()


@pytest.mark.parametrize("backend,device", COMBOS)
def test_select_boundary_exact_ties_take_first_index(backend, device):
    """Two candidates with identical logits and gradients tie exactly: the first wins."""
    need(backend, device)
    logits, grads, cand, ref, active = select_case(3, 8, 6, 23, torch.float32, device, seed=5)
    for i in range(3):
        others = [j for j in range(6) if cand[i, j] != ref[i]]
        a, b = others[1], others[3]                    # make b a copy of a
        grads[i, b] = grads[i, a]
        logits[i, cand[i, b]] = logits[i, cand[i, a]]
        logits[i, cand[i, a]] = logits[i, ref[i]] - 1e-3   # and the pair the closest boundary
        logits[i, cand[i, b]] = logits[i, ref[i]] - 1e-3
    active[:] = True
    for norm in NORMS:
        l, _, _ = ops.select_boundary(logits, grads, cand, ref, active, norm, backend=backend)
        l64, _, _ = reference.select_boundary(logits.double(), grads.double(), cand, ref, active, norm)
        assert torch.equal(l, l64)


# -------------------------------------------------------------------------- boundary_step
@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_step_conforms(backend, device, norm):
    for dtype in dtypes_of(backend):
        need(backend, device, dtype)
        for s, (B, _, _, D) in enumerate(shapes_of(backend, device)):
            gen = torch.Generator().manual_seed(s)
            fdiff = torch.randn(B, generator=gen)
            w = torch.randn(B, D, generator=gen)
            w[0] = 0                                   # zero-gradient row: r = 0
            fdiff, w = fdiff.to(device, dtype), w.to(device, dtype)
            r = ops.boundary_step(fdiff, w, norm, backend=backend)
            assert r.dtype == dtype and r.shape == w.shape and not r[0].any()
            assert_rule(r, reference.boundary_step(fdiff, w, norm),
                        reference.boundary_step(fdiff.double(), w.double(), norm), "r")


# -------------------------------------------------------------------- deepdefense_penalty
@pytest.mark.parametrize("backend,device", COMBOS)
def test_deepdefense_penalty_conforms(backend, device):
    for dtype in dtypes_of(backend):
        need(backend, device, dtype)
        for s, (B, _, _, D) in enumerate(shapes_of(backend, device)):
            gen = torch.Generator().manual_seed(s)
            B = max(B, 4)
            x = torch.randn(B, D, generator=gen)
            delta = 0.05 * torch.randn(B, D, generator=gen) * torch.rand(B, 1, generator=gen)
            correct = torch.rand(B, generator=gen) > 0.5
            delta[0] = 0                               # ||delta|| == 0
            x[1] = 0                                   # ||x|| == 0: ratio 0
            delta[2] = 20 * x[2]                       # exponent past the cap where misclassified
            correct[2] = False
            args = [t.to(device, dtype) for t in (delta, x)]
            p = ops.deepdefense_penalty(*args, correct.to(device), 25.0, 5.0, backend=backend)
            assert p.dtype == dtype and p.shape == (B,)
            assert_rule(p, reference.deepdefense_penalty(*args, correct.to(device), 25.0, 5.0),
                        reference.deepdefense_penalty(*(a.double() for a in args), correct.to(device),
                                                      25.0, 5.0), "penalty")


# ------------------------------------------------------------------------ deepfool_update
def bound_rows(kind: str, which: str, B: int, D: int, gen: torch.Generator):
    """A bound as the public op takes it: None, a number, or rows of shape [D], [1, D], [B, D]
    (lo below -0.2, hi above 0.2, so lo <= hi)."""
    sign = -1.0 if which == "lo" else 1.0
    if kind == "none":
        return None
    if kind == "number":
        return sign * 0.5
    rows = sign * (0.2 + torch.rand(B if kind == "rows" else 1, D, generator=gen))
    return rows[0] if kind == "vector" else rows


BOUND_KINDS = [("none", "none"), ("number", "number"), ("row", "row"), ("rows", "rows"),
               ("vector", "rows"), ("none", "row"), ("rows", "none"), ("number", "rows")]


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("bounds", BOUND_KINDS, ids=["-".join(b) for b in BOUND_KINDS])
def test_deepfool_update_conforms(backend, device, bounds):
    """Bounds: none, numbers, one row [1, D] for every sample, one row per sample [B, D], a
    vector [D] (broadcast), either bound alone: every backend against the reference, whose
    bounds are the [1, D] / [B, D] rows the public op makes of them."""
    for dtype in dtypes_of(backend):
        need(backend, device, dtype)
        for s, (B, _, _, D) in enumerate(shapes_of(backend, device)):
            gen = torch.Generator().manual_seed(s)
            x0, rt, r = (torch.randn(B, D, generator=gen).to(device, dtype) for _ in range(3))
            active = (torch.rand(B, generator=gen) > 0.3).to(device)
            lo, hi = (bound_rows(k, w, B, D, gen) for k, w in zip(bounds, ("lo", "hi")))
            lo, hi = (v.to(device) if isinstance(v, torch.Tensor) else v for v in (lo, hi))
            out = ops.deepfool_update(x0, rt, r, active, 0.02, lo, hi, backend=backend)
            rows = lambda v, like: validate.bound_rows(v, "bound", like)
            want = reference.deepfool_update(x0, rt, r, active, 0.02, rows(lo, x0), rows(hi, x0))
            x64 = x0.double()
            want64 = reference.deepfool_update(x64, rt.double(), r.double(), active, 0.02, rows(lo, x64),
                                               rows(hi, x64))
            for o, a, b, name in zip(out, want, want64, ("r_tot", "x_next")):
                assert o.dtype == dtype
                assert_rule(o, a, b, name)
            lo_t, hi_t = rows(lo, x0), rows(hi, x0)       # the clip holds exactly, in x0's dtype
            assert lo_t is None or bool((out[1] >= lo_t).all())
            assert hi_t is None or bool((out[1] <= hi_t).all())


# ------------------------------------------------------------- rows longer than the grid
@pytest.mark.parametrize("backend,device", [c for c in COMBOS if c.values[0] != "cpu"])
def test_rows_longer_than_the_grid(backend, device, monkeypatch):
    """Past the grid's y limit (65535 slices of a row: D > ~67M) the elementwise kernels give a
    program several blocks of the row. On a GPU the cuda backend gets such a row; triton gets a
    limit of 2 programs and small blocks (the interpreter would crawl through 67M elements)."""
    need(backend, device)
    if backend == "triton":
        from ddfast.kernels import _common
        monkeypatch.setattr(_common, "MAX_GRID_Y", 2)
        D, config = 16 * 7 + 3, dict(block_d=16)            # 8 blocks: 4 per program, the last partial
        blocks = dict(block_r=16)
        from ddfast import kernels as impl
    else:
        D, config, blocks = 65535 * 1024 + 3, {}, {}
        from ddfast import _cuda as impl
    gen = torch.Generator().manual_seed(7)
    x0, r_tot, r = (torch.randn(2, D, generator=gen).to(device) for _ in range(3))
    active = torch.tensor([True, False], device=device)
    lo = torch.full((1, D), -1.0, device=device)
    hi = torch.rand(2, D, generator=gen).to(device) + 0.5      # one row per sample
    for got, want in zip(impl.deepfool_update(x0, r_tot, r, active, 0.02, lo, hi, **config),
                         reference.deepfool_update(x0, r_tot, r, active, 0.02, lo, hi)):
        torch.testing.assert_close(got, want)
    del lo, hi
    fdiff = torch.tensor([0.5, -2.0], device=device)
    close = dict(rtol=1e-4, atol=0)   # relative: the norm-2 steps of a 67M row are ~1e-8 an element
    for norm in NORMS:
        torch.testing.assert_close(impl.boundary_step(fdiff, r, norm, **config),
                                   reference.boundary_step(fdiff, r, norm), **close)
    del x0, r_tot
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 1.5, 0.2]], device=device)
    cand = torch.tensor([[1, 2], [0, 2]], device=device)
    ref = torch.tensor([0, 1], device=device)
    g = r.view(2, 1, D).expand(2, 2, D) * torch.tensor([1.0, -0.5], device=device)[:, None]
    active = torch.ones(2, dtype=torch.bool, device=device)
    for norm in NORMS:
        for got, want in zip(impl.select_boundary(logits, g, cand, ref, active, norm, 1e-4, True, **blocks),
                             reference.select_boundary(logits, g, cand, ref, active, norm, 1e-4, True)):
            torch.testing.assert_close(got, want, **close)


# ------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend,device", COMBOS)
def test_edge_cases_match_the_reference(backend, device):
    """A NaN boundary normal gives a zero step (norm 2: the reference masks rows whose norm is not
    > 0), a NaN iterate stays NaN through the clip (torch.clamp), a candidate equal to ref is
    skipped in the difference form, D == 0 rows follow the reference, and float64 logits go
    with float32 gradients."""
    need(backend, device)
    nan = math.nan
    fdiff = torch.tensor([0.5, -0.3], device=device)
    w = torch.tensor([[1.0, nan, 2.0], [0.5, -1.0, 0.25]], device=device)
    for norm in NORMS:
        r = ops.boundary_step(fdiff, w, norm, backend=backend)
        torch.testing.assert_close(r, reference.boundary_step(fdiff, w, norm))   # row 0: zeros, no NaN

    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 1.5, 0.2]], device=device)
    cand = torch.tensor([[1, 2], [0, 2]], device=device)
    ref = torch.tensor([0, 1], device=device)
    active = torch.ones(2, dtype=torch.bool, device=device)
    g = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0)).to(device)
    g[0, 1, 1] = nan                                                              # one NaN candidate row
    g[0, 0] = nan
    for norm in NORMS:
        for got, want in zip(ops.select_boundary(logits, g, cand, ref, active, norm, diff=True, backend=backend),
                             reference.select_boundary(logits, g, cand, ref, active, norm, diff=True)):
            torch.testing.assert_close(got, want)                                 # row 0: every w NaN

    x0 = torch.tensor([[0.2, 0.4]], device=device)
    r_nan = torch.tensor([[nan, 0.1]], device=device)
    one = torch.ones(1, dtype=torch.bool, device=device)
    for got, want in zip(ops.deepfool_update(x0, torch.zeros_like(x0), r_nan, one, 0.02, 0.0, 1.0, backend=backend),
                         reference.deepfool_update(x0, torch.zeros_like(x0), r_nan, one, 0.02, 0.0, 1.0)):
        torch.testing.assert_close(got, want, equal_nan=True)                     # NaN, not a bound

    g = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1)).to(device)
    cand_twice = torch.tensor([[0, 1, 0, 2], [1, 0, 2, 1]], device=device)      # holds ref, twice
    for diff in (True, False):   # every copy of ref is skipped (distance 0 otherwise), whatever its row holds
        for norm in NORMS:
            for got, want in zip(ops.select_boundary(logits, g, cand_twice, ref, active, norm, diff=diff, backend=backend),
                                 reference.select_boundary(logits, g, cand_twice, ref, active, norm, diff=diff)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cand_ref = torch.tensor([[0, 1, 2], [0, 1, 2]], device=device)              # holds ref

    empty = torch.zeros(2, 3, 0, device=device)                                   # D == 0
    half = torch.tensor([True, False], device=device)
    for got, want in zip(ops.select_boundary(logits, empty, cand_ref, ref, half, 2.0, backend=backend),
                         reference.select_boundary(logits, empty, cand_ref, ref, half, 2.0)):
        torch.testing.assert_close(got, want)

    g = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2)).to(device)
    l64, d64, r64 = ops.select_boundary(logits.double(), g, cand_ref, ref, active, 2.0, backend=backend)
    lw, dw, rw = reference.select_boundary(logits.double(), g.double(), cand_ref, ref, active, 2.0)
    assert torch.equal(l64, lw) and d64.dtype == torch.float64
    torch.testing.assert_close(d64, dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r64, rw.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- autograd and opcheck
def _grad_dtype(backend):
    return torch.float64 if backend == "cpu" else torch.float32


def _grad_tols(dtype):
    # float64 finite differences are exact to ~1e-7; float32 ones (triton, cuda) to ~1e-2 of
    # an O(1) gradient with eps 1e-2: the check then proves the formulas, not the last digits.
    if dtype == torch.float64:
        return {}
    return dict(eps=1e-2, atol=5e-2, rtol=5e-2, nondet_tol=1e-5)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("norm", NORMS)
def test_boundary_step_gradcheck(backend, device, norm):
    dtype = _grad_dtype(backend)
    need(backend, device, dtype)
    gen = torch.Generator().manual_seed(1)
    fdiff = (torch.randn(3, generator=gen) + 2).to(device, dtype).requires_grad_()
    w = torch.randn(3, 4, generator=gen).to(device, dtype)
    w[:, 0] += 2                                      # no sign flips within the FD step
    w.requires_grad_()
    f = lambda a, b: ops.boundary_step(a, b, norm, backend=backend)
    tol = _grad_tols(dtype)
    assert torch.autograd.gradcheck(f, (fdiff, w), **tol)
    assert torch.autograd.gradgradcheck(f, (fdiff, w), **tol)


@pytest.mark.parametrize("backend,device", COMBOS)
def test_deepdefense_penalty_gradcheck(backend, device):
    dtype = _grad_dtype(backend)
    need(backend, device, dtype)
    gen = torch.Generator().manual_seed(2)
    delta = (0.1 * torch.randn(4, 3, generator=gen)).to(device, dtype).requires_grad_()
    x = torch.randn(4, 3, generator=gen).to(device, dtype).requires_grad_()
    correct = torch.tensor([True, False, True, False], device=device)
    f = lambda a, b: ops.deepdefense_penalty(a, b, correct, 2.5, 0.5, backend=backend)
    tol = _grad_tols(dtype)
    assert torch.autograd.gradcheck(f, (delta, x), **tol)
    assert torch.autograd.gradgradcheck(f, (delta, x), **tol)


@pytest.mark.parametrize("backend,device", COMBOS)
def test_opcheck(backend, device):
    dtype = torch.float32
    need(backend, device, dtype)
    gen = torch.Generator().manual_seed(4)
    logits, grads, cand, ref, active = select_case(3, 6, 4, 9, dtype, device, seed=4)
    w = torch.randn(3, 9, generator=gen).to(device, dtype).requires_grad_()
    fdiff = torch.randn(3, generator=gen).to(device, dtype).requires_grad_()
    delta = torch.randn(3, 9, generator=gen).to(device, dtype).requires_grad_()
    x = torch.randn(3, 9, generator=gen).to(device, dtype)
    x0, rt, r = (torch.randn(3, 9, generator=gen).to(device, dtype) for _ in range(3))
    lo_row = torch.full((1, 9), -1.0, device=device, dtype=dtype)
    hi_rows = (torch.rand(3, 9, generator=gen) + 0.5).to(device, dtype)
    cases = [
        (torch.ops.ddfast.select_boundary.default, (logits, grads, cand, ref, active, 2.0, 1e-4, False)),
        (torch.ops.ddfast.select_boundary.default, (logits, grads, cand, ref, active, math.inf, 1e-4, True)),
        (torch.ops.ddfast.boundary_step.default, (fdiff, w, 2.0, 1e-4)),
        (torch.ops.ddfast.boundary_step.default, (fdiff, w, math.inf, 1e-4)),
        (torch.ops.ddfast.deepdefense_penalty.default, (delta, x, active, 25.0, 5.0)),
        (torch.ops.ddfast.deepfool_update.default, (x0, rt, r, active, 0.02, lo_row, hi_rows)),
        (torch.ops.ddfast.deepfool_update.default, (x0, rt, r, active, 0.02, None, hi_rows)),
        (torch.ops.ddfast.deepfool_update.default, (x0, rt, r, active, 0.02, lo_row, None)),
        (torch.ops.ddfast.deepfool_update.default, (x0, rt, r, active, 0.02, None, None)),
        (torch.ops.ddfast.deepfool_update.default,                  # a number: [1, D] of stride 0
         (x0, rt, r, active, 0.02, torch.full((1, 1), -0.5, device=device, dtype=dtype).expand(1, 9), hi_rows)),
    ]
    with ddfast.set_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- backend choice
def test_available_backends_lists_usable_ones_fastest_first():
    names = ddfast.available_backends("cpu")
    # the interpreted Triton backend is for testing: it never comes before cpu on CPU
    assert names == (["cpu", "triton", "torch"] if INTERPRET else ["cpu", "torch"])
    assert "cuda" not in names
    assert ddfast.available_backends("cpu", torch.float64) == ["cpu", "torch"]
    assert ddfast.available_backends("cpu", torch.float16) == (["triton", "torch"] if INTERPRET else ["torch"])
    if HAS_GPU:
        assert ddfast.available_backends("cuda")[-1] == "torch"
    else:
        assert ddfast.available_backends("cuda") == ["torch"]


def test_default_is_the_fastest_available(monkeypatch):
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    assert backends.get_backend() is None
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == ddfast.available_backends("cpu")[0]
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == "cpu"
    if HAS_GPU:
        want = "cuda" if "cuda" in ddfast.available_backends("cuda") else "triton"
        assert backends.resolve(None, torch.device("cuda"), torch.float32) == want


def test_set_backend_as_call_and_context_manager(monkeypatch):
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    seen = []
    real = backends.load

    def spy(name):
        seen.append(name)
        return real(name)

    monkeypatch.setattr(backends, "load", spy)
    args = select_case(2, 5, 3, 7, torch.float32, "cpu")
    with ddfast.set_backend("torch"):
        assert ddfast.get_backend() == "torch"
        seen.clear()
        ops.select_boundary(*args)
        assert "torch" in seen and "cpu" not in seen
        with ddfast.set_backend("cpu"):
            assert ddfast.get_backend() == "cpu"
        assert ddfast.get_backend() == "torch"
    assert ddfast.get_backend() is None
    try:
        ddfast.set_backend("torch")
        assert ddfast.get_backend() == "torch"
    finally:
        ddfast.set_backend(None)
    with pytest.raises(ValueError, match="backend"):
        ddfast.set_backend("nope")
    with pytest.raises(ValueError, match="cannot run here"):
        ops.select_boundary(*args, backend="cuda")


def test_env_variable_chooses(monkeypatch):
    monkeypatch.setenv("DDFAST_BACKEND", "torch")
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == "torch"
    with ddfast.set_backend("cpu"):                    # an explicit choice wins over the env
        assert backends.resolve(None, torch.device("cpu"), torch.float32) == "cpu"
    assert backends.resolve("cpu", torch.device("cpu"), torch.float32) == "cpu"


@pytest.mark.slow
def test_cpu_backend_is_faster_than_torch_composition():
    """The default on CPU earns its place: select_boundary at the CIFAR shape."""
    import time
    args = select_case(256, 10, 10, 3072, torch.float32, "cpu")

    def best(backend):
        ops.select_boundary(*args, backend=backend)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            ops.select_boundary(*args, backend=backend)
            times.append(time.perf_counter() - t)
        return min(times)

    assert best("cpu") < best("torch")
