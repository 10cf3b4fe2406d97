"""Training loop: tiny runs, resume after interruption, non-finite loss, baselines' pieces."""
import json
import math

import pytest
import torch

from ddfast.paper import models, train


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is much faster than two contended ones on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_data(n_train=300, n_test=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 1, 28, 28, generator=g) * 0.3
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = centers[y] + 0.3 * torch.randn(n_train + n_test, 1, 28, 28, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def tiny_cfg(**kw):
    base = dict(epochs=2, batch_size=50, lr=0.05, eval_subset=40, eval_max_iter=10)
    base.update(kw)
    return train.TrainConfig(**base)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return models.MLP()


def run(tmp, cfg, model=None, **kw):
    model = fresh_model() if model is None else model
    log = train.fit(model, *tiny_data(), cfg, out_dir=tmp, progress=False, **kw)
    return model, log


def test_two_epoch_run_writes_logs_and_checkpoints(tmp_path):
    model, log = run(tmp_path, tiny_cfg())
    assert [e["epoch"] for e in log] == [0, 1, 2]
    assert log[2]["test_acc"] > log[0]["test_acc"] + 0.3
    assert log[2]["train_loss"] < log[1]["train_loss"]
    assert all(0 < e["rho2"] for e in log) and log[1]["lr"] == 0.05
    assert json.loads((tmp_path / "log.json").read_text()) == log
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileExistsError, match="resume"):
        run(tmp_path, tiny_cfg())


def test_lr_schedule():
    cfg = train.TrainConfig(lr=0.01, lr_milestones=(4,))
    assert [train.lr_at(cfg, e) for e in range(1, 6)] == [0.01] * 4 + [0.005]


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    cfg = tiny_cfg(epochs=3, method="parseval", parseval_beta=1e-3)
    full, full_log = run(tmp_path / "a", cfg)

    class Boom(Exception):
        pass

    def interrupt(epoch, step):
        if epoch == 2 and step == 3:
            raise Boom

    with pytest.raises(Boom):
        run(tmp_path / "b", cfg, step_callback=interrupt)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = fresh_model(seed=123)  # a different model object: everything must come from the checkpoint
    resumed, log = run(tmp_path / "b", cfg, model=resumed, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    strip = lambda L: [{k: v for k, v in e.items() if k not in ("time_s", "train_s")} for e in L]  # noqa: E731
    assert strip(log) == strip(full_log)
    with pytest.raises(ValueError, match="other settings"):
        run(tmp_path / "b", tiny_cfg(epochs=4), resume=True)


def _poison(epoch, step, model):
    if epoch == 1 and step == 2:
        with torch.no_grad():
            model.fc1.weight[0, 0] = float("nan")


def test_nonfinite_loss_stops_with_message(tmp_path):
    model = fresh_model()
    with pytest.raises(train.NonFiniteLossError) as err:
        run(tmp_path, tiny_cfg(), model=model, step_callback=lambda e, s: _poison(e, s, model))
    msg = str(err.value)
    assert "epoch 1, step 3" in msg and str(tmp_path / "checkpoint.pt") in msg and "end of epoch 0" in msg


def test_nonfinite_loss_skip(tmp_path):
    model = fresh_model()
    _, log = run(tmp_path, tiny_cfg(epochs=1, on_nonfinite="skip"), model=model,
                 step_callback=lambda e, s: _poison(e, s, model))
    assert log[1]["skipped_steps"] == 6 - 3  # every step after the poisoned one
    # the weights stay NaN: the epoch's evaluation records NaN instead of numbers of a broken model
    assert all(math.isnan(log[1][k]) for k in ("test_acc", "rho2", "fooled"))
    assert not math.isnan(log[0]["rho2"])


def test_seeds_of_earlier_versions_still_accepted():
    for seed in (-1, 2 ** 33, 123456789012):                  # runs started with them can resume
        assert train.TrainConfig(seed=seed).seed == seed


def test_epoch_with_every_step_skipped_has_no_statistics_and_log_json_stays_strict(tmp_path):
    model = fresh_model()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")                # every step's loss is NaN
    _, log = run(tmp_path, tiny_cfg(epochs=1, on_nonfinite="skip"), model=model)
    assert log[1]["skipped_steps"] == 6
    assert all(math.isnan(log[1][k]) for k in ("train_loss", "train_ce", "train_reg", "train_acc"))

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    saved = json.loads((tmp_path / "log.json").read_text(), parse_constant=refuse)
    assert saved[1]["train_loss"] is None and saved[1]["test_acc"] is None and saved[1]["skipped_steps"] == 6


def test_resume_from_other_starting_weights_is_refused_when_tagged(tmp_path):
    cfg = tiny_cfg(epochs=2)

    class Stop(Exception):
        pass

    def stop(epoch, step):
        if epoch == 2:
            raise Stop

    a = fresh_model(seed=1)
    with pytest.raises(Stop):
        run(tmp_path, cfg, model=a, step_callback=stop, start_tag=train.weights_fingerprint(a))
    b = fresh_model(seed=2)
    with pytest.raises(ValueError, match="started from other weights"):
        run(tmp_path, cfg, model=b, resume=True, start_tag=train.weights_fingerprint(b))
    a2 = fresh_model(seed=1)                                 # the same starting weights: resumes
    _, log = run(tmp_path, cfg, model=a2, resume=True, start_tag=train.weights_fingerprint(a2))
    assert [e["epoch"] for e in log] == [0, 1, 2]


def test_weights_fingerprint_covers_buffers_and_values():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)
    tag = train.weights_fingerprint(net)                   # 0-d int64 and bfloat16 tensors included
    assert tag == train.weights_fingerprint(net)
    with torch.no_grad():
        net[0].weight[0, 0] += 1
    moved = train.weights_fingerprint(net)
    assert moved != tag
    net[1].num_batches_tracked += 1                          # a buffer, not a parameter
    assert train.weights_fingerprint(net) != moved


