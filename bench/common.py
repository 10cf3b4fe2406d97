"""Shared helpers of the benchmarks in bench/.

* :func:`trained_model` -- a trained MNIST MLP / LeNet (or the CIFAR-shaped ConvNet, or the
  CIFAR-style :class:`ResNet18`, trained on MNIST placed in 3x32x32), trained here in a few
  epochs with ``ddfast.models`` + ``ddfast.data`` and cached as a state_dict under ``bench/.cache/`` (git-ignored).
  The returned model takes images on the **[0, 1] pixel scale** and subtracts the training
  mean image itself (first module), so every attack library sees the same [0, 1] inputs
  (torchattacks insists on them) while the network is the paper's.
* :func:`mnist_test` -- the shipped MNIST test set as float32 ``[N, 1, 28, 28]`` in [0, 1].
* :func:`timed` / :func:`best_of` / :func:`round_robin` -- wall-clock timing.
* :func:`peak_memory` / :func:`reset_peak_memory` -- peak memory (CUDA allocator or process RSS).
* :func:`environment` / :func:`write_json` -- JSON results with device, torch, CPU info.

Run ``python bench/common.py`` to train (or load) the cached models and print their accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"

if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from ddfast import data as dd_data  # noqa: E402
from ddfast import models as dd_models  # noqa: E402
from ddfast.paper.reproduce import cpu_name  # noqa: E402

#: models of the benchmarks: name -> input shape
SHAPES = {"mlp": (1, 28, 28), "lenet": (1, 28, 28), "convnet": (3, 32, 32), "resnet18": (3, 32, 32)}
#: training recipe (SGD momentum 0.9, weight decay 5e-4, batch 100, as DESIGN.md); epochs per model
EPOCHS = {"mlp": 12, "lenet": 3, "convnet": 2, "resnet18": 1}
LR = 0.01
#: models trained "briefly", on the first ``n_train`` images of a fixed permutation of the
#: training set, with their own learning rate (ResNet-18: ~0.56 GFLOP a forward; a full MNIST
#: epoch costs ~30 min on 2 CPU cores, and a trained model is what the attacks must meet);
#: ``bn_calibrate``: then the batch-norm statistics are recomputed (cumulative average, no
#: gradient) on the first that many of those images: after 30 SGD steps the running averages
#: lag the weights (test accuracy 0.78 -> 0.89 on 500 test images)
RECIPES = {"resnet18": {"lr": 0.05, "n_train": 3000, "bn_calibrate": 500}}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 (He et al. 2016, as in the adversarial-robustness literature):
    3x3 stem with 64 channels, no max-pool, BasicBlock x [2, 2, 2, 2] at 64/128/256/512 channels
    (stride 2 from the second stage on), global average pool, one linear layer. 11.2 M parameters;
    takes ``[N, 3, 32, 32]``. Written here (torchvision is not installed beside this torch)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def build_net(name: str) -> nn.Module:
    """A fresh network: :class:`ResNet18` here, the others from ``ddfast.models``."""
    return ResNet18() if name == "resnet18" else dd_models.build_model(name)


class PixelInput(nn.Module):
    """``net((x - mean))``: the network sees the paper's mean-subtracted [0,1] space while the
    caller passes images in [0, 1]. The buffer is called ``pixel_mean`` on purpose: torchattacks
    treats a model attribute named ``mean`` as a normalisation to undo."""

    def __init__(self, net: nn.Module, pixel_mean: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("pixel_mean", pixel_mean.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x - self.pixel_mean)


def to_cifar_shape(x: Tensor) -> Tensor:
    """MNIST ``[N, 1, 28, 28]`` -> ``[N, 3, 32, 32]``: zero-padded by 2 and repeated over 3 channels."""
    return nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def _mnist01(split: str) -> Tuple[Tensor, Tensor]:
    images, labels = dd_data.load_mnist(split=split)
    return images.unsqueeze(1).to(torch.float32) / 255.0, labels


def mnist_test(n: Optional[int] = None, model: str = "mlp") -> Tuple[Tensor, Tensor]:
    """The first ``n`` (default all 10000) MNIST test images in [0, 1], shaped for ``model``."""
    x, y = _mnist01("test")
    if n is not None:
        x, y = x[:n], y[:n]
    if SHAPES[model] == (3, 32, 32):
        x = to_cifar_shape(x)
    return x.contiguous(), y


def _cache_path(name: str, epochs: int, seed: int) -> Path:
    recipe = f"-{sorted(RECIPES[name].items())}" if name in RECIPES else ""  # old tags unchanged
    tag = hashlib.sha1(f"{name}-{epochs}-{seed}-{LR}{recipe}-v1".encode()).hexdigest()[:8]
    return CACHE / f"{name}-e{epochs}-s{seed}-{tag}.pt"


def _training_set(name: str, seed: int) -> Tuple[Tensor, Tensor]:
    x, y = _mnist01("train")
    n = RECIPES.get(name, {}).get("n_train")
    if n is not None:  # a fixed subset: the first n of a seeded permutation
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[keep], y[keep]
    if SHAPES[name] == (3, 32, 32):
        x = to_cifar_shape(x)
    return x, y


def _train(name: str, epochs: int, seed: int, log: Callable[[str], None], device: str = "cpu") -> Dict[str, Tensor]:
    torch.manual_seed(seed)
    x, y = _training_set(name, seed)
    mean = x.mean(0, keepdim=True)
    model = PixelInput(build_net(name), mean).to(device)
    x, y = x.to(device), y.to(device)
    lr = RECIPES.get(name, {}).get("lr", LR)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=g).to(device)
        total = 0.0
        for i in range(0, len(x), 100):
            idx = perm[i : i + 100]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log(f"  {name} epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} ({time.perf_counter() - t0:.0f} s)")
    if "bn_calibrate" in RECIPES.get(name, {}):
        calibrate_bn(model, x[: RECIPES[name]["bn_calibrate"]])
    return {k: v.cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: Tensor, batch: int = 100) -> None:
    """Recompute every BatchNorm's running mean and variance as the plain average over ``x``'s
    batches (train-mode forwards without gradient); the model is left in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(x[i : i + batch])
    for m in bns:
        m.momentum = 0.1


