"""The profile of this machine (``neat hw``): what each device has and what it measures.

Choices that depend on the hardware (the precision, whether a fused attention kernel or
``torch.compile`` can be used) are only as good as what is known about the machine, and specs
say little: two hosts that report the same CPU name train at different speeds, and a dtype the
hardware "supports" can still be slower than fp32. So the profile is measured, not looked up:
per device its memory, matmul GFLOP/s in each dtype it can run, copy bandwidth, which
``scaled_dot_product_attention`` backends run (forward and backward), optionally whether
``torch.compile`` works, and what ``train.precision = "auto"`` would choose for the tiny preset.

Measuring takes seconds, so the profile is cached per user (``$XDG_CACHE_HOME/neatlm``, by default
``~/.cache/neatlm``) under a fingerprint of what the numbers depend on: the device names, the torch
version, the cores this process may run on and torch's thread count. A cache that cannot be
written costs a warning, never the command. :mod:`neatlm.hardware` keeps the choice of device and
precision; this module only describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hardware import ProbeShape, choose_precision

SCHEMA = 1
log = logging.getLogger("neatlm.hw")

# CPU flags that decide which reduced-precision kernels exist (x86 and Arm spellings)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "asimd", "sve", "bf16",
                "i8mm")
# the dtypes timed per device type; tf32 is fp32 inputs with TensorFloat-32 matmuls (CUDA only)
MATMUL_DTYPES = {"cpu": ("fp32", "bf16", "fp16"), "cuda": ("fp32", "tf32", "bf16", "fp16"),
                 "mps": ("fp32", "bf16", "fp16")}
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
# measurement sizes and time budgets: the whole profile of a 2-core CPU takes a few seconds
MATMUL_SIZE = {"cpu": 512, "cuda": 4096, "mps": 2048}
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30, "mps": 256 * 2**20}   # beyond the last-level cache
BUDGET_S = 0.25   # per measurement, after the warm-up


@dataclass
class DeviceProfile:
    """One device. Memory in bytes (None where it cannot be read), throughput per second."""

    device: str                             # "cpu", "cuda:0", "mps"
    name: str
    memory_total: int | None
    memory_free: int | None
    matmul_gflops: dict[str, float | None]  # by dtype; None: this device cannot run it
    copy_gbs: float | None                  # bytes read + written per second by a large tensor copy
    sdpa: dict[str, bool]                   # attention backend -> runs forward and backward
    compile: bool | None                    # torch.compile works; None: not checked (--compile-check)
    precision: str                          # what train.precision = "auto" picks for the tiny preset
    step_ms: dict[str, float]               # the precision probe's training step, by precision


@dataclass
class MachineProfile:
    schema: int
    fingerprint: str
    torch: str
    cores: int            # CPUs this process may run on (sched_getaffinity)
    threads: int          # torch's intra-op threads
    cpu_features: list[str]
    devices: list[DeviceProfile]
    measured_at: str      # ISO 8601, UTC
    seconds: float        # how long the measurement took

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineProfile":
        """The profile a cache file holds; ``KeyError``/``TypeError`` when it is not one."""
        devices = [DeviceProfile(**d) for d in data["devices"]]
        return cls(**{**data, "devices": devices})


@dataclass(frozen=True)
class Identity:
    """What the measurements depend on, known without measuring: the cache key."""

    names: tuple[str, ...]   # one per device, cpu first
    torch: str
    cores: int
    threads: int

    @property
    def fingerprint(self) -> str:
        text = json.dumps([list(self.names), self.torch, self.cores, self.threads])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- what is here


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_name() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_features() -> list[str]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in CPU_FEATURES if f in flags]


def cpu_cores() -> int:
    """CPUs this process may run on (a container or ``taskset`` may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not on Linux
        return os.cpu_count() or 1


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes from /proc/meminfo (MemTotal, MemAvailable); None where unreadable."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("MemTotal"), found.get("MemAvailable")


def devices_here() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(torch.device("mps"))
    return devices


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    return cpu_name()


def identify() -> Identity:
    return Identity(tuple(device_name(d) for d in devices_here()), torch.__version__, cpu_cores(),
                    torch.get_num_threads())


# ---------------------------------------------------------------------------- measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def best_time(fn: Callable[[], Any], device: torch.device, budget: float = BUDGET_S) -> float:
    """Seconds of the fastest of repeated calls of ``fn`` after one warm-up call: at least three
    calls, more while within ``budget``; a call so slow that three would take far longer than the
    budget (fp16 matmuls on a CPU without fp16 units) stops it early."""
    fn()
    _sync(device)
    best, start, runs = math.inf, time.perf_counter(), 0
    while runs < 100:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        now = time.perf_counter()
        best, runs = min(best, now - t0), runs + 1
        if (runs >= 3 and now - start > budget) or now - start > 2 * budget:
            break
    return best


@contextmanager
def _tf32(device: torch.device, enabled: bool) -> Iterator[None]:
    """fp32 matmuls as TensorFloat-32 (on) or true fp32 (off) on CUDA; restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_gflops(device: torch.device, dtype: str, size: int) -> float | None:
    """GFLOP/s of a (size x size) @ (size x size) matmul in ``dtype``; None when it cannot run."""
    try:
        a = torch.randn(size, size, device=device).to(TORCH_DTYPES[dtype])
        b = torch.randn(size, size, device=device).to(TORCH_DTYPES[dtype])
        with _tf32(device, dtype == "tf32"):
            seconds = best_time(lambda: torch.mm(a, b), device)
    except (RuntimeError, TypeError):   # dtype not implemented on this backend
        return None
    return 2 * size ** 3 / seconds / 1e9


def copy_gbs(device: torch.device, free: int | None) -> float | None:
    """Bytes read and written per second (GB/s) copying a tensor larger than the caches (at most
    an eighth of the free memory)."""
    nbytes = COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    if free is not None:
        nbytes = min(nbytes, free // 8)
    if nbytes < 2**20:
        return None
    try:
        src = torch.ones(nbytes // 4, device=device)   # written once, so its pages exist
        dst = torch.empty_like(src)
        seconds = best_time(lambda: dst.copy_(src), device)
    except RuntimeError:   # out of memory
        return None
    return 2 * nbytes / seconds / 1e9


def sdpa_backends(device: torch.device) -> dict[str, bool]:
    """Which ``scaled_dot_product_attention`` backends run a tiny causal forward and backward
    (half precision on a GPU, where the fused kernels need it; fp32 elsewhere)."""
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    works = {}
    for name, member in SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:   # this torch has no such backend
            works[name] = False
            continue
        q = torch.randn(1, 2, 16, 32, device=device, dtype=dtype, requires_grad=True)
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")   # a refused backend also warns why
                out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
                out.float().sum().backward()
            works[name] = bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all())
        except RuntimeError:
            works[name] = False
    return works


def compile_works(device: torch.device) -> bool:
    """Whether ``torch.compile`` compiles and runs a tiny function correctly here (a C++ compiler,
    Triton on a GPU). Any failure counts as no. Takes seconds to tens of seconds on a CPU."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + x

    try:
        x = torch.randn(64, device=device)
        return bool(torch.allclose(torch.compile(fn, fullgraph=True)(x), fn(x), atol=1e-5))
    except Exception:   # noqa: BLE001 - compile fails in many ways (no compiler, no triton, ...)
        return False


def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(total, free) bytes: the host's for the CPU, the device's for a GPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    if device.type == "cpu":
        return host_memory()
    return None, None


def measure_device(device: torch.device, compile_check: bool) -> DeviceProfile:
    total, free = device_memory(device)
    size = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    gflops = {d: matmul_gflops(device, d, size) for d in MATMUL_DTYPES.get(device.type, ("fp32",))}
    precision, timings = choose_precision(device, "auto", ProbeShape.for_width(128))
    return DeviceProfile(
        device=str(device), name=device_name(device), memory_total=total, memory_free=free,
        matmul_gflops=gflops, copy_gbs=copy_gbs(device, free), sdpa=sdpa_backends(device),
        compile=compile_works(device) if compile_check else None,
        precision=precision, step_ms={p: t * 1e3 for p, t in timings.items()})


def measure(identity: Identity, compile_check: bool = False) -> MachineProfile:
    """Measure every device here (seconds; tens more with ``compile_check`` on a CPU)."""
    start = time.perf_counter()
    devices = [measure_device(d, compile_check) for d in devices_here()]
    return MachineProfile(
        schema=SCHEMA, fingerprint=identity.fingerprint, torch=identity.torch, cores=identity.cores,
        threads=identity.threads, cpu_features=cpu_features(), devices=devices,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/neatlm``, or ``~/.cache/neatlm`` (the XDG rule: a relative
    ``XDG_CACHE_HOME`` is ignored)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "neatlm"


_warned: set[Path] = set()


def _warn_once(directory: Path, why: str) -> None:
    if directory not in _warned:
        _warned.add(directory)
        log.warning("warning: the hardware profile cache %s cannot be written (%s); the profile is not saved",
                    directory, why)


def read_cached(path: Path, fingerprint: str) -> MachineProfile | None:
    """The profile in ``path`` if it is a readable profile of this machine, else None (measure again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        profile = MachineProfile.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if profile.schema != SCHEMA or profile.fingerprint != fingerprint:
        return None
    return profile


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed over it, so a reader never
    sees half a file (raises OSError when the directory cannot be created or written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save(profile: MachineProfile, path: Path) -> bool:
    """Write ``path`` atomically; warn once and return False when the directory cannot be created
    or written."""
    try:
        write_json_atomic(path, profile.to_dict())
    except OSError as exc:
        _warn_once(path.parent, exc.strerror or type(exc).__name__)
        return False
    return True


@dataclass
class Loaded:
    profile: MachineProfile
    path: Path        # where the profile is (or would be) cached
    cached: bool      # read from the cache, nothing measured
    saved: bool = False   # written to the cache by this call


def load_profile(refresh: bool = False, compile_check: bool = False, directory: Path | None = None) -> Loaded:
    """This machine's profile: from the cache when it holds one for this fingerprint (``refresh``
    measures again), else measured and saved. A cached profile gets the memory figures of now;
    ``compile_check`` on one that never checked ``torch.compile`` checks only that, and saves it."""
    identity = identify()
    path = (directory or cache_dir()) / f"hw-{identity.fingerprint}.json"
    profile = None if refresh else read_cached(path, identity.fingerprint)
    if profile is not None:
        here = {str(d): d for d in devices_here()}
        for d in profile.devices:   # free memory changes by the minute: read it now
            if d.device in here:
                d.memory_total, d.memory_free = device_memory(here[d.device])
        missing = [d for d in profile.devices if d.compile is None and d.device in here]
        if not (compile_check and missing):
            return Loaded(profile, path, cached=True)
        for d in missing:
            d.compile = compile_works(here[d.device])
        return Loaded(profile, path, cached=True, saved=save(profile, path))
    profile = measure(identity, compile_check)
    return Loaded(profile, path, cached=False, saved=save(profile, path))


# ---------------------------------------------------------------------------- the table


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "fails"
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:.1f}{unit}"


def table(profile: MachineProfile) -> str:
    """The profile as aligned text: a header line, then one column per device."""
    dtypes = [d for d in ("fp32", "tf32", "bf16", "fp16") if any(d in dev.matmul_gflops for dev in profile.devices)]
    rows: list[tuple[str, list[str]]] = [
        ("device", [d.device for d in profile.devices]),
        ("name", [d.name for d in profile.devices]),
        ("memory total / free", [f"{_gb(d.memory_total)} / {_gb(d.memory_free)}" for d in profile.devices]),
    ]
    for dt in dtypes:
        rows.append((f"matmul {dt} GFLOP/s", [_num(d.matmul_gflops[dt]) if dt in d.matmul_gflops else "-"
                                             for d in profile.devices]))
    rows += [
        ("copy bandwidth GB/s", [_num(d.copy_gbs) for d in profile.devices]),
        ("sdpa backends", [", ".join(n for n, ok in d.sdpa.items() if ok) or "none" for d in profile.devices]),
        ("torch.compile", ["not checked" if d.compile is None else "works" if d.compile else "fails"
                           for d in profile.devices]),
        ("precision probe fp32 / bf16 ms", [" / ".join(_num(d.step_ms[p]) if p in d.step_ms else "-"
                                                       for p in ("fp32", "bf16")) for d in profile.devices]),
        ("precision auto (tiny preset)", [d.precision for d in profile.devices]),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(profile.devices))]
    def count(n: int, what: str) -> str:
        return f"{n} {what}" + ("" if n == 1 else "s")

    lines = [f"torch {profile.torch}, {count(profile.cores, 'core')}, {count(profile.threads, 'torch thread')}"
             + (f", CPU features {' '.join(profile.cpu_features)}" if profile.cpu_features else "")]
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:<{w}}" for v, w in zip(values, cols)).rstrip())
    return "\n".join(lines)
