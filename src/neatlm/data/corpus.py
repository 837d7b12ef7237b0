"""Byte corpora: the Python standard library by default, or a user's file or directory.

The train/validation split is by file and depends only on each file's path relative to the
corpus root (a CRC32 of it), so it is the same on every machine and for every file order.
A corpus of a single file is split by bytes instead: its last ``val_fraction`` is validation.

Batches come from :class:`BatchSampler`, whose batch ``i`` is a pure function of
``(seed, i)``: its whole state is the position (``state_dict()``), which goes into every checkpoint.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError

if TYPE_CHECKING:  # annotations only: the config module needs neatlm.data.passkey at import
    from ..config import DataConfig

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes
    val: np.ndarray
    source: str
    train_files: int
    val_files: int
    train_starts: np.ndarray | None = None  # int64 offset of each training document in ``train``


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` with one of ``extensions`` (all files if empty), sorted, skipping installed packages."""
    files = [
        p for p in root.rglob("*")
        if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts)
        and (not extensions or p.suffix in extensions)
    ]
    return sorted(files)


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Deterministic by-file split: a hash of the relative path, not the file order."""
    return zlib.crc32(relative_path.encode("utf-8")) / 2**32 < val_fraction


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _extensions(cfg: DataConfig) -> tuple[str, ...]:
    return tuple(e.strip() if e.strip().startswith(".") else "." + e.strip()
                 for e in cfg.extensions.split(",") if e.strip())


def _root(cfg: DataConfig) -> tuple[Path, str]:
    """(the corpus file or directory, a description for messages)."""
    if cfg.path:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise DataError(f"data.path = {cfg.path!r}: no such file or directory")
        return root, str(root)
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}; set data.path")
    return root, f"Python standard library ({root})"


def _split_files(root: Path, source: str, cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of a directory corpus, split by a hash of each path."""
    extensions = _extensions(cfg)
    files = list_files(root, extensions)
    if not files:
        raise DataError(f"{source}: no files ending in {', '.join(extensions) or '(any)'} (see data.extensions)")
    train, val = [], []
    for path in files:
        (val if is_validation(path.relative_to(root).as_posix(), cfg.val_fraction) else train).append(path)
    if cfg.val_fraction > 0 and not val:  # tiny directories: hold out the last file
        val.append(train.pop())
    return train, val


