"""``llmio bench NAME [--quick] [--out DIR] [ARGS...]``: run one benchmark of a source checkout
against its baselines and physical limits, print its table, and write ``DIR/NAME.json`` (the
figures) and ``DIR/NAME.png`` (a chart; needs matplotlib, the ``bench`` extra).

NAME is ``read``, ``loader``, ``codec``, ``checkpoint``, ``hook`` (the DDP hook), or any other
``benchmarks/bench_*.py`` by its suffix. ``--quick`` runs it at a small size (a minute or
two); other arguments go to the script unchanged.

Every benchmark script writes its figures with ``--json PATH``; the chart is drawn from the
JSON's ``"chart"`` entry (``{"title", "unit", "bars": [{"label", "value", "kind"}]}``, kind one
of ``ours``, ``baseline``, ``limit``) when the script provides one, else from its ``rows``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ._common import UsageError

# short names -> script suffix (benchmarks/bench_SUFFIX.py)
ALIASES = {"hook": "ddp_hook"}


def bench_dir() -> Path:
    """The benchmarks folder of a checkout: ``$LLMIO_BENCH_DIR``, else the source tree this
    package runs from, else ``./benchmarks`` (run from a checkout with the wheel installed).

    Raises:
        Nothing.
    """
    cands = [Path(os.environ["LLMIO_BENCH_DIR"])] if os.environ.get("LLMIO_BENCH_DIR") else []
    # this file is <root>/python/llmio_native/cli/bench.py
    cands += [Path(__file__).resolve().parents[3] / "benchmarks", Path.cwd() / "benchmarks"]
    for d in cands:
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d
    return cands[0]


def add_parser(sub: Any) -> None:
    """Add the ``bench`` subcommand to ``sub`` for ``llmio --help`` (``main`` hands
    ``llmio bench ...`` to :func:`run` before argparse sees it: its arguments are the script's).

    Raises:
        Nothing.
    """
    sub.add_parser("bench", help="run a benchmark against its baselines and limits; table, JSON and chart "
                   "(llmio bench --help)", add_help=False)


def _names(d: Path) -> List[str]:
    have = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py")) if d.is_dir() else []
    inv = {v: k for k, v in ALIASES.items()}
    return sorted({inv.get(n, n) for n in have})


def _label(row: Dict[str, Any]) -> Optional[str]:
    for k in ("label", "name", "codec", "hook", "loader", "impl"):
        if isinstance(row.get(k), str):
            sec = row.get("section")
            return f"{sec}: {row[k]}" if isinstance(sec, str) else row[k]
    return None


def chart_spec(name: str, res: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The bars to draw for a benchmark's JSON: its ``chart`` entry, else the first of
    ``ratio`` / ``vs_limit`` / ``gbps`` / ``tok_per_s`` that its ``rows`` carry. None when
    neither is there.

    Raises:
        Nothing.
    """
    ch = res.get("chart")
    if isinstance(ch, dict) and ch.get("bars"):
        return ch
    rows = [r for r in res.get("rows", []) if isinstance(r, dict)]
    for key, unit in (("ratio", "x baseline"), ("vs_limit", "x limit"), ("gbps", "GB/s"), ("tok_per_s", "tokens/s")):
        bars = [{"label": _label(r), "value": float(r[key]),
                 "kind": "limit" if "limit" in (_label(r) or "") else ("ours" if "llmio" in (_label(r) or "")
                                                                       else "baseline")}
                for r in rows if isinstance(r.get(key), (int, float)) and _label(r)]
        if bars:
            return {"title": f"llmio bench {name}", "unit": unit, "bars": bars}
    return None


def draw(spec: Dict[str, Any], png: Path, machine: Optional[Dict[str, Any]] = None) -> bool:
    """Draw ``spec`` as a horizontal bar chart into ``png``; False when matplotlib is absent.

    Raises:
        OSError: the PNG cannot be written.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = spec["bars"]
    colors = {"ours": "#1f77b4", "baseline": "#999999", "limit": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(bars) + 1.6))
    ys = range(len(bars))[::-1]
    vals = [float(b["value"]) for b in bars]
    ax.barh(list(ys), vals, color=[colors.get(b.get("kind", "baseline"), "#999999") for b in bars])
    ax.set_yticks(list(ys))
    ax.set_yticklabels([str(b["label"])[:60] for b in bars], fontsize=8)
    for y, v in zip(ys, vals):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
    ax.set_xlabel(spec.get("unit", ""))
    title = spec.get("title", "")
    if machine:
        title += f"\n{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('ram_gib', '?')} GiB"
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _usage(d: Path, names: List[str]) -> str:
    where = (f"benchmarks in {d}: {', '.join(names)}" if names else
             "the benchmarks are part of the source tree, not the wheel: run llmio bench from a checkout "
             "(or set LLMIO_BENCH_DIR to its benchmarks folder)")
    return ("usage: llmio bench NAME [--quick] [--out DIR] [ARGS...]\n"
            "  runs benchmarks/bench_NAME.py against its baselines and limits, prints the table, writes\n"
            "  DIR/NAME.json and DIR/NAME.png (DIR defaults to bench-out; the chart needs matplotlib:\n"
            "  pip install 'llmio-native[bench]'); --quick: a small size; ARGS go to the script\n"
            f"{where}")


def run(args: Sequence[str]) -> int:
    """``llmio bench NAME [--quick] [--out DIR] [ARGS...]``; the script's exit status is ours.

    Raises:
        UsageError: no such benchmark, or ``--out`` without a directory.
    """
    d = bench_dir()
    names = _names(d)
    args = list(args)
    if not args or args[0] in ("-h", "--help") or not names:
        print(_usage(d, names))
        return 0 if names else 1
    name = args.pop(0)
    if name.startswith("-"):
        raise UsageError(f"llmio bench: name the benchmark first (have: {', '.join(names)})")
    if name not in names:
        raise UsageError(f"no benchmark {name!r} (have: {', '.join(names)})")
    out = Path("bench-out")
    quick = False
    rest: List[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--quick":
            quick = True
        elif args[i] == "--out" or args[i].startswith("--out="):
            if "=" in args[i]:
                val = args[i].split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                val = args[i]
            else:
                raise UsageError("llmio bench: --out needs a directory")
            out = Path(val)
        else:
            rest.append(args[i])
        i += 1
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    script = d / f"bench_{ALIASES.get(name, name)}.py"
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *rest, "--json", str(js)]
    print(f"$ {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    try:
        res = json.loads(js.read_text())
    except (OSError, ValueError) as e:
        print(f"llmio bench: {script.name} wrote no readable JSON at {js}: {e}", file=sys.stderr)
        return 1
    spec = chart_spec(name, res)
    png = out / f"{name}.png"
    if spec is None:
        print(f"figures: {js} (no chart: the JSON has no 'chart' entry or rows with ratios)")
    elif draw(spec, png, res.get("machine")):
        print(f"figures: {js}\nchart:   {png}")
    else:
        print(f"figures: {js} (no chart: matplotlib is not installed; pip install 'llmio-native[bench]')")
    return 0
