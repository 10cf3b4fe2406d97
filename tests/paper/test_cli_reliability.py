"""Reliability of the command line and the training loop: a real SIGKILL mid-run followed by
``--resume`` ends where an uninterrupted run ends, and every file the user can get wrong (data,
checkpoints, ``--init`` weights, including a pickle with arbitrary objects) gives one readable
``ddfast: error:`` line naming the file, a non-zero status and no traceback."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddfast.paper import cli
from test_cli import SUBPROCESS_ENV, make_mnist, write_idx

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # cli.main sets it


def _train_args(data, out, epochs=1, method="clean", model="mlp"):
    return ["train", "--data", data, "--out", out, "--method", method, "--model", model, "--epochs", str(epochs),
            "--batch-size", "50", "--lr", "0.01", "--lam", "2", "--c", "5", "--lr-milestones", "2",
            "--eval-subset", "20", "--threads", "1", "--no-progress"]


def _strip_times(log):
    return [{k: v for k, v in e.items() if k not in ("time_s", "train_s")} for e in log]


def _read_log(out: Path):
    try:
        return json.loads((out / "log.json").read_text())
    except (FileNotFoundError, ValueError):
        return []


def wait_for_epoch(proc, out: Path, epoch: int, timeout: float = 180.0) -> None:
    """Poll (10 ms) until ``out/log.json`` records ``epoch`` (written right after its checkpoint)."""
    deadline = time.monotonic() + timeout
    while len(_read_log(out)) <= epoch:
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    data = make_mnist(tmp_path / "mnist", n_train=1000, n_test=100)
    epochs = 4
    assert cli.main([str(a) for a in _train_args(data, tmp_path / "full", epochs, "deepdefense")]) == 0

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "ddfast", *map(str, _train_args(data, out, epochs, "deepdefense"))]
    proc = subprocess.Popen(argv, cwd=TESTS_DIR, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_epoch(proc, out, 1)
        proc.send_signal(signal.SIGKILL)  # in epoch 2: the epoch-1 files were just written
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= at_kill < epochs  # killed before the end, after at least one checkpoint

    p = subprocess.run([*argv, "--resume"], cwd=TESTS_DIR, env=SUBPROCESS_ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert _strip_times(_read_log(out)) == _strip_times(_read_log(tmp_path / "full"))


# ---------------------------------------------------------------- readable errors


def _cli_error(argv, capsys, name, rc=2):
    """Run the CLI; assert the status and one ``ddfast: error:`` line naming ``name``; return the line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == rc, err
    assert err.startswith("ddfast: error:") and "\n" not in err and "Traceback" not in err, err
    assert str(name) in err, err
    return err


def test_missing_data_dir(tmp_path, capsys):
    _cli_error(_train_args(tmp_path / "nodata", tmp_path / "o"), capsys, tmp_path / "nodata")


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_truncated_gzip_idx(tmp_path, capsys, name):
    data = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    f = data / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _cli_error(_train_args(data, tmp_path / "o"), capsys, f)


def test_idx_with_wrong_size(tmp_path, capsys):
    import gzip

    data = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    f = data / "train-labels-idx1-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-3]))  # valid gzip, short payload
    err = _cli_error(_train_args(data, tmp_path / "o"), capsys, f)
    assert "size" in err


def test_idx_labels_out_of_range(tmp_path, capsys):
    import numpy as np

    data = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    f = data / "t10k-labels-idx1-ubyte.gz"
    write_idx(f, np.full(10, 11))
    err = _cli_error(_train_args(data, tmp_path / "o"), capsys, f)
    assert "0..9" in err


@pytest.fixture
def finished_run(tmp_path):
    data = make_mnist(tmp_path / "mnist", n_train=100, n_test=20)
    out = tmp_path / "run"
    assert cli.main([str(a) for a in _train_args(data, out)]) == 0
    return data, out


def test_corrupt_checkpoint_on_resume_and_eval(finished_run, capsys):
    data, out = finished_run
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    _cli_error(_train_args(data, out) + ["--resume"], capsys, ck)
    _cli_error(["eval", ck, "--data", data, "--no-progress"], capsys, ck)
    ck.write_bytes(b"")
    _cli_error(["eval", ck, "--data", data, "--no-progress"], capsys, ck)