def trained_model(name: str = "mlp", epochs: Optional[int] = None, seed: int = 0,
                  log: Callable[[str], None] = print, train_device: str = "cpu") -> nn.Module:
    """A trained ``name`` model (``"mlp"``, ``"lenet"``, ``"convnet"``, ``"resnet18"``) in eval
    mode, float32, CPU.

    Trains on the shipped MNIST training set the first time (MLP ~2 s an epoch, LeNet ~10 s,
    ConvNet ~3 min on 2 cores; ResNet-18 one epoch over 3000 images, ~6 min on 2 cores, seconds
    on a GPU: ``train_device``) and caches the state_dict in ``bench/.cache/`` (whatever device
    trained it). The model takes [0, 1] images (see :class:`PixelInput`). The ConvNet is the
    paper's CIFAR-10 network and ResNet-18 the CIFAR-style one; CIFAR-10 is not shipped, so
    they are trained on MNIST placed in 3x32x32 (:func:`to_cifar_shape`).
    """
    if name not in SHAPES:
        raise ValueError(f"model must be one of {sorted(SHAPES)}, got {name!r}")
    epochs = EPOCHS[name] if epochs is None else epochs
    path = _cache_path(name, epochs, seed)
    state = None
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt cache file: train again
            log(f"bench: ignoring unreadable cache {path.name}: {e}")
    if state is None:
        log(f"bench: training {name} for {epochs} epoch(s) (cached in {path.relative_to(ROOT)})")
        state = _train(name, epochs, seed, log, train_device)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent trainers do not collide
        torch.save(state, tmp)
        os.replace(tmp, path)
    shape = SHAPES[name]
    model = PixelInput(build_net(name), torch.zeros(1, *shape))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    hits = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return hits / len(x)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    """``(seconds, fn())`` by wall clock (perf_counter)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> Tuple[float, Any]:
    """Minimum wall-clock seconds of ``repeat`` calls after ``warmup`` calls, and the last result.

    The minimum is the least noisy estimate on a shared machine (noise only ever adds time)."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        t, out = timed(fn)
        best = min(best, t)
    return best, out


