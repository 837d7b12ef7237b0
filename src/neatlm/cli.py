"""The ``neat`` command. Each subcommand is a thin call into the package.

Errors a user can cause (bad config, missing files, corrupted checkpoints) print one line and
exit with code 2; argparse usage errors exit with 2 as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import NeatError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a shipped preset (see `neat presets`); default: tiny")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="a TOML file applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value (repeatable)")


def _load(args: argparse.Namespace):
    from .config import load_config

    preset = args.preset if args.preset is not None or args.config is not None else "tiny"
    return load_config(preset, args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.trainer import Trainer

    if args.resume:
        if args.preset or args.config:
            raise NeatError("--resume continues with the run's saved config; drop --preset/--config "
                            "(use --set to change a value)")
        trainer = Trainer.resume(args.resume, args.overrides)
    else:
        cfg = _load(args)
        trainer = Trainer(cfg, run_dir=args.run_dir)
    from .train.distributed import shutdown

    try:
        if trainer.dist.is_main:
            procs = f"; {trainer.dist.world} processes" if trainer.dist.enabled else ""
            print(f"neat: {trainer.hw.describe()}{procs}; {trainer.model.num_params():,} parameters; "
                  f"data: {trainer.data.describe()}; run dir {trainer.run_dir}", file=sys.stderr)
            specs = {n: trainer.coord.components[n].spec for n in trainer.coord.names}
            comps = ", ".join(f"{n} ({len(trainer.coord.params(n))} tensors, {s.optimizer}, peak lr {s.lr:.2g}, "
                              f"{s.schedule})" for n, s in specs.items())
            print(f"neat: components: {comps}; {trainer.checkpointing}", file=sys.stderr)
        result = trainer.train()
    finally:
        shutdown(trainer.dist)
    if trainer.dist.is_main:
        print(json.dumps({"step": trainer.step, **{k: round(v, 4) for k, v in result.items()}}))
    return 0


def _load_run(run: str):
    """Model and config from a run directory or a checkpoint directory."""
    from .config import from_dict
    from .nn.model import NeatLM
    from .train import checkpoint as ckpt

    tensors, _, state, _ = ckpt.load_checkpoint(run)
    cfg = from_dict(state["config"])
    model = NeatLM(cfg)
    model.load_state_dict(tensors)
    return model, cfg


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .nn.model import generate

    if args.max_bytes < 0:
        raise NeatError(f"--max-bytes {args.max_bytes}: must be >= 0")
    if args.top_k < 0:
        raise NeatError(f"--top-k {args.top_k}: must be >= 0")
    model, _ = _load_run(args.run)
    prompt = torch.tensor(list(args.prompt.encode("utf-8")) or [10], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, prompt, args.max_bytes, args.temperature, args.top_k, gen)
    sys.stdout.write(args.prompt + bytes(out.tolist()).decode("utf-8", errors="replace") + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import apply_overrides, validate
    from .data.source import build_data
    from .hardware import detect
    from .train.evaluate import evaluate

    model, cfg = _load_run(args.run)
    if args.task:
        apply_overrides(cfg, [f"data.task={args.task}"])
        validate(cfg)
    hw = detect(cfg.train.device, "fp32")
    model.to(hw.device)
    data = build_data(cfg)
    batches = data.validation(args.batches or cfg.eval.batches)
    result = evaluate(model, batches, cfg.train.segments, hw.device, accuracy=data.task == "mqar")
    print(json.dumps({"task": data.task, **{k: round(v, 4) for k, v in result.items()}}))
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    """Exit 0 when every parameter's gradient is present and matches central differences, else 1."""
    import torch

    from .grad.check import check_gradients
    from .nn.model import NeatLM

    cfg = _load(args)
    if args.samples < 1 or args.seq_len < 2 or args.batch < 1:
        raise NeatError("--samples, --batch must be >= 1 and --seq-len >= 2")
    torch.manual_seed(args.seed)
    model = NeatLM(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1),
                      generator=torch.Generator().manual_seed(args.seed))
    report = check_gradients(model, x[:, :-1], x[:, 1:], samples=args.samples, tolerance=args.tolerance,
                             seed=args.seed)
    print(report.table())
    return 0 if report.ok else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from .train.sweep import plan, results_table, run_sweep

    preset = args.preset if args.preset is not None or args.config is not None else "tiny"
    points = plan(args.grid, preset, args.config, args.overrides)  # validates every point first
    print(f"neat: sweep of {len(points)} runs into {args.out}", file=sys.stderr)
    results = run_sweep(points, args.out)
    print(results_table(results), end="")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import preset_names

    print("\n".join(preset_names()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import to_toml

    print(to_toml(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neat", description="Train and use test-time-learning language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: tiny preset on the Python stdlib sources)")
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="override train.run_dir")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample bytes from a trained run")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation bits per byte of a trained run")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--batches", type=int, default=0, help="0 = eval.batches of the run's config")
    p.add_argument("--task", choices=("text", "mqar"), default=None,
                   help="text: validation bits per byte; mqar: query accuracy (default: the run's task)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("gradcheck", help="check every parameter's gradient against central differences")
    _add_config_args(p)
    p.add_argument("--samples", type=int, default=4, help="entries checked per parameter tensor")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error accepted")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("sweep", help="train over a grid of config values and tabulate the results")
    _add_config_args(p)
    p.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep for one key (repeatable: the grid is the product)")
    p.add_argument("--out", default="runs/sweep", help="directory for the runs and results.md")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="write PNG plots of a run's metrics into RUN_DIR/plots")
    p.add_argument("run", metavar="RUN_DIR")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config as TOML")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NeatError as exc:
        print(f"neat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
