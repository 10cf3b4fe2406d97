"""A deliberately slow, per-sample DeepFool written from DESIGN.md's math: one sample at a
time, every class gradient by its own autograd call. The batched attack must agree with it."""
import math

import torch


def slow_deepfool(model, x, y=None, max_iter=50, overshoot=0.02, norm=2.0, candidates=None,
                  bounds=None, eps=1e-4):
    """Returns (delta, iterations, success, label, adv_label) like ddfast.deepfool."""
    lo, hi = bounds if bounds is not None else (None, None)
    deltas, iters, succ, labels, adv = [], [], [], [], []
    for i in range(x.shape[0]):
        x0 = x[i:i + 1].detach()
        with torch.no_grad():
            f0 = model(x0)[0]
        K = f0.shape[0]
        pred = int(f0.argmax())
        ref = pred if y is None else int(y[i])
        if candidates is None or candidates >= K:
            cand = list(range(K))
        else:
            others = [k for k in f0.argsort(descending=True).tolist() if k != ref]
            cand = [ref] + others[:candidates - 1]
        r_tot = torch.zeros_like(x0)
        xt = x0.clone()
        n_it, done, label_now = 0, pred != ref, pred
        for t in range(max_iter):
            if done:
                break
            xv = xt.clone().requires_grad_(True)
            f = model(xv)[0]
            g = {k: torch.autograd.grad(f[k], xv, retain_graph=True)[0].flatten() for k in cand}
            best, best_k = math.inf, None
            for k in cand:
                if k == ref:
                    continue
                w = g[k] - g[ref]
                wn = float(w.abs().sum()) if math.isinf(norm) else float(w.norm())
                dist = abs(float((f[k] - f[ref]).detach())) / wn if wn > 0 else math.inf
                if best_k is None or dist < best:
                    best, best_k = dist, k
            w = (g[best_k] - g[ref]).view_as(x0)
            if math.isinf(best):
                r = torch.zeros_like(x0)
            elif math.isinf(norm):
                r = (best + eps) * torch.sign(w)
            else:
                r = (best + eps) * w / w.norm()
            r_tot = r_tot + r
            xt = x0 + (1 + overshoot) * r_tot
            if bounds is not None:
                xt = xt.clamp(min=lo, max=hi)
            n_it = t + 1
            with torch.no_grad():
                label_now = int(model(xt)[0].argmax())
            done = label_now != ref
        deltas.append((xt - x0)[0])
        iters.append(n_it)
        succ.append(done)
        labels.append(ref)
        adv.append(label_now)
    as_t = lambda v, dt: torch.tensor(v, dtype=dt)
    return (torch.stack(deltas), as_t(iters, torch.int64), as_t(succ, torch.bool),
            as_t(labels, torch.int64), as_t(adv, torch.int64))
