"""The ``ddfast`` command: ``train``, ``eval``, ``reproduce``.

Errors the user can fix (missing or corrupt data, bad settings, a diverged run, an existing
output directory) are printed as one ``ddfast: error: ...`` line and exit with status 2
(1 for a diverged run, 130 when interrupted) instead of a traceback.

Distributed training: ``torchrun --nproc_per_node N -m ddfast train ...`` (or
``python -m torch.distributed.run ...``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; ``train``
then joins the process group (gloo on CPU, nccl with ``--device cuda``, one GPU per local rank),
trains with DistributedDataParallel (``--batch-size`` is the global batch, split across ranks;
see :mod:`ddfast.paper.train`), writes files and prints from rank 0 only, and leaves the group at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "build_parser"]

INTERRUPTED = "ddfast: interrupted; rerun the same command (train: with --resume) to continue"


def _floats(s: str):
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from err


def _ints(s: str):
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from err


def _common(p: argparse.ArgumentParser, threads_default) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="dataset directory (default: $DDFAST_DATA, else ./data/mnist -- the repository's "
                        "shipped copy when run from its root -- else the source checkout's data/mnist)")
    p.add_argument("--threads", type=int, default=threads_default,
                   help="torch CPU threads (0: torch's default; default %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars and no per-epoch lines (train: OUT/log.json has every epoch)")


def _robustness_training_args(t: argparse.ArgumentParser, d) -> None:
    """``train``'s settings of the pgd_at / trades baselines and of DeepDefense's lambda warm-up."""
    t.add_argument("--pgd-norm", choices=("l2", "linf"), default=d.pgd_norm,
                   help="pgd_at / trades: the inner attack's norm (default %(default)s)")
    t.add_argument("--pgd-eps", type=float, default=d.pgd_eps,
                   help="pgd_at / trades: radius in [0,1] pixel units (default %(default)s)")
    t.add_argument("--pgd-steps", type=int, default=d.pgd_steps,
                   help="pgd_at / trades: PGD steps (default %(default)s)")
    t.add_argument("--trades-beta", type=float, default=d.trades_beta, help="trades: weight of the KL term")
    t.add_argument("--lam-warmup", type=_ints, default=d.lam_warmup,
                   help="deepdefense: OFF,RAMP epochs: no regularizer for OFF epochs, then lambda ramps to --lam over "
                        "RAMP epochs (training from scratch: docs/robustness.md; default: none)")


def build_parser() -> argparse.ArgumentParser:
    from .train import METHODS, TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="ddfast", description="Fast batched DeepFool and DeepDefense training.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or fine-tune one model with one method")
    t.add_argument("--model", default="mlp", help="mlp, lenet, convnet, nin (default %(default)s)")
    t.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, cifar10 (default %(default)s)")
    t.add_argument("--method", default="clean", choices=METHODS)
    t.add_argument("--init", type=Path, help="start from these weights (state_dict or checkpoint)")
    t.add_argument("--out", type=Path, required=True, help="output directory (checkpoint.pt, log.json, model.pt)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr, help="base lr for [0,1]-scaled inputs (default %(default)s)")
    t.add_argument("--lr-milestones", type=_ints, default=d.lr_milestones, help="epochs after which the lr is halved")
    t.add_argument("--momentum", type=float, default=d.momentum)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--lam", type=float, default=d.lam)
    t.add_argument("--c", type=float, default=d.c)
    t.add_argument("--d", type=float, default=d.d)
    t.add_argument("--layers", type=lambda s: tuple(s.split(",")), default=None,
                   help="with --method deepdefense: regularize only these layers, e.g. fc1 (paper Fig. 5)")
    t.add_argument("--parseval-beta", type=float, default=d.parseval_beta)
    _robustness_training_args(t, d)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--on-nonfinite", choices=("stop", "skip"), default=d.on_nonfinite)
    t.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="clip the gradient's global L2 norm to this; skip steps with a non-finite one (default: off)")
    t.add_argument("--eval-subset", type=int, default=d.eval_subset, help="test images for the per-epoch rho_2")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu, or cuda (under torchrun: cuda:LOCAL_RANK) (default %(default)s)")
    _common(t, 0)

    e = sub.add_parser("eval", help="accuracy, rho_2, rho_inf, Acc@eps, rho'_2 of saved weights")
    e.add_argument("weights", type=Path, help="model.pt or checkpoint.pt")
    e.add_argument("--model", default="mlp")
    e.add_argument("--dataset", default="mnist")
    e.add_argument("--eps-ref", type=float, default=None, help="report Acc@{0.2,0.5,1.0} x this FGS eps")
    e.add_argument("--attack", default="deepfool", choices=("deepfool", "superdeepfool"),
                   help="the attack behind rho_2, rho'_2 and 'fooled' (default %(default)s)")
    e.add_argument("--max-iter", type=int, default=50,
                   help="DeepFool iterations (superdeepfool: of each of its DeepFool runs; default %(default)s)")
    e.add_argument("--limit", type=int, default=None, help="first N test images only")
    e.add_argument("--json", type=Path, default=None, help="also write the row to this file")
    e.add_argument("--robust", action="store_true",
                   help="also robust accuracy (L2 eps 0.5-2.0, Linf 0.05-0.3, [0,1] pixels) and the median minimal L2 "
                        "norm under adv-lib's attacks (pip install --no-deps adv-lib tqdm setuptools; "
                        "docs/robustness.md)")
    e.add_argument("--robust-limit", type=int, default=1000,
                   help="with --robust: attack the first N evaluated images (default %(default)s; 0: all)")
    _common(e, 0)

    r = sub.add_parser("reproduce", help="the paper's MNIST table, plots and a c sweep")
    r.add_argument("experiment", help="mnist-mlp, mnist-lenet or fashion-mlp (needs --data)")
    r.add_argument("--out", type=Path, required=True, help="output directory (rerun to resume)")
    r.add_argument("--init", type=Path, default=None, help="reference weights instead of training one")
    r.add_argument("--sweep", type=_floats, default=None, help="c values of the sweep ('' for none)")
    r.add_argument("--methods", type=lambda s: tuple(v for v in s.split(",") if v), default=None,
                   help="fine-tuned rows to run (default: clean,deepdefense,adversarial,parseval)")
    r.add_argument("--eval-max-iter", type=int, default=50)
    r.add_argument("--robust-limit", type=int, default=1000,
                   help="adv-lib evaluation of every row on the first N test images (default %(default)s; "
                        "-1: all; 0: none, then adv-lib is not needed)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where to train and evaluate (default cpu)")
    _common(r, 1)
    return ap


def _env_int(name: str, default: Optional[str]) -> int:
    value = os.environ.get(name, default)
    try:
        if value is None:
            raise TypeError(f"{name} is not set")
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), got {value!r}") from None


def _dist_env() -> Optional[dict]:
    """``{"rank", "world_size", "local_rank"}`` from a torchrun environment with more than one
    process, else ``None``."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return None
    return {"rank": _env_int("RANK", None), "world_size": world, "local_rank": _env_int("LOCAL_RANK", "0")}


