"""Refresh the result tables of bench/README.md from bench/results/*.json.

    python bench/tables.py [--readme bench/README.md] [--results bench/results]

bench/README.md holds blocks ``<!-- BEGIN results:NAME -->`` ... ``<!-- END results:NAME -->``.
Each block is replaced by a table made from ``results/NAME.md`` when that file exists (the
DeepFool throughput benchmark writes its own table), else from ``results/NAME.json``: its
``rows`` list as a table of its scalar columns, each ``{name: {...}}`` section as a table with
one row per name (nested keys dotted), plus its scalar top-level numbers. A block
whose file is missing says so. Nothing outside the blocks is touched.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, List

BENCH = Path(__file__).resolve().parent
ENV_KEYS = {"device", "torch", "cuda", "python", "cpu", "cpu_count", "torch_threads", "platform", "git_commit",
            "date", "versions", "bench"}
BLOCK = re.compile(r"(<!-- BEGIN results:(?P<name>[\w.\-]+) -->\n)(?P<body>.*?)(<!-- END results:(?P=name) -->)",
                   re.S)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif _scalar(v):
            out[f"{prefix}{k}"] = v
    return out


def table_from_json(data: Dict[str, Any]) -> str:
    lines: List[str] = []
    head = [f"{data.get('device', '?')}, torch {data.get('torch', '?')}, {data.get('torch_threads', '?')} threads, "
            f"{data.get('date', '')}, commit {data.get('git_commit', '?')}"]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        cols: List[str] = []
        for r in rows:
            for k, v in r.items():
                if k not in cols and (_scalar(v) or isinstance(v, dict)) and k != "differences":
                    cols.append(k)
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c)
                if isinstance(v, dict):
                    v = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
                cells.append(_fmt(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for key, val in data.items():  # {name: {...}} sections (e.g. results per model): one row per name
        if key in ENV_KEYS or key == "rows" or not isinstance(val, dict) or not val:
            continue
        if not all(isinstance(v, dict) for v in val.values()):
            continue
        flat = {name: _flatten(v) for name, v in val.items()}
        cols: List[str] = []
        for f in flat.values():
            cols += [c for c in f if c not in cols]
        lines += [f"`{key}`:", "", "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(_fmt(f.get(c)) for c in cols) + " |" for name, f in flat.items()]
        lines.append("")
    scalars = {k: v for k, v in data.items() if k not in ENV_KEYS and k != "rows" and _scalar(v)}
    if scalars:
        lines += ["| quantity | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
        lines.append("")
    return "\n".join(head + [""] + lines)


def render(name: str, results: Path) -> str:
    md, js = results / f"{name}.md", results / f"{name}.json"
    if md.exists():
        return md.read_text().rstrip() + "\n"
    if js.exists():
        return table_from_json(json.loads(js.read_text())).rstrip() + "\n"
    try:
        shown = js.relative_to(BENCH.parent)
    except ValueError:
        shown = js
    return f"_(no results yet: run `bench/run_all.sh`; {shown} is missing)_\n"


def refresh(readme: Path, results: Path) -> List[str]:
    text = readme.read_text()
    names: List[str] = []

    def sub(m: re.Match) -> str:
        names.append(m.group("name"))
        return m.group(1) + render(m.group("name"), results) + m.group(4)

    new = BLOCK.sub(sub, text)
    if new != text:
        readme.write_text(new)
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=Path, default=BENCH / "README.md")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    names = refresh(args.readme, args.results)
    print(f"refreshed {args.readme}: {', '.join(names) if names else 'no blocks'}")


if __name__ == "__main__":
    main()