def _split_file(data: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    """(training bytes, held-out tail) of a single-file corpus."""
    n_val = int(round(len(data) * val_fraction))
    return data[:len(data) - n_val], data[len(data) - n_val:]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus named by ``cfg.path`` (empty = stdlib ``.py`` files) and split it."""
    root, source = _root(cfg)
    if root.is_file():
        train_bytes, val_bytes = _split_file(_read(root), cfg.val_fraction)
        if len(train_bytes) + len(val_bytes) < 2:
            raise DataError(f"data.path = {cfg.path!r}: the file is empty")
        as_array = lambda b: np.frombuffer(b, dtype=np.uint8)  # noqa: E731
        return Corpus(as_array(train_bytes), as_array(val_bytes), source, 1, 0, np.zeros(1, dtype=np.int64))
    train_files, val_files = _split_files(root, source, cfg)
    train_docs = [_read(p) for p in train_files]
    train = np.frombuffer(b"".join(train_docs), dtype=np.uint8)
    val = np.frombuffer(b"".join(_read(p) for p in val_files), dtype=np.uint8)
    if train.size < 2:
        raise DataError(f"{source}: the training files are empty")
    starts = np.cumsum([0] + [len(d) for d in train_docs[:-1]], dtype=np.int64)
    return Corpus(train, val, source, len(train_files), len(val_files), starts)


def held_out_documents(cfg: DataConfig) -> list[bytes]:
    """The held-out documents whole, in a fixed order: each held-out file of a directory corpus,
    or the held-out tail of a single-file corpus (streaming evaluation reads them one by one)."""
    root, source = _root(cfg)
    if root.is_file():
        held_out = _split_file(_read(root), cfg.val_fraction)[1]
        return [held_out] if held_out else []
    return [_read(p) for p in _split_files(root, source, cfg)[1]]


def training_document_starts(cfg: DataConfig, length: int) -> list[bytes]:
    """The first ``length`` bytes of every training file of a directory corpus that has that many
    (a document's start, where a prompt or a header sits); empty for a single-file corpus."""
    root, source = _root(cfg)
    if root.is_file():
        return []
    starts = []
    for path in _split_files(root, source, cfg)[0]:
        with open(path, "rb") as f:
            head = f.read(length)
        if len(head) == length:
            starts.append(head)
    return starts


class PositionedSampler:
    """A sampler whose batch ``i`` is a function of ``(seed, i)``: its whole state is the position
    of the next batch (everything else comes from the config)."""

    position: int

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def starts_fresh(self, batch: int) -> bool:
        """Whether batch ``batch`` begins new sequences in every row: a carried model state must
        not continue into it. Only episodes of documents do (:class:`DocumentSampler`)."""
        return False

    def load_state_dict(self, sd: dict[str, int]) -> None:
        value = sd["position"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sampler position {value!r} is not a batch count")
        self.position = value


class BatchSampler(PositionedSampler):
    """Random windows of ``seq_len + 1`` bytes; batch ``i`` depends only on ``(seed, i)``."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int, position: int = 0):
        if data.size < seq_len + 1:
            raise DataError(f"the training data has {data.size} bytes, fewer than train.seq_len + 1 = {seq_len + 1}")
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.position = position

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 of shape (batch, seq_len); targets are inputs shifted by one."""
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        starts = rng.integers(0, self.data.size - self.seq_len, size=self.batch_size)
        return windows(self.data, starts, self.seq_len)


class StreamSampler(PositionedSampler):
    """Contiguous streams: row ``b`` of batch ``i`` is the ``seq_len`` bytes that follow row ``b`` of
    batch ``i - 1`` (each row starts at a seeded random offset and wraps at the end of the data).

    With the model state carried from step to step (``memory.reset = "never"``) this is truncated
    backprop through one unbroken stream per row, as a recurrent language model is trained: the
    memory is trained in the regime it is used in, thousands of updates into a document, which
    random windows that reset never reach.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int, position: int = 0):
        if data.size < 2 * (seq_len + 1):
            raise DataError(f"the training data has {data.size} bytes, too few for streams of train.seq_len + 1 = "
                            f"{seq_len + 1} bytes")
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.position = position
        self.offsets = np.random.default_rng([seed, 0x5EED]).integers(0, data.size - seq_len - 1, size=batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 of shape (batch, seq_len); row b continues the previous batch's row b."""
        span = self.data.size - self.seq_len - 1      # starts in [0, span): every window is whole
        starts = (self.offsets + self.position * self.seq_len) % span
        self.position += 1
        return windows(self.data, starts, self.seq_len)


class DocumentSampler(PositionedSampler):
    """Episodes of ``episode`` consecutive windows read from the start of a document: in episode
    e, row b reads a seeded random training document (one with at least ``episode * seq_len + 1``
    bytes) from its first byte on, window after window; then every row starts a new document.

    With the model state carried from step to step (``memory.reset = "never"``) and reset where an
    episode starts (:meth:`starts_fresh`), the memory is trained the way streaming evaluation uses
    it: from its initial state at a document's first byte, thousands of updates into it. Carried
    streams (:class:`StreamSampler`) cross documents with the state of the previous one and never
    see a fresh state after the first steps.
    """

    def __init__(self, data: np.ndarray, doc_starts: np.ndarray, batch_size: int, seq_len: int, episode: int,
                 seed: int, position: int = 0, source: str = "the corpus"):
        ends = np.append(doc_starts[1:], data.size)
        need = episode * seq_len + 1
        self.starts = doc_starts[ends - doc_starts >= need]
        if self.starts.size == 0:
            raise DataError(f"{source}: no training document has data.episode_windows * train.seq_len + 1 = {need} "
                            f"bytes (the longest has {int((ends - doc_starts).max())}); lower data.episode_windows or "
                            "train.seq_len")
        self.data, self.batch_size, self.seq_len, self.episode, self.seed = data, batch_size, seq_len, episode, seed
        self.position = position

    def starts_fresh(self, batch: int) -> bool:
        return batch % self.episode == 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 of shape (batch, seq_len): window ``position % episode`` of
        each row's document in the current episode."""
        episode, k = divmod(self.position, self.episode)
        docs = np.random.default_rng([self.seed, 0xD0C, episode]).integers(0, self.starts.size, size=self.batch_size)
        self.position += 1
        return windows(self.data, self.starts[docs] + k * self.seq_len, self.seq_len)


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(data[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def validation_batches(data: np.ndarray, batch_size: int, seq_len: int, n_batches: int):
    """Evenly spaced windows over the validation data: the same batches for every evaluation."""
    if data.size < seq_len + 1:
        raise DataError(f"the validation data has {data.size} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                        "raise data.val_fraction or add files")
    total = batch_size * n_batches
    starts = np.linspace(0, data.size - seq_len - 1, num=total).astype(np.int64)
    for i in range(n_batches):
        yield windows(data, starts[i * batch_size:(i + 1) * batch_size], seq_len)
