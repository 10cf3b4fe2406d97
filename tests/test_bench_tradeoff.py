"""bench/tradeoff.py: the points it gathers from a reproduce output (rows with robust_acc, sweep
folders by name) and the figure it writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tradeoff  # noqa: E402


def _row(acc, l2_05, l2_20, min_l2, **extra):
    return dict(acc=acc, min_norm_l2_median=min_l2, robust_acc={"l2": {"0.5": l2_05, "2.0": l2_20}, "linf": {}},
                **extra)


@pytest.fixture
def run(tmp_path):
    rows = [_row(0.98, 0.9, 0.1, 1.1, method="reference"),
            _row(0.985, 0.94, 0.4, 1.9, method="deepdefense"),
            _row(0.982, 0.95, 0.5, 2.0, method="pgd_at"),
            dict(method="clean", acc=0.98)]                       # no robust_acc: not a point
    settings = {"deepdefense_c": 10.0, "finetune": {"pgd_eps": 1.5}}
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows, "settings": settings}))
    for name, row in (("c5", _row(0.97, 0.93, 0.5, 2.0)), ("pgd_at_eps0.5", _row(0.99, 0.96, 0.2, 1.3)),
                      ("trades_eps1.0", _row(0.95, 0.9, 0.6, 2.2))):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "eval.json").write_text(json.dumps(row))
    return tmp_path


def test_points_group_rows_and_sweep_folders_by_method(run):
    pts = tradeoff.points(run)
    labels = {m: sorted(label for label, _ in v) for m, v in pts.items()}
    assert labels == {"reference": [""], "deepdefense": ["c 10", "c 5"], "pgd_at": ["eps 0.5", "eps 1.5"],
                      "trades": ["eps 1.0"]}
    assert dict(pts["pgd_at"])["eps 0.5"]["acc"] == 0.99


def test_a_sweep_folder_of_unknown_method_is_named(run):
    (run / "sweep" / "mystery").mkdir()
    (run / "sweep" / "mystery" / "eval.json").write_text(json.dumps(_row(0.9, 0.5, 0.1, 1.0)))
    with pytest.raises(ValueError, match="mystery"):
        tradeoff.points(run)


def test_plot_writes_a_png(run):
    png = run / "tradeoff.png"
    tradeoff.plot(tradeoff.points(run), png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
