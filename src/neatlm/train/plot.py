"""``neat plot RUN_DIR``: PNG plots of a run's metrics stream (needs the ``viz`` extra).

Panels are found from the metric names, so new metrics appear without code here:
``loss``/``bpb`` (training), ``val_*`` (evaluation), ``grad/<component>/<what>`` (one figure per
``what``, a line per component) and ``ttl/<layer>/<what>`` (one figure per ``what``, a line per
memory layer).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import NeatError
from .metrics import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure_groups(keys: set[str]) -> dict[str, list[str]]:
    """{figure name: metric keys drawn in it}."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) == 3:  # family/member/what: one figure per family and what
            groups[f"{parts[0]}_{parts[2]}"].append(key)
        elif key in ("loss", "bpb", "val_loss", "val_bpb"):
            groups["bits_per_byte" if key.endswith("bpb") else "loss"].append(key)
        elif key != "step":
            groups[key.replace("/", "_")].append(key)
    return dict(groups)


def plot_run(run_dir: str | Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NeatError("neat plot needs matplotlib: pip install 'neatlm[viz]'") from None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NeatError(f"{run_dir}: no such run directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise NeatError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    records = read_metrics(run_dir)
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out = run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise NeatError(f"{out}: is a file; plots are written into a directory of that name")
    out.mkdir(exist_ok=True)
    written = []
    for name, members in figure_groups(keys).items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in members:
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        if len(members) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
