"""The ``neat`` command. Each subcommand is a thin call into the package.

Every input is checked before any work starts, and a bad one prints one line naming the flag, key
or file and what is allowed, then exits with code 2 (never a traceback). Two kinds of checks, one
way each:

- a flag's value (a count, a finite float, UTF-8 text): an argparse ``type=`` function below that
  raises ``argparse.ArgumentTypeError``; argparse names the flag;
- a path or saved state (a run directory, a writable output directory, a readable file): a
  ``_check_*`` function below, called at the top of the subcommand, that raises ``NeatError``.

Config keys are checked by ``neatlm.config``; corpora and checkpoints by the modules that read them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .errors import NeatError


def enable_mps_fallback(platform: str, environ: dict[str, str]) -> None:
    """On a Mac, an op that torch's MPS backend lacks runs on the CPU instead of failing, with
    torch's own warning naming the op (``PYTORCH_ENABLE_MPS_FALLBACK``). Torch reads the variable
    when it loads, so this runs before anything imports torch; a value the user set is kept."""
    if platform == "darwin":
        environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")


enable_mps_fallback(sys.platform, os.environ)   # the commands import torch later, inside each command

# ---------------------------------------------------------------------------- value checks (type=)


def _text(value: str) -> str:
    """Any text, as long as it is valid UTF-8 (argv bytes that are not arrive as surrogate escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(value)  # the bytes as given
        raise argparse.ArgumentTypeError(f"{raw!r} is not valid UTF-8 (pass UTF-8 text)") from None
    return value


def _int_at_least(low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            number = int(_text(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low or (high is not None and number > high):
            allowed = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {number}")
        return number

    return parse


def _finite_float(low: float, inclusive: bool):
    def parse(value: str) -> float:
        try:
            number = float(_text(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number) or number < low or (number == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {value.strip()}")
        return number

    return parse


_count = _int_at_least(0)
_positive = _int_at_least(1)


def _lengths(value: str) -> list[int]:
    """A comma-separated list of passkey lengths, each long enough for the needle and the question."""
    from .data.passkey import min_length

    parse = _int_at_least(min_length())
    items = [v for v in _text(value).split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected lengths such as 1024,4096, got {value!r}")
    return [parse(v) for v in items]
_seed = _int_at_least(0, 2**64 - 1)  # what torch.Generator.manual_seed accepts


# ---------------------------------------------------------------------------- path checks (NeatError)


def _check_dir(flag: str, path: str | Path, what: str = "directory") -> Path:
    """An existing, readable directory."""
    path = Path(path)
    if not path.exists():
        raise NeatError(f"{flag} {path}: no such {what}")
    if not path.is_dir():
        raise NeatError(f"{flag} {path}: is a file, not a {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise NeatError(f"{flag} {path}: the {what} is not readable")
    return path


def _check_file(flag: str, path: str | Path) -> Path:
    """An existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise NeatError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise NeatError(f"{flag} {path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise NeatError(f"{flag} {path}: the file is not readable")
    return path


def _check_writable_dir(flag: str, path: str | Path) -> Path:
    """A directory that exists and is writable, or that can be created (its nearest existing parent is)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise NeatError(f"{flag} {path}: is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise NeatError(f"{flag} {path}: the directory is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NeatError(f"{flag} {path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NeatError(f"{flag} {path}: cannot be created, {parent} is not writable")
    return path


def _check_config_args(args: argparse.Namespace) -> None:
    if args.config is not None:
        _check_file("--config", args.config)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", type=_text, default=None, help="a shipped preset (see `neat presets`); default: tiny")
    p.add_argument("--config", type=_text, default=None, metavar="FILE.toml",
                   help="a TOML file applied after the preset")
    p.add_argument("--set", dest="overrides", type=_text, action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one value (repeatable)")


def _load(args: argparse.Namespace):
    from .config import load_config

    _check_config_args(args)
    preset = args.preset if args.preset is not None or args.config is not None else "tiny"
    return load_config(preset, args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.trainer import Trainer

    if args.resume is not None:
        if args.preset or args.config or args.run_dir:
            raise NeatError("--resume continues the run in its own directory with its saved config; drop "
                            "--preset/--config/--run-dir (use --set to change a value)")
        resume = _check_dir("--resume", args.resume, "run or checkpoint directory")
        # a checkpoint directory (it holds state.json) lives in RUN_DIR/checkpoints/
        _check_writable_dir("--resume", resume.parent.parent if (resume / "state.json").is_file() else resume)
        trainer = Trainer.resume(resume, args.overrides)
    else:
        cfg = _load(args)
        if args.run_dir is not None:
            _check_writable_dir("--run-dir", args.run_dir)
        else:
            _check_writable_dir("train.run_dir =", cfg.train.run_dir)
        if cfg.data.task == "mvot-vq":
            return _train_codebook(cfg, args.run_dir)
        trainer = Trainer(cfg, run_dir=args.run_dir)
    from .train.blt_setup import describe_blt
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
            if trainer.tuning is not None:
                print(f"neat: autotune: {trainer.tuning.describe()}", file=sys.stderr)
            if trainer.cfg.blt.enabled:
                print(f"neat: {describe_blt(trainer.cfg)}", file=sys.stderr)
        result = trainer.train()
    finally:
        shutdown(trainer.dist)
    if trainer.dist.is_main:
        print(json.dumps({"step": trainer.step, **{k: round(v, 4) for k, v in result.items()}}))
    return 0


def _train_codebook(cfg, run_dir: str | None) -> int:
    """``neat train --preset mvot-vq``: the visual codebook of MVoT, a VQ-VAE with its own short loop."""
    from .train.vq import train_vq

    where = run_dir or cfg.train.run_dir
    print(f"neat: VQ-VAE of {cfg.vq.codebook} codes on grid renderings ({cfg.mvot.min_size}x{cfg.mvot.min_size} to "
          f"{cfg.mvot.max_size}x{cfg.mvot.max_size} maps); run dir {where}", file=sys.stderr)
    result = train_vq(cfg, run_dir)
    print(json.dumps({"step": cfg.train.steps, **{k: round(v, 6) for k, v in result.items()}}))
    return 0


def _load_run(run: str):
    """Model and config from a run directory or a checkpoint directory (``--run``)."""
    from .config import from_dict
    from .nn.build import build_model
    from .train import checkpoint as ckpt

    _check_dir("--run", run, "run or checkpoint directory")
    found = ckpt.read_checkpoint(run)   # every file verified, the weights checked against the saved config
    cfg = from_dict(found.config)
    model = build_model(cfg)
    model.load_state_dict(found.states["model"])
    return model, cfg


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .nn.model import generate

    if args.adapt:
        args.prompt = "def " if args.prompt is None else args.prompt
        model = _adapted_for_prompt(args)
    else:
        _no_adapt_flags(args)
        model, cfg = _load_run(args.run)
        if cfg.data.task == "mvot":
            return _mvot_generate(model, cfg, args)
    if args.images is not None or args.example is not None:
        raise NeatError("--images and --example go with a run of data.task = 'mvot' (visual thoughts)")
    args.prompt = "def " if args.prompt is None else args.prompt
    temperature = 0.8 if args.temperature is None else args.temperature
    prompt = torch.tensor(list(args.prompt.encode("utf-8")) or [10], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, prompt, args.max_bytes, temperature, args.top_k, gen)
    seconds = time.perf_counter() - start
    sys.stdout.write(args.prompt + bytes(out.tolist()).decode("utf-8", errors="replace") + "\n")
    per_byte = f", {seconds * 1e3 / len(out):.1f} ms per byte" if len(out) else ""
    print(f"neat: {len(out)} bytes in {seconds:.2f} s{per_byte} (the {prompt.numel()}-byte prompt read once, "
          "then one byte per step)", file=sys.stderr)
    return 0


def _mvot_generate(model, cfg, args: argparse.Namespace) -> int:
    """``neat generate`` of an MVoT run: held-out test example ``--example`` is the prompt; the model
    writes its visual thoughts and answer; ``--images DIR`` writes them as PNG beside the truth."""
    import torch

    from .data.gridworld import header, make_example
    from .data.mvot import load_task
    from .train.mvot import decode_images, think, thought_grid
    from .train.png import write_png

    if args.prompt is not None:
        raise NeatError("--prompt: an MVoT run answers grid-world questions; choose one with --example N "
                        "(a held-out test map)")
    out_dir = _check_writable_dir("--images", args.images) if args.images is not None else None
    task = load_task(cfg.mvot, cfg.vq, cfg.train.seq_len * cfg.train.segments)
    example = make_example("test", args.example or 0, cfg.mvot)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    thought = think(model, task, example, temperature=0.0 if args.temperature is None else args.temperature,
                    generator=gen)
    seconds = time.perf_counter() - start
    text = thought.text
    if out_dir is not None and task.vq is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        truth, made = decode_images(task, thought)
        write_png(out_dir / "start.png", truth[0])
        for k, img in enumerate(made, 1):
            if img is not None:
                text = text.replace(f"[image {k}]", f"[image {k}: {out_dir / f'thought_{k}.png'}]", 1)
                write_png(out_dir / f"thought_{k}.png", img)
        for k, img in enumerate(truth[1:], 1):
            write_png(out_dir / f"truth_{k}.png", img)
        write_png(out_dir / "grid.png", thought_grid(task, [thought]))
    start_image = "[image 0: the start]" if task.vq is not None else ""
    sys.stdout.write(header(example).decode() + start_image + text + ("" if text.endswith("\n") else "\n"))
    where = f"; PNGs in {out_dir} (grid.png: truth above, written below)" if out_dir is not None and task.vq else ""
    print(f"neat: test example {args.example or 0}: answer {thought.answer!r}, truth {example.outcome!r}; "
          f"{len(thought.images)} images written in {seconds:.2f} s{where}", file=sys.stderr)
    return 0


def _mvot_eval(model, cfg, args: argparse.Namespace) -> int:
    """``neat eval --task mvot``: answers (and visual thoughts) written for held-out test maps."""
    from .data.mvot import load_task
    from .train.mvot import mvot_eval

    if cfg.data.task != "mvot":
        raise NeatError(f"--task mvot asks grid-world questions of an MVoT run; this run's data.task is "
                        f"{cfg.data.task!r}")
    task = load_task(cfg.mvot, cfg.vq, cfg.train.seq_len * cfg.train.segments)
    result, _ = mvot_eval(model, task, args.examples, split="test")
    print(json.dumps({"task": "mvot", "thoughts": cfg.mvot.thoughts,
                      **{k: round(v, 4) for k, v in result.items()}}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import apply_overrides, validate
    from .data.source import build_data
    from .hardware import detect
    from .train.evaluate import evaluate

    if args.adapt:
        return _adapted_eval(args)
    _no_adapt_flags(args)
    model, cfg = _load_run(args.run)
    if args.task == "passkey":
        return _passkey_eval(model, cfg, args)
    if args.task == "mvot":
        return _mvot_eval(model, cfg, args)
    if args.stream:
        return _stream_eval(model, cfg, args)
    if args.task:
        apply_overrides(cfg, [f"data.task={args.task}"])
        validate(cfg, check_size=False)   # evaluation takes no training step
    hw = detect(cfg.train.device, "fp32")
    model.to(hw.device)
    data = build_data(cfg)
    batches = data.validation(args.batches or cfg.eval.batches)
    result = evaluate(model, batches, cfg.train.segments, hw.device, accuracy=data.scores_accuracy, mask=data.mask)
    print(json.dumps({"task": data.task, **{k: round(v, 4) for k, v in result.items()}}))
    return 0


def _stream_eval(model, cfg, args: argparse.Namespace) -> int:
    """``neat eval --stream``: every held-out document whole, state carried, memory learning as it
    reads (unless --no-ttl); bits per byte overall and by position, beside general compressors."""
    from .data.corpus import held_out_documents
    from .hardware import detect
    from .train.stream import compressor_bits_per_byte, stream_eval, streaming_model

    if cfg.data.task != "text":
        raise NeatError(f"--stream reads held-out text files; this run's data.task is {cfg.data.task!r}")
    docs = held_out_documents(cfg.data)
    if args.max_files:
        docs = docs[:args.max_files]
    if not docs:
        raise NeatError(f"--stream: the run's data ({cfg.data.path or 'stdlib'}) has no held-out documents "
                        "(data.val_fraction is 0)")
    hw = detect(cfg.train.device, "fp32")
    model = streaming_model(model.to(hw.device))
    learn = not args.no_ttl
    result = stream_eval(model, docs, call_len=args.call_len, learn=learn, device=hw.device,
                         collect_stats=cfg.memory.enabled and learn)

    def rounded(d: dict[str, float]) -> dict[str, float | None]:  # null for an empty bucket (JSON has no NaN)
        return {k: None if math.isnan(v) else round(v, 4) for k, v in d.items()}

    bpb, ref = rounded(result.bits_per_byte()), rounded(compressor_bits_per_byte(docs))
    report = {"task": "stream", "ttl": learn, "documents": len(docs), "bytes": sum(len(d) for d in docs),
              "bpb": bpb, "compressors_bpb": ref}
    if result.stat_sums:  # the memories' inner loop along the file, averaged over layers
        report["memory_by_position"] = {name: rounded(v) for name, v in result.memory_stats().items()}
    print(json.dumps(report))
    return 0


def _passkey_eval(model, cfg, args: argparse.Namespace) -> int:
    """``neat eval --task passkey``: a needle at a random depth in held-out text, at each length."""
    import numpy as np

    from .data.corpus import held_out_documents
    from .hardware import detect
    from .train.stream import passkey_eval, streaming_model

    if args.stream:
        raise NeatError("--stream and --task passkey are two evaluations: run them one at a time")
    if cfg.data.task == "mqar":  # text and passkey runs name a corpus; an MQAR run has none
        raise NeatError(f"--task passkey hides the needle in held-out text; this run's data.task is {cfg.data.task!r}")
    docs = held_out_documents(cfg.data)
    haystack = np.frombuffer(b"".join(docs), dtype=np.uint8)
    if haystack.size < max(args.lengths):
        raise NeatError(f"--lengths {max(args.lengths)}: the run's held-out text has only {haystack.size} bytes "
                        "to hide the needle in")
    hw = detect(cfg.train.device, "fp32")
    model = streaming_model(model.to(hw.device))
    acc = passkey_eval(model, haystack, args.lengths, examples=args.examples, call_len=args.call_len,
                       learn=not args.no_ttl, device=hw.device)
    print(json.dumps({"task": "passkey", "ttl": not args.no_ttl, "examples": args.examples,
                      "accuracy": {str(k): round(v, 4) for k, v in acc.items()}}))
    return 0


def _no_adapt_flags(args: argparse.Namespace) -> None:
    used = [flag for flag, value in (("--expert", args.expert), ("--set", args.overrides),
                                     ("--data", getattr(args, "data", None))) if value]
    if used:
        raise NeatError(f"{used[0]} goes with --adapt (adaptation of the run by SVF experts)")


def _adapt_domain(args: argparse.Namespace, cfg):
    """The domain named by --data/--extensions, or the run's own training data."""
    from .adapt.domains import Domain

    if args.data is None:
        return Domain("run-data", cfg.data.path, cfg.data.extensions, cfg.data.val_fraction)
    path = Path(args.data)
    if args.val_fraction > 0.5:
        raise NeatError(f"--val-fraction {args.val_fraction:g}: must be at most 0.5")
    if not path.exists():
        raise NeatError(f"--data {args.data}: no such file or directory")
    return Domain(path.name or "data", str(path), args.extensions, args.val_fraction)


def cmd_adapt(args: argparse.Namespace) -> int:
    """Train one SVF expert on a domain (or, with --classifier, the classifier expert)."""
    from .adapt.session import make_classifier, make_expert, open_run, settings_of

    _check_dir("--run", args.run, "run or checkpoint directory")
    settings = settings_of(args.overrides)
    if args.classifier:
        if args.data is not None or args.name is not None:
            raise NeatError("--classifier trains on the domains of the run's experts: drop --data and --name")
        adapted = open_run(args.run, settings)
        _check_writable_dir("--run", adapted.run_dir / "adapt")
        classifier = make_classifier(adapted, settings, seed=args.seed)
        print(json.dumps({"classifier": str(adapted.run_dir / "adapt" / "classifier.safetensors"),
                          "experts": classifier.experts}))
        return 0
    if args.data is None or args.name is None:
        raise NeatError("neat adapt trains an expert: give --data PATH and --name NAME (or --classifier)")
    from .adapt.files import check_name

    check_name(args.name)
    adapted = open_run(args.run, settings)
    _check_writable_dir("--run", adapted.run_dir / "adapt")
    domain = _adapt_domain(args, adapted.cfg)
    log = (lambda line: print(f"neat: {line}", file=sys.stderr)) if not args.quiet else None
    result = make_expert(adapted, domain, args.name, settings, seed=args.seed, log=log)
    rounded = lambda x: None if math.isnan(x) else round(x, 4)  # noqa: E731
    print(json.dumps({"expert": args.name, "val_bpb_base": rounded(result.val_bpb_before),
                      "val_bpb_expert": rounded(result.val_bpb_after), "steps": result.steps,
                      "seconds": round(result.seconds, 1)}))
    return 0


def _adapted_eval(args: argparse.Namespace) -> int:
    """``neat eval --adapt METHOD``: held-out documents scored past their prefix after the first pass."""
    from .adapt.session import evaluate_documents, open_run, settings_of

    if args.stream or args.task:
        raise NeatError("--adapt scores held-out documents of --data (or of the run's data); drop --stream/--task")
    settings = settings_of(args.overrides)
    adapted = open_run(args.run, settings)
    domain = _adapt_domain(args, adapted.cfg)
    docs = domain.documents(args.docs, args.doc_bytes, settings.prefix + 2)
    if not docs:
        raise NeatError(f"--data {domain.path or 'stdlib'}: no held-out document of at least adapt.prefix + 2 = "
                        f"{settings.prefix + 2} bytes")
    bpb = evaluate_documents(adapted, docs, args.adapt, settings, expert=args.expert, seed=args.seed)
    print(json.dumps({"task": "adapt", "method": args.adapt, "expert": args.expert, "documents": len(docs),
                      "prefix": settings.prefix, "bpb": round(bpb, 4)}))
    return 0


def _adapted_for_prompt(args: argparse.Namespace):
    """The run's model with the z vectors the first pass chooses from the prompt."""
    from .adapt.session import generation_z, open_run, settings_of

    settings = settings_of(args.overrides)
    adapted = open_run(args.run, settings)
    adapted.use(generation_z(adapted, args.adapt, settings, args.prompt.encode("utf-8"), args.expert))
    return adapted.model


def cmd_gradcheck(args: argparse.Namespace) -> int:
    """Exit 0 when every parameter's gradient is present and matches central differences, else 1."""
    import torch

    from .grad.check import check_gradients
    from .nn.build import build_model

    cfg = _load(args)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    x = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1),
                      generator=torch.Generator().manual_seed(args.seed))
    report = check_gradients(model, x[:, :-1], x[:, 1:], samples=args.samples, tolerance=args.tolerance,
                             seed=args.seed)
    print(report.table())
    return 0 if report.ok else 1


def cmd_hw(args: argparse.Namespace) -> int:
    """The profile of this machine, from the per-user cache or measured (and cached)."""
    from .hw_profile import load_profile, table

    start = time.perf_counter()
    loaded = load_profile(refresh=args.refresh, compile_check=args.compile_check)
    seconds = time.perf_counter() - start
    if loaded.cached:
        note = f"from the cache {loaded.path} (measured {loaded.profile.measured_at}; --refresh measures again)"
    else:
        note = f"measured in {seconds:.1f} s" + (f", cached in {loaded.path}" if loaded.saved else "")
    print(f"neat: hardware profile {loaded.profile.fingerprint}, {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(loaded.profile.to_dict(), indent=1))
    else:
        print(table(loaded.profile))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .train.sweep import plan, results_table, run_sweep

    _check_config_args(args)
    _check_writable_dir("--out", args.out)
    preset = args.preset if args.preset is not None or args.config is not None else "tiny"
    points = plan(args.grid, preset, args.config, args.overrides)  # validates every point first
    print(f"neat: sweep of {len(points)} runs into {args.out}", file=sys.stderr)
    results = run_sweep(points, args.out)
    print(results_table(results), end="")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    run = _check_dir("RUN_DIR", args.run, "run directory")
    _check_writable_dir("RUN_DIR", run / "plots")
    for path in plot_run(run):
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


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def _add_adapt_args(p: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    p.add_argument("--adapt", choices=methods, default=None,
                   help="Transformer² two-pass adaptation: the first pass reads the start (adapt.prefix bytes) and "
                        "picks z vectors: one --expert, the cem mixture of the run's experts, the classifier's "
                        "expert; ttl learns SVF and memory from the document as it is read")
    p.add_argument("--expert", type=_text, default=None, help="with --adapt expert (or ttl: its start)")
    p.add_argument("--set", dest="overrides", type=_text, action="append", default=[], metavar="adapt.KEY=VALUE",
                   help="with --adapt: an adapt.* setting")


def _add_domain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=_text, default=None, metavar="PATH",
                   help="a domain: a file or directory of text (default: the run's own data)")
    p.add_argument("--extensions", type=_text, default=".py", help="with --data: file suffixes read, comma-separated")
    p.add_argument("--val-fraction", type=_finite_float(0.0, inclusive=False), default=0.05,
                   help="with --data: fraction of files held out (> 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neat", description="Train and use test-time-learning language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: tiny preset on the Python stdlib sources)")
    _add_config_args(p)
    p.add_argument("--run-dir", type=_text, default=None, help="override train.run_dir")
    p.add_argument("--resume", type=_text, default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample bytes from a trained run")
    p.add_argument("--run", type=_text, required=True, metavar="RUN_DIR")
    p.add_argument("--prompt", type=_text, default=None, help="UTF-8 text (default: 'def ')")
    p.add_argument("--max-bytes", type=_count, default=200, help="bytes to sample (>= 0)")
    p.add_argument("--temperature", type=_finite_float(0.0, inclusive=True), default=None,
                   help="0 = greedy (default: 0.8; an MVoT run: 0)")
    p.add_argument("--example", type=_count, default=None,
                   help="an MVoT run: the held-out test example to answer (default 0)")
    p.add_argument("--images", type=_text, default=None, metavar="DIR",
                   help="an MVoT run: write the visual thoughts it generates (decoded by its VQ-VAE) as PNG "
                        "into DIR, beside the true states")
    p.add_argument("--top-k", type=_count, default=0, help="0 = no top-k filtering")
    p.add_argument("--seed", type=_seed, default=0)
    _add_adapt_args(p, ("expert", "cem", "classifier"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation bits per byte of a trained run")
    p.add_argument("--run", type=_text, required=True, metavar="RUN_DIR")
    p.add_argument("--batches", type=_count, default=0, help="0 = eval.batches of the run's config")
    p.add_argument("--task", choices=("text", "mqar", "passkey", "mvot"), default=None,
                   help="text: validation bits per byte; mqar: query accuracy; passkey: retrieval accuracy "
                        "at --lengths; mvot: answer accuracy (and image-token accuracy) on --examples held-out "
                        "grid-world maps, thoughts written by the model (default: the run's task; a passkey run then reports val_acc, the fraction "
                        "of answer digits right, on its validation examples)")
    p.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096], help="with --task passkey")
    p.add_argument("--examples", type=_positive, default=20,
                   help="with --task passkey: examples per length; with --task mvot: test examples")
    p.add_argument("--stream", action="store_true",
                   help="read every held-out file whole with state carried; bits per byte by position in the "
                        "file, beside zlib/bz2/xz")
    p.add_argument("--no-ttl", action="store_true",
                   help="with --stream or --task passkey: memories read W0 and never learn")
    p.add_argument("--call-len", type=_positive, default=256,
                   help="with --stream or --task passkey: bytes per model call")
    p.add_argument("--max-files", type=_count, default=0, help="with --stream: first N held-out files (0 = all)")
    _add_adapt_args(p, ("base", "expert", "cem", "classifier", "ttl"))
    _add_domain_args(p)
    p.add_argument("--docs", type=_positive, default=16, help="with --adapt: held-out documents scored")
    p.add_argument("--doc-bytes", type=_positive, default=4096, help="with --adapt: each document cut to this")
    p.add_argument("--seed", type=_seed, default=0, help="with --adapt cem: the search's seed")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("adapt", help="train an SVF expert (Transformer²) of a run on a domain")
    p.add_argument("--run", type=_text, required=True, metavar="RUN_DIR", help="the base run")
    p.add_argument("--name", type=_text, default=None, help="the expert's name (its file: RUN_DIR/adapt/experts/NAME)")
    p.add_argument("--classifier", action="store_true",
                   help="train the classifier expert over the domains of the run's experts instead")
    _add_domain_args(p)
    p.add_argument("--set", dest="overrides", type=_text, action="append", default=[], metavar="adapt.KEY=VALUE",
                   help="an adapt.* setting (see `neat config`)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("gradcheck", help="check every parameter's gradient against central differences")
    _add_config_args(p)
    p.add_argument("--samples", type=_positive, default=4, help="entries checked per parameter tensor")
    p.add_argument("--batch", type=_positive, default=2)
    p.add_argument("--seq-len", type=_int_at_least(2), default=32)
    p.add_argument("--tolerance", type=_finite_float(0.0, inclusive=False), default=1e-5,
                   help="largest relative error accepted (> 0)")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser("hw", help="the profile of this machine: devices, memory, measured matmul and copy "
                                  "speed, attention backends, the precision train.precision = auto picks")
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cached profile")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    p.add_argument("--compile-check", action="store_true",
                   help="also check that torch.compile works (tens of seconds on a CPU)")
    p.set_defaults(func=cmd_hw)

    p = sub.add_parser("sweep", help="train over a grid of config values and tabulate the results")
    _add_config_args(p)
    p.add_argument("--grid", type=_text, action="append", required=True, metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep for one key (repeatable: the grid is the product)")
    p.add_argument("--out", type=_text, default="runs/sweep", help="directory for the runs and results.md")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="write PNG plots of a run's metrics into RUN_DIR/plots")
    p.add_argument("run", type=_text, metavar="RUN_DIR")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="print the resolved config as TOML")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``neat``; return the exit code (0 ok, 1 a check failed, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except NeatError as exc:
        print(f"neat: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)   # an interrupted run: 130 (SIGINT) or 143 (SIGTERM)
    except KeyboardInterrupt:
        print("neat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
