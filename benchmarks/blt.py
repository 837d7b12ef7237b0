"""BLT: does a global model that runs once per patch pay, and do entropy patches beat fixed strides?

    python benchmarks/blt.py [--seconds 420] [--arms byte,stride,entropy,monotonic] [--patch 4]
                             [--runs DIR] [--entropy RUN] [--val-batches 40]

The entropy model (preset ``blt-entropy``) is trained first into ``DIR/entropy`` (or ``--entropy``
names one). Then every arm trains for the same wall time on the default corpus (a few timed steps
first, then as many steps as fit in ``--seconds``; the cosine schedule ends there):

- ``byte``: the byte model (preset ``tiny``);
- ``stride``: BLT (preset ``blt``) with a patch every ``--patch`` bytes;
- ``entropy``: BLT with entropy patches, the threshold measured for the same average patch size;
- ``monotonic``: BLT with the approximate monotonic patcher, likewise.

Columns: the average patch size on the validation windows, forward matmul FLOPs per byte of the
global model and of the whole model (2 per multiply-add; the frozen entropy model's are listed
apart), training bytes per second, steps, and validation bits per byte on the same windows. Run it
alone (one thread per process; other processes on the same cores slow an arm down and it fits
fewer steps in its time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neatlm.config import Config, load_config  # noqa: E402
from neatlm.data.corpus import validation_batches  # noqa: E402
from neatlm.nn.blt.model import BLTModel, entropy_config, matmul_flops_per_byte  # noqa: E402
from neatlm.nn.model import swiglu_hidden  # noqa: E402
from neatlm.train.checkpoint import list_checkpoints  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

COMMON = ["train.progress=false", "train.device=cpu", "train.precision=fp32", "eval.every=0"]


def arms(patch: float, entropy_run: Path) -> dict[str, tuple[str, list[str]]]:
    blt = [f"blt.entropy_run={entropy_run}", f"blt.target_patch_size={patch}"]
    return {"byte": ("tiny", []),
            "stride": ("blt", blt + ["blt.patcher=stride"]),
            "entropy": ("blt", blt + ["blt.patcher=entropy"]),
            "monotonic": ("blt", blt + ["blt.patcher=monotonic"])}


def byte_flops_per_byte(cfg: Config) -> float:
    """Forward matmul FLOPs per byte of a NeatLM (attention scores left out, as for BLT)."""
    m = cfg.model
    return 2.0 * (m.n_layers * (4 * m.dim * m.dim + 3 * m.dim * swiglu_hidden(m.dim, m.mlp_hidden)) + 256 * m.dim)


def seconds_per_step(preset: str, sets: list[str], probe_steps: int = 4) -> float:
    probe = Trainer(load_config(preset, overrides=sets + ["train.steps=1000"]), run_dir=tempfile.mkdtemp())
    probe.train_step()
    start = time.perf_counter()
    for _ in range(probe_steps):
        probe.train_step()
    return (time.perf_counter() - start) / probe_steps


def train_entropy(run: Path, threads: int) -> None:
    if list_checkpoints(run):
        print(f"entropy model: reusing {run}", flush=True)
        return
    print(f"entropy model: training preset blt-entropy into {run}", flush=True)
    cfg = load_config("blt-entropy", overrides=COMMON + [f"train.run_dir={run}", f"train.threads={threads}"])
    Trainer(cfg).train()


def average_patch(model: BLTModel, cfg: Config, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        starts = torch.cat([model.patches(x)[0].flatten() for x in batches])
    return starts.numel() / starts.sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=420.0, help="training wall time of each arm")
    p.add_argument("--arms", default="byte,stride,entropy,monotonic")
    p.add_argument("--patch", type=float, default=4.0, help="target average patch size of every BLT arm")
    p.add_argument("--runs", default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("--entropy", default=None, help="an entropy-model run to reuse")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-batches", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="blt-bench-"))
    entropy_run = Path(args.entropy) if args.entropy else runs / "entropy"
    train_entropy(entropy_run, args.threads)
    table = arms(args.patch, entropy_run)
    rows = []
    for name in [a.strip() for a in args.arms.split(",") if a.strip()]:
        preset, sets = table[name]
        sets = sets + COMMON + [f"train.threads={args.threads}", f"eval.batches={args.val_batches}"]
        per_step = seconds_per_step(preset, sets)
        steps = max(1, int(args.seconds / per_step))
        print(f"{name}: {per_step:.3f} s/step -> {steps} steps", flush=True)
        cfg = load_config(preset, overrides=sets + [f"train.steps={steps}", f"train.save_every={steps}",
                                                   f"train.run_dir={runs / name}"])
        trainer = Trainer(cfg)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        model = trainer.model.eval()
        if isinstance(model, BLTModel):
            val = [x for x, _ in validation_batches(trainer.data.corpus.val, cfg.train.batch_size, cfg.train.seq_len,
                                                     min(args.val_batches, 8))]
            patch = average_patch(model, cfg, val)
            flops = matmul_flops_per_byte(cfg, patch)
            ent = byte_flops_per_byte(entropy_config(cfg.blt))
            row = (name, f"{patch:.2f}", f"{flops['global'] / 1e6:.3f}", f"{flops['total'] / 1e6:.3f}",
                   f"{ent / 1e6:.3f}")
        else:
            row = (name, "1.00", f"{byte_flops_per_byte(cfg) / 1e6:.3f}", f"{byte_flops_per_byte(cfg) / 1e6:.3f}", "-")
        params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rows.append(row + (f"{params / 1e6:.2f}", str(steps), f"{seconds:.0f}",
                           f"{result.get('tokens_per_s', float('nan')):,.0f}", f"{result['val_bpb']:.3f}"))
        print(" | ".join(rows[-1]), flush=True)
    head = ("arm", "patch (bytes)", "global MFLOP/byte", "total MFLOP/byte", "entropy model MFLOP/byte",
            "params (M)", "steps", "train s", "bytes/s", "val bpb")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nthreads {args.threads}, {args.seconds:.0f} s per arm, target patch {args.patch}; runs in {runs}")


if __name__ == "__main__":
    main()