def round_robin(fns: Dict[str, Callable[[int], Any]], rounds: int, sync: Callable[[], None] = lambda: None,
                warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each ``fns[k](r)`` for rounds ``r = warmup .. warmup + rounds - 1``, the methods
    interleaved within every round (round ``r < warmup`` runs untimed), so the shared machine's
    load drifts hit them alike. ``sync`` runs before and after each timed call (a GPU's)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn(r)
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: str = "cpu") -> None:
    """Start a new CUDA peak (no-op on the CPU: a process's peak RSS cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str = "cpu") -> Dict[str, Any]:
    """``{"peak_mib", "peak_kind"}``: ``torch.cuda.max_memory_allocated`` since the last
    :func:`reset_peak_memory` on a GPU; on the CPU the process's peak RSS so far
    (``resource.getrusage``; monotone over the process, so a row's value covers the rows before)."""
    if torch.device(device).type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "peak_kind": "cuda_max_allocated"}
    import resource

    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_kind": "process_peak_rss"}


def state_fingerprint(model: nn.Module) -> str:
    """sha1 (12 hex) of a model's parameters and buffers: which weights produced a figure."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- environment + JSON


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def backend_ran(device: str = "cpu") -> Dict[str, Any]:
    """Which ddfast backend runs float32 ops on ``device`` (and which are available); warns loudly
    on stderr when a native module was built (beside the imported package) but the pure-torch
    fallback runs: such numbers are not ddfast's."""
    import ddfast
    from ddfast import backends

    dev = torch.device(device)
    chosen = backends.resolve(None, dev, torch.float32)
    built = sorted(p.name.split(".")[0] for p in Path(ddfast.__file__).resolve().parent.glob("_C*.so"))
    native = {"cpu": "_C", "cuda": "_C_cuda"}.get(dev.type)
    fallback = native in built and chosen == "torch"
    if fallback:
        print(f"bench: WARNING: {native} was built but the '{chosen}' fallback runs on {device} "
              f"({backends._load_errors.get('cpu' if native == '_C' else 'cuda', 'unavailable')}): these numbers "
              "are not ddfast's compiled backend", file=sys.stderr)
    return {"backend": chosen, "backends_available": ddfast.available_backends(dev), "native_built": built,
            "backend_is_fallback": fallback, "ddfast_path": str(Path(ddfast.__file__).resolve().parent)}


def environment(device: str = "cpu") -> Dict[str, Any]:
    """Where the numbers come from: device (with the GPU's name), torch, CPU, threads, versions,
    the ddfast backend that ran."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev_name = f"cuda: {torch.cuda.get_device_name(dev)}"
    else:
        dev_name = f"cpu: {cpu_name()}"
    return {
        "device": dev_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **backend_ran(device),
        "versions": {p: _version(p) for p in ("ddfast", "foolbox", "eagerpy", "torchattacks",
                                               "adversarial-robustness-toolbox", "deeprobust", "adv-lib",
                                               "numpy", "triton")},
    }


def write_json(path: os.PathLike, payload: Dict[str, Any], device: str = "cpu") -> Path:
    """Write ``payload`` merged over :func:`environment` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**environment(device), **payload}
    path.write_text(json.dumps(out, indent=2, sort_keys=False, default=float) + "\n")
    return path


if __name__ == "__main__":
    for name in ("mlp", "lenet", "convnet", "resnet18"):
        m = trained_model(name)
        x, y = mnist_test(model=name)
        print(f"{name}: test accuracy {accuracy(m, x, y):.4f}")
