"""Grid sweeps over any config keys: one run directory per point, one results table.

Every grid point's config is built and validated before the first run starts, so a typo in a
key fails in a second rather than after an hour. A run that fails at run time (divergence, a
component error) is recorded in the table with its message and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..errors import NeatError
from .metrics import read_metrics
from .trainer import Trainer


@dataclass
class SweepPoint:
    name: str
    overrides: list[str]
    config: Config


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c.d=x"]`` -> ``[("a.b", ["1", "2"]), ("c.d", ["x"])]``."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected section.key=v1,v2,...")
        if key.strip() in {k for k, _ in grid}:
            raise ConfigError(f"--grid {key.strip()}: given twice (list every value in one --grid)")
        grid.append((key.strip(), [v.strip() for v in values.split(",")]))
    return grid


def plan(grid_items: list[str], preset: str | None, config_file: str | None, overrides: list[str]) -> list[SweepPoint]:
    grid = parse_grid(grid_items)
    points = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in grid]):
        sets = [f"{k}={v}" for k, v in combo]
        name = "__".join(f"{k}={v}" for k, v in combo).replace("/", "_")
        points.append(SweepPoint(name, sets, load_config(preset, config_file, overrides + sets)))
    return points


def run_sweep(points: list[SweepPoint], out_dir: str | Path) -> list[dict]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NeatError(f"--out {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for point in points:
        start = time.perf_counter()
        row = {"run": point.name, "overrides": point.overrides}
        try:
            trainer = Trainer(point.config, run_dir=out / point.name)
            final = trainer.train()
            vals = [r["val_loss"] for r in read_metrics(out / point.name) if "val_loss" in r]
            row.update(status="ok", final_val_loss=final.get("val_loss"), best_val_loss=min(vals) if vals else None,
                       final_val_bpb=final.get("val_bpb"))
        except Exception as exc:  # a failed run is a result, not the end of the sweep
            row.update(status=f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200])
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_table(results))
    plot_sweep(results, out)
    return results


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def results_table(results: list[dict]) -> str:
    lines = ["| run | final val loss | best val loss | final val bpb | seconds | status |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['run']} | {_fmt(r.get('final_val_loss'))} | {_fmt(r.get('best_val_loss'))} | "
                     f"{_fmt(r.get('final_val_bpb'))} | {r['seconds']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[dict], out: Path) -> Path | None:
    """Validation loss against step for every successful run (needs the viz extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r["status"] != "ok":
            continue
        recs = [m for m in read_metrics(out / r["run"]) if "val_loss" in m]
        ax.plot([m["step"] for m in recs], [m["val_loss"] for m in recs], marker="o", label=r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
