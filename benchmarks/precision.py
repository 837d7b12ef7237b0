"""fp32 against bf16 autocast: a real training step of a preset's model, and what the probe says.

    python benchmarks/precision.py [--preset tiny] [--set memory.enabled=true ...] [--rounds 5] [--threads 1]

Times the forward and backward of ``NeatLM(config)`` on one batch of train.batch_size x
train.seq_len random bytes, in fp32 and under ``torch.autocast(device, dtype=torch.bfloat16)``,
the precisions taking turns round after round (machine load drifts alike for both); reports the
minimum and median of each. Then runs the probe that ``train.precision = "auto"`` runs
(:func:`neatlm.hardware.choose_precision` at the model's shapes) and prints what it chose, so the
two ratios can be compared. CPU only unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import load_config  # noqa: E402
from neatlm.hardware import choose_precision  # noqa: E402
from neatlm.nn.loss import lm_loss  # noqa: E402
from neatlm.nn.model import NeatLM  # noqa: E402
from neatlm.train.trainer import probe_shape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, None, args.overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = NeatLM(cfg).to(device)
    t = cfg.train
    x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), device=device)

    def step(precision: str) -> float:
        ctx = nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with ctx:
            logits = model(x[:, :-1]).logits
        lm_loss(logits, x[:, 1:]).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for p in times:
        step(p)   # warm-up
    for _ in range(args.rounds):
        for p in times:
            times[p].append(step(p))
    start = time.perf_counter()
    choice, probe = choose_precision(device, "auto", probe_shape(cfg))
    probe_s = time.perf_counter() - start

    print(f"{args.preset} {' '.join(args.overrides)}: {model.num_params():,} parameters, batch {t.batch_size} x "
          f"{t.seq_len}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| | fp32 | bf16 | bf16 / fp32 |\n| --- | ---: | ---: | ---: |")
    lo = {p: min(v) for p, v in times.items()}
    med = {p: statistics.median(v) for p, v in times.items()}
    print(f"| forward + backward, min | {lo['fp32'] * 1e3:.0f} ms | {lo['bf16'] * 1e3:.0f} ms | "
          f"{lo['bf16'] / lo['fp32']:.2f} |")
    print(f"| forward + backward, median | {med['fp32'] * 1e3:.0f} ms | {med['bf16'] * 1e3:.0f} ms | "
          f"{med['bf16'] / med['fp32']:.2f} |")
    if "bf16" in probe:
        print(f"| precision probe (one block + head) | {probe['fp32'] * 1e3:.1f} ms | {probe['bf16'] * 1e3:.1f} ms | "
              f"{probe['bf16'] / probe['fp32']:.2f} |")
    print(f"precision auto chooses {choice} (probe took {probe_s:.2f} s)")


if __name__ == "__main__":
    main()