def test_adversarial_fresh_run_ignores_a_stale_init_file(tmp_path):
    stale = fresh_model(seed=5)
    train.atomic_save(stale.state_dict(), tmp_path / "init.pt")   # left by an interrupted earlier run
    model = fresh_model(seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run(tmp_path, tiny_cfg(epochs=1, method="adversarial", adv_max_iter=5), model=model)
    saved = torch.load(tmp_path / "init.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in start.items())


def test_parseval_projection():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=False)
    q, _ = torch.linalg.qr(torch.randn(8, 5, generator=g))
    with torch.no_grad():
        lin.weight.copy_(q.T)  # orthonormal rows: a Parseval-tight matrix is a fixed point
    before = lin.weight.detach().clone()
    train.parseval_project(lin, 0.1, 0.6, g)
    assert torch.allclose(lin.weight, before, atol=1e-6)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # singular values 2: the projection pulls them down toward 1
    train.parseval_project(lin, 0.01, 1.0, g)
    s = torch.linalg.svdvals(lin.weight)
    assert torch.allclose(s, torch.full_like(s, 2 * (1.01 - 0.04)), atol=1e-5)


def test_adversarial_training_uses_fixed_deepfool_set(tmp_path):
    x, y, _, _ = tiny_data()
    model = fresh_model()
    run(tmp_path / "pre", tiny_cfg(epochs=1))  # a model that classifies something
    model.load_state_dict(torch.load(tmp_path / "pre" / "model.pt", weights_only=True))
    x_adv = train.adversarial_set(model, x, y, max_iter=50, progress=False)
    with torch.no_grad():
        pred_clean, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
    correct = pred_clean == y
    assert correct.float().mean() > 0.5
    assert (pred_adv[correct] != y[correct]).float().mean() > 0.95
    assert torch.equal(x_adv[~correct], x[~correct])
    _, log = run(tmp_path / "adv", tiny_cfg(method="adversarial", epochs=1), model=model)
    assert (tmp_path / "adv" / "init.pt").exists() and len(log) == 2


@pytest.mark.parametrize("field,value", [
    ("method", "magic"), ("on_nonfinite", "ignore"), ("epochs", 0), ("epochs", 2.5), ("batch_size", 0),
    ("eval_subset", 0), ("seed", "0"), ("lr", 0.0), ("lr", float("nan")), ("lr_gamma", -0.5), ("momentum", -0.1),
    ("weight_decay", -1e-4), ("lam", -1.0), ("c", -1.0), ("d", float("inf")), ("overshoot", -0.02),
    ("parseval_beta", -1e-4), ("parseval_frac", 0.0), ("dd_max_iter", -1), ("adv_max_iter", 1.5),
    ("eval_max_iter", -1), ("lr_milestones", (1.5,)), ("lr_milestones", 4), ("parseval_frac", "0.3"),
    ("seed", -2 ** 60), ("seed", 2 ** 60), ("layers", ("fc1",)),  # layers without method='deepdefense'
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        train.TrainConfig(**{field: value})
    with pytest.raises(TypeError, match="layers"):
        train.TrainConfig(layers="fc1")  # a string, not a sequence of names


@pytest.mark.parametrize("case,arg", [("nan", "x_train"), ("int", "x_train"), ("labels", "y_train"),
                                      ("count", "y_test"), ("test_range", "y_test"), ("scale", "scale")])
def test_fit_checks_data_before_work(tmp_path, case, arg):
    x, y, xt, yt = tiny_data(n_train=20, n_test=10)
    kw = {}
    if case == "nan":
        x = x.clone()
        x[3, 0, 0, 0] = float("nan")
    elif case == "int":
        x = x.long()
    elif case == "labels":
        y = y.double()
    elif case == "count":
        yt = yt[:-1]
    elif case == "test_range":
        yt = yt.clone().fill_(10)
    else:
        kw["scale"] = 0.0
    model = fresh_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=arg):
        train.fit(model, x, y, xt, yt, tiny_cfg(), out_dir=tmp_path, progress=False, **kw)
    assert not any(tmp_path.iterdir())  # nothing written
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match="cfg"):
        train.fit(model, x, y, xt, yt, {"epochs": 1}, progress=False)


def test_helpers_check_arguments():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="beta"):
        train.parseval_project(lin, -0.1, 0.5, g)
    with pytest.raises(ValueError, match="frac"):
        train.parseval_project(lin, 0.1, 1.5, g)
    with pytest.raises(TypeError, match="generator"):
        train.parseval_project(lin, 0.1, 0.5, 0)
    x, y, _, _ = tiny_data(n_train=10, n_test=1)
    with pytest.raises(ValueError, match="batch_size"):
        train.adversarial_set(fresh_model(), x, y, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_iter"):
        train.adversarial_set(fresh_model(), x, y, max_iter=-1, progress=False)
    with pytest.raises(ValueError, match=r"\by\b"):
        train.adversarial_set(fresh_model(), x, y.clone().fill_(12), progress=False)


def _has_regularizer():
    try:
        from ddfast.regularizer import deepdefense_loss  # noqa: F401
        return True
    except ImportError:
        return False


needs_reg = pytest.mark.skipif(not _has_regularizer(), reason="ddfast.regularizer (deepdefense_loss) not available yet")


@needs_reg
def test_deepdefense_run(tmp_path):
    _, clean = run(tmp_path / "clean", tiny_cfg(lr=0.01))
    _, log = run(tmp_path / "dd", tiny_cfg(method="deepdefense", lr=0.01))
    assert 0 < log[2]["train_reg"] < log[1]["train_reg"]
    assert log[1]["train_loss"] == pytest.approx(log[1]["train_ce"] + log[1]["train_reg"])
    assert log[2]["rho2"] > clean[2]["rho2"]


@needs_reg
def test_layerwise_regularizer_reaches_only_chosen_layers(tmp_path):
    x, y, xt, yt = tiny_data(n_train=50)
    outs = {}
    for name, cfg in {"clean": tiny_cfg(epochs=1), "dd": tiny_cfg(method="deepdefense", epochs=1, layers=("fc3",)),
                      "dd_all": tiny_cfg(method="deepdefense", epochs=1)}.items():
        m = fresh_model()
        train.fit(m, x, y, xt, yt, cfg, progress=False)  # one step: batch 50 of 50
        outs[name] = m.state_dict()
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(outs["dd"][k], outs["clean"][k]), k
        assert not torch.equal(outs["dd_all"][k], outs["clean"][k]), k
    assert not torch.equal(outs["dd"]["fc3.weight"], outs["clean"]["fc3.weight"])
    with pytest.raises(ValueError, match="fc9"):
        train.fit(fresh_model(), x, y, xt, yt, tiny_cfg(method="deepdefense", layers=("fc9",)), progress=False)


# PGD adversarial training, TRADES, DeepDefense's lambda warm-up, per-epoch training time


def test_pgd_examples_stay_in_the_ball_and_the_bounds_and_raise_the_loss():
    x, y, _, _ = tiny_data(n_train=40)
    model = fresh_model().eval()
    bounds = (torch.full((1, 1, 28, 28), -0.8), torch.full((1, 1, 28, 28), 0.8))
    x = x.clamp(-0.8, 0.8)
    for norm, eps in (("l2", 1.5), ("linf", 0.1)):
        cfg = tiny_cfg(method="pgd_at", pgd_norm=norm, pgd_eps=eps, pgd_steps=10)
        adv = train.pgd_examples(model, x, y, cfg, scale=1 / 255, bounds=bounds,
                                 generator=torch.Generator().manual_seed(0))
        d = (adv - x).flatten(1)
        size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
        assert (size <= eps * (1 + 1e-5)).all() and (size > 0.5 * eps).any()
        assert adv.min() >= -0.8 and adv.max() <= 0.8
        ce = torch.nn.functional.cross_entropy
        assert ce(model(adv), y) > ce(model(x), y) + 0.1  # the attack does its job
        again = train.pgd_examples(model, x, y, cfg, scale=1 / 255, bounds=bounds,
                                   generator=torch.Generator().manual_seed(0))
        assert torch.equal(adv, again)  # the random start comes from the generator


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_adversarial_baselines_train_and_record_epoch_time(tmp_path, method):
    cfg = tiny_cfg(method=method, pgd_eps=1.0, pgd_steps=3)
    model, log = run(tmp_path, cfg, scale=1 / 255)
    assert log[2]["test_acc"] > log[0]["test_acc"] + 0.2
    assert all(e["train_s"] > 0 and e["time_s"] >= e["train_s"] for e in log[1:])
    if method == "trades":
        assert log[1]["train_reg"] > 0  # the KL term
    else:
        assert log[1]["train_reg"] == 0


def test_lam_warmup_schedule():
    cfg = tiny_cfg(method="deepdefense", lam=10.0, lam_warmup=(1, 2))
    assert train.lam_at(cfg, 1, 0, 10) == 0.0 and train.lam_at(cfg, 1, 9, 10) == 0.0
    assert train.lam_at(cfg, 2, 0, 10) == pytest.approx(0.5)
    assert train.lam_at(cfg, 2, 9, 10) == pytest.approx(5.0)
    assert train.lam_at(cfg, 3, 9, 10) == pytest.approx(10.0) and train.lam_at(cfg, 7, 3, 10) == 10.0
    plain = tiny_cfg(method="deepdefense", lam=10.0)
    assert train.lam_at(plain, 1, 0, 10) == 10.0
    with pytest.raises(ValueError, match="lam_warmup"):
        tiny_cfg(lam_warmup=(1,))
    with pytest.raises(ValueError, match="lam_warmup"):
        tiny_cfg(lam_warmup=(-1, 2))
    with pytest.raises(ValueError, match="pgd_norm"):
        tiny_cfg(pgd_norm="l1")
    with pytest.raises(ValueError, match="pgd_steps"):
        tiny_cfg(pgd_steps=0)


def test_deepdefense_from_scratch_with_warmup_stays_finite(tmp_path):
    """The recipe of docs/robustness.md on a tiny model from random init: the loss stays finite and
    the regularizer switches on after the warm-up."""
    cfg = tiny_cfg(method="deepdefense", epochs=3, lr=0.05, c=10.0, lam_warmup=(1, 1))
    model, log = run(tmp_path, cfg)
    assert all(math.isfinite(e[k]) for e in log[1:] for k in ("train_loss", "train_reg", "rho2"))
    assert log[1]["train_reg"] == 0 and log[2]["train_reg"] > 0 and log[3]["train_reg"] > 0
    assert log[3]["test_acc"] > 0.5


def test_resume_accepts_checkpoints_written_before_new_settings(tmp_path):
    cfg = tiny_cfg(epochs=1)
    _, first = run(tmp_path, cfg)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = json.loads(ck["config"])
    for k in ("pgd_norm", "pgd_eps", "pgd_steps", "pgd_step_size", "trades_beta", "lam_warmup"):
        del saved[k]  # a checkpoint of an earlier version
    ck["config"] = json.dumps(saved)
    torch.save(ck, tmp_path / "checkpoint.pt")
    model, log = run(tmp_path, tiny_cfg(epochs=1), resume=True)  # finished: reused as it is
    assert log == first
    with pytest.raises(ValueError, match="other settings"):
        run(tmp_path, tiny_cfg(epochs=1, pgd_eps=0.5), resume=True)


def _step_size(tmp, **kw):
    """Norm of the parameter change of one plain SGD step (lr 1, no momentum or decay) on 300 images."""
    model = fresh_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = tiny_cfg(epochs=1, batch_size=300, lr=1.0, momentum=0.0, weight_decay=0.0, **kw)
    _, log = run(tmp, cfg, model=model)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (after - before).norm().item(), log


def test_grad_clip_bounds_each_step(tmp_path):
    free, _ = _step_size(tmp_path / "free")
    clipped, log = _step_size(tmp_path / "clipped", grad_clip=0.01)
    assert free > 0.1 and clipped == pytest.approx(0.01, rel=1e-4)   # lr 1: the step is the clipped gradient
    assert log[1]["skipped_steps"] == 0


def test_grad_clip_skips_a_step_whose_gradient_norm_is_not_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(math.inf))
    size, log = _step_size(tmp_path, grad_clip=1.0)
    assert size == 0 and log[1]["skipped_steps"] == 1


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_grad_clip_must_be_positive(bad):
    with pytest.raises(ValueError, match="grad_clip"):
        train.TrainConfig(grad_clip=bad)