def test_checkpoint_that_is_not_a_training_checkpoint(finished_run, capsys):
    data, out = finished_run
    ck = out / "checkpoint.pt"
    torch.save({"model": {}, "epoch": 1}, ck)
    err = _cli_error(_train_args(data, out) + ["--resume"], capsys, ck)
    assert "not a ddfast training checkpoint" in err


def test_checkpoint_of_another_model(finished_run, tmp_path, capsys):
    data, out = finished_run
    # the MLP's checkpoint resumed as a LeNet (same settings otherwise), and given to --init / eval
    err = _cli_error(_train_args(data, out, model="lenet") + ["--resume"], capsys, out / "checkpoint.pt")
    assert "LeNet" in err
    _cli_error(_train_args(data, tmp_path / "o2", model="lenet") + ["--init", out / "model.pt"], capsys,
               out / "model.pt")
    _cli_error(["eval", out / "model.pt", "--model", "lenet", "--data", data], capsys, out / "model.pt")


class _Payload:
    """Unpickling it would create the directory ``marker`` (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_init_pickle_with_arbitrary_objects_is_refused(finished_run, tmp_path, capsys, writer):
    import pickle

    data, _ = finished_run
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    obj = {"model": {"fc1.weight": _Payload(marker)}}
    if writer == "torch.save":
        torch.save(obj, evil)
    else:
        with open(evil, "wb") as fh:
            pickle.dump(obj, fh)
    err = _cli_error(_train_args(data, tmp_path / "o") + ["--init", evil], capsys, evil)
    assert "refused" in err
    _cli_error(["eval", evil, "--data", data], capsys, evil)
    assert not marker.exists()  # nothing was executed
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_missing_init_and_weights(tmp_path, capsys):
    data = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    _cli_error(_train_args(data, tmp_path / "o") + ["--init", tmp_path / "none.pt"], capsys, tmp_path / "none.pt")
    _cli_error(["eval", tmp_path / "none.pt", "--data", data], capsys, tmp_path / "none.pt")


def test_settings_the_machine_cannot_run(tmp_path, capsys, monkeypatch):
    data = make_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    if not torch.cuda.is_available():
        _cli_error(_train_args(data, tmp_path / "o") + ["--device", "cuda"], capsys, "--device cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")  # eval / reproduce under torchrun would race on their files
    monkeypatch.setenv("RANK", "1")
    _cli_error(["eval", tmp_path / "w.pt", "--data", data], capsys, "'eval'")
    _cli_error(["reproduce", "mnist-mlp", "--out", tmp_path / "r"], capsys, "'reproduce'")
    assert not (tmp_path / "r").exists()


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ddfast", *map(str, _train_args(tmp_path / "nodata", tmp_path / "o"))],
                       cwd=TESTS_DIR, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("ddfast: error:") and str(tmp_path / "nodata") in p.stderr


@pytest.mark.parametrize("argv, match", [
    (["eval", "{weights}", "--model", "mlp", "--json", "{dir}"], "--json .* is a directory"),
    (["eval", "{weights}", "--model", "mlp", "--data", "{weights}"], "--data .* is a file"),
    (["train", "--model", "mlp", "--init", "{dir}", "--out", "{dir}/run"], "--init .* is a directory"),
    (["eval", "{dir}", "--model", "mlp"], "weights .* is a directory"),
])
def test_paths_of_the_wrong_kind_are_named_before_any_work(tmp_path, capsys, argv, match):
    from ddfast.paper import cli

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not used")
    argv = [a.format(weights=weights, dir=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


LAUNCH = "import sys, _ddfast_cli; sys.exit(_ddfast_cli.main())"   # what the `ddfast` console script runs


def _sigint_blocked(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16) & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not hasattr(signal, "pthread_sigmask"),
                    reason="needs Linux /proc and pthread_sigmask")
@pytest.mark.parametrize("when", ["import", 0.5, 1.5, 3.0])
def test_sigint_at_any_time_ends_with_one_line_and_130(tmp_path, when):
    """Ctrl-C while torch imports (held until the import ends), then at later times: status 130
    and the one interrupt line, never a C++ abort (134) or a traceback."""
    data = make_mnist(tmp_path / "mnist", n_train=1000, n_test=100)
    argv = [str(a) for a in _train_args(data, tmp_path / "run", epochs=1000)]
    # (1000 epochs: still training at the last signal time on any machine; a signal after the run
    # ends lands in interpreter shutdown, where Python has restored the default action)
    # SIGINT's default disposition, as in a terminal (a test run in the background ignores it)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], cwd=TESTS_DIR, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if when == "import":
        deadline = time.monotonic() + 60
        while not _sigint_blocked(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "SIGINT never held during the import"
            time.sleep(0.001)
    else:
        time.sleep(when)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.strip()) == (130, cli.INTERRUPTED)
    if when == "import":
        assert not (tmp_path / "run" / "log.json").exists()    # nothing ran after the held interrupt


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="needs pthread_sigmask")
def test_a_process_that_ignores_sigint_is_not_ended_by_one(tmp_path):
    """A background job of a script starts with SIGINT ignored: the entry must not hold (and
    then act on) a SIGINT that the process was set to ignore."""
    data = make_mnist(tmp_path / "mnist", n_train=200, n_test=50)
    argv = [str(a) for a in _train_args(data, tmp_path / "run", epochs=1)]
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *argv], cwd=TESTS_DIR, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "run" / "model.pt").exists()


def test_the_console_command_is_the_interrupt_safe_entry():
    pyproject = TESTS_DIR.parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml beside these tests")
    assert re.search(r'^ddfast = "(.*)"', pyproject.read_text(), re.M).group(1) == "_ddfast_cli:main"


SAVE_UNDER_INTERRUPTS = """
import signal, sys, torch
from pathlib import Path
from ddfast.paper.train import atomic_save
out = Path(sys.argv[1])
obj = {"w": torch.randn(4_000_000), "step": 1}
atomic_save({"old": True}, out)
armed = False
def interrupt(*_):  # what Ctrl-C does, at most once per save
    global armed
    if armed:
        armed = False
        raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.003)
