"""One metrics stream, several sinks: ``metrics.jsonl`` always, TensorBoard when installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import NeatError


def bits_per_byte(loss_nats: float) -> float:
    """Cross-entropy per byte in nats to bits (one token is one byte)."""
    return loss_nats / math.log(2)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # the tb extra is optional
                self._tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(run_dir: str | Path, step: int) -> None:
    """On resume, keep the records of steps up to the checkpoint's; drop what a crashed run logged
    after it, and any line that is not a record (a line cut by a crash, damage)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line, record in _records(path) if record is not None and record.get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _records(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Each line of a metrics file with its record, None for a line that is not one."""
    if path.is_dir():
        raise NeatError(f"{path}: is a directory, not the run's metrics file")
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
        ok = isinstance(record, dict) and isinstance(record.get("step", 0), int)
        out.append((raw.decode("utf-8", errors="replace"), record if ok else None))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics file, skipping lines that are not records (the last line of
    a killed run may be cut short)."""
    return [record for _, record in _records(Path(run_dir) / "metrics.jsonl") if record is not None]