@contextlib.contextmanager
def _process_group(env: Optional[dict], device: str):
    """Join the default process group for the block (nothing without ``env``); yields the torch device."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        dev = torch.device("cuda", env["local_rank"] if env else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if env is None:
        yield dev
        return
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                            rank=env["rank"], world_size=env["world_size"])
    try:
        yield dev
        dist.barrier()  # on success, no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def _check_model_takes(model, x, y, a) -> None:
    """One probe forward of a sample: a model built for other inputs (--model lenet on cifar10,
    convnet on MNIST) fails here with one line naming both, not as a traceback mid-run."""
    from ..metrics import check_data

    try:
        check_data(model, x[:1], y[:1])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"--model {a.model} does not take --dataset {a.dataset} samples of shape "
                         f"{list(x.shape[1:])} ({first})") from exc


def _cmd_train(a) -> int:
    from . import data, models
    from .reproduce import load_weights
    from .train import TrainConfig, fit, weights_fingerprint

    cfg = TrainConfig(method=a.method, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      lr_milestones=a.lr_milestones, momentum=a.momentum, weight_decay=a.weight_decay,
                      lam=a.lam, c=a.c, d=a.d, layers=a.layers, parseval_beta=a.parseval_beta, seed=a.seed,
                      on_nonfinite=a.on_nonfinite, eval_subset=a.eval_subset, pgd_norm=a.pgd_norm,
                      pgd_eps=a.pgd_eps, pgd_steps=a.pgd_steps, trades_beta=a.trades_beta, lam_warmup=a.lam_warmup,
                      grad_clip=a.grad_clip)
    import torch

    env = _dist_env()
    torch.manual_seed(a.seed)  # the same initial model on every rank
    model = models.build_model(a.model)
    if a.init is not None:
        load_weights(model, a.init)
    prep = data.prepare(a.dataset, a.data)
    _check_model_takes(model, prep.x_train, prep.y_train, a)
    start = weights_fingerprint(model)  # the starting weights (seed or --init): a resume must start from the same
    with _process_group(env, a.device) as dev:
        model.to(dev)
        x_train, y_train, x_test, y_test = (t.to(dev) for t in
                                            (prep.x_train, prep.y_train, prep.x_test, prep.y_test))
        log = fit(model, x_train, y_train, x_test, y_test, cfg, out_dir=a.out, resume=a.resume, scale=prep.scale,
                  start_tag=start, progress=not a.no_progress, bounds=prep.bounds)
    if env is None or env["rank"] == 0:
        last = log[-1]
        print(f"done: epoch {last['epoch']} test acc {100 * last['test_acc']:.2f}% rho_2 (subset) "
              f"{last['rho2']:.4f}; weights in {a.out / 'model.pt'}")
    return 0


def _cmd_eval(a) -> int:
    from .. import metrics
    from . import data, models
    from .extras import require_extras
    from .reproduce import load_weights

    if a.json is not None:  # before the evaluation: a bad path must not cost the whole run
        a.json.parent.mkdir(parents=True, exist_ok=True)
    require_extras(progress_bars=not a.no_progress)
    model = load_weights(models.build_model(a.model), a.weights)
    prep = data.prepare(a.dataset, a.data)
    x, y = prep.x_test, prep.y_test
    _check_model_takes(model, x, y, a)
    if a.limit is not None:
        if a.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {a.limit}")
        x, y = x[: a.limit], y[: a.limit]
    if a.robust:
        from ..robustness import load_adv_lib

        if a.robust_limit < 0:
            raise ValueError(f"--robust-limit must be >= 0, got {a.robust_limit}")
        load_adv_lib()  # ImportError naming the pip command, before the other metrics run
    row = metrics.evaluate(model, x, y, scale=prep.scale, eps_ref=a.eps_ref, max_iter=a.max_iter,
                           progress=not a.no_progress, attack=a.attack)
    if a.robust:
        from .reproduce import robust_fields

        row.update(robust_fields(model, prep, x, y, a.robust_limit or None,
                                 log=(lambda _m: None) if a.no_progress else print))
    from .train import atomic_save, finite_or_none

    print(json.dumps(finite_or_none(row), indent=1))  # strict JSON, as the file
    if a.json is not None:
        atomic_save(row, a.json)
    return 0


def _cmd_reproduce(a) -> int:
    from .reproduce import reproduce

    kw = {} if a.methods is None else {"methods": a.methods}
    if a.robust_limit < -1:
        raise ValueError(f"--robust-limit must be -1 (all), 0 (none) or a number of images, got {a.robust_limit}")
    reproduce(a.experiment, a.out, data_root=a.data, init=a.init, sweep=a.sweep, eval_max_iter=a.eval_max_iter,
              progress=not a.no_progress, device=a.device,
              robust_limit=None if a.robust_limit == -1 else a.robust_limit, **kw)
    return 0


def _check_paths(a) -> None:
    """Paths named on the command line are of the right kind before any work."""
    for flag, path in (("--data", getattr(a, "data", None)),):
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; give the directory that holds the data set")
    for flag, path in (("--init", getattr(a, "init", None)), ("weights", getattr(a, "weights", None))):
        if path is not None and path.is_dir():
            raise ValueError(f"{flag} {path} is a directory; give a weights file (a state_dict or checkpoint)")
    json_path = getattr(a, "json", None)
    if json_path is not None and json_path.is_dir():
        raise ValueError(f"--json {json_path} is a directory; give a file path for the row")


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a Ctrl-C is behind ``exc``: Python and torch re-raise some interrupts as another
    error (an interrupt inside a lazy import's class body becomes a ``RuntimeError`` about
    ``__set_name__`` on Python 3.11), with the ``KeyboardInterrupt`` as its cause or context."""
    seen = set()
    link: Optional[BaseException] = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _error(exc: BaseException) -> None:
    """Print ``exc`` as one ``ddfast: error: ...`` line on stderr."""
    print("ddfast: error: " + " ".join(str(exc).split()), file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``ddfast`` console script; returns the exit status."""
    ap = build_parser()
    a = ap.parse_args(argv)
    from .train import NonFiniteLossError

    if a.threads is not None and a.threads < 0:
        ap.error(f"--threads must be >= 0, got {a.threads}")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    cmd = {"train": _cmd_train, "eval": _cmd_eval, "reproduce": _cmd_reproduce}[a.command]
    try:
        if a.command != "train" and _dist_env() is not None:
            raise ValueError(f"only 'train' runs distributed; run '{a.command}' as one process (not under torchrun)")
        _check_paths(a)
        return cmd(a)
    except BaseException as exc:
        if _caused_by_interrupt(exc):
            print(INTERRUPTED, file=sys.stderr)
            return 130
        if isinstance(exc, NonFiniteLossError):
            _error(exc)
            return 1
        if isinstance(exc, (ValueError, TypeError, OSError, ImportError)):  # OSError: missing/unreadable files
            _error(exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