interrupted = 0
for _ in range(40):
    try:
        armed = True
        atomic_save(obj, out)
        armed = False
    except KeyboardInterrupt:
        interrupted += 1
signal.setitimer(signal.ITIMER_REAL, 0)
left = [p.name for p in out.parent.iterdir() if p != out]
print(interrupted, left, sorted(torch.load(out, weights_only=True)))
"""


def test_checkpoint_save_interrupted_anywhere_raises_keyboardinterrupt(tmp_path):
    """Ctrl-C in the middle of writing a checkpoint (here: every 3 ms) ends the save with
    KeyboardInterrupt, leaves the previous file whole and no temp file: never a RuntimeError from
    torch's zip writer or an abort from a write into the file the interrupt closed."""
    p = subprocess.run([sys.executable, "-c", SAVE_UNDER_INTERRUPTS, str(tmp_path / "ckpt.pt")], cwd=TESTS_DIR,
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    interrupted, left, keys = p.stdout.split(" ", 2)
    assert int(interrupted) > 0 and left == "[]", p.stdout
    assert keys.strip() in ("['old']", "['step', 'w']"), p.stdout


def _raise_during_interrupt(how):
    def cmd(a):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            if how == "cause":   # Python 3.11: an interrupt in a class body during a lazy import
                raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from exc
            raise RuntimeError("unexpected pos 704 vs 598")   # torch's zip writer cleaning up after it
    return cmd


@pytest.mark.parametrize("how", ["cause", "context"])
def test_an_interrupt_that_surfaces_as_another_error_ends_with_130(tmp_path, monkeypatch, capsys, how):
    """A Ctrl-C that Python or torch re-raise as a RuntimeError (seen under load: mid-import of
    torch._dynamo) still ends with the one interrupt line and status 130, not a traceback."""
    monkeypatch.setattr(cli, "_cmd_eval", _raise_during_interrupt(how))
    assert cli.main(["eval", str(tmp_path / "model.pt")]) == 130
    assert capsys.readouterr().err.strip() == cli.INTERRUPTED


def test_an_error_without_an_interrupt_behind_it_is_not_called_one(tmp_path, monkeypatch):
    def cmd(a):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(cli, "_cmd_eval", cmd)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["eval", str(tmp_path / "model.pt")])
