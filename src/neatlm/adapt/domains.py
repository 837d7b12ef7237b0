"""Domains an expert is trained on: a directory (or file) of text and the file suffixes to read.

The benchmark's domains are files every Linux machine of this kind has: the Python standard
library (the base model's own corpus), C headers, Perl modules and packaged documentation. Each
is split into training and held-out files exactly as a training corpus is
(:mod:`neatlm.data.corpus`), so an expert never sees the documents it is scored on.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..data.corpus import Corpus, held_out_documents, load_corpus, training_document_starts
from ..errors import DataError


@dataclass(frozen=True)
class Domain:
    name: str
    path: str              # "" = the Python standard library
    extensions: str        # comma-separated suffixes, as data.extensions
    val_fraction: float = 0.05

    def data_config(self) -> DataConfig:
        return DataConfig(path=self.path, extensions=self.extensions, val_fraction=self.val_fraction)

    def corpus(self) -> Corpus:
        corpus = load_corpus(self.data_config())
        if corpus.val.size == 0:
            raise DataError(f"domain {self.name!r} ({self.path or 'stdlib'}): no held-out bytes")
        return corpus

    def documents(self, count: int, max_bytes: int, min_bytes: int) -> list[bytes]:
        """``count`` held-out documents of at least ``min_bytes``, evenly spaced over the held-out
        files in path order (the first few would all come from one directory), each cut to
        ``max_bytes``: the start of a document, which the first pass of adaptation reads."""
        docs = [d for d in held_out_documents(self.data_config()) if len(d) >= min_bytes]
        if len(docs) > count:
            docs = [docs[round(i * (len(docs) - 1) / max(count - 1, 1))] for i in range(count)]
        return [d[:max_bytes] for d in docs]

    def training_starts(self, length: int) -> list[bytes]:
        """The first ``length`` bytes of each training document that long (never a held-out one)."""
        return training_document_starts(self.data_config(), length)

    def as_meta(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "extensions": self.extensions, "val_fraction": self.val_fraction}

    @staticmethod
    def from_meta(meta: object, source: Path) -> "Domain":
        """The domain an expert file records (``source``: that file, for the error message)."""
        try:
            assert isinstance(meta, dict)
            domain = Domain(str(meta["name"]), str(meta["path"]), str(meta["extensions"]),
                            float(meta["val_fraction"]))
            assert 0.0 < domain.val_fraction <= 0.5
            return domain
        except (AssertionError, KeyError, TypeError, ValueError):
            raise DataError(f"{source}: does not record the domain it was trained on (name, path, extensions, "
                            "val_fraction); train it again with `neat adapt`") from None


def _first_existing(*candidates: str) -> str | None:
    for c in candidates:
        if Path(c).is_dir():
            return c
    return None


def benchmark_domains() -> tuple[list[Domain], list[str]]:
    """(domains found on this machine, lines saying which were skipped and why)."""
    found, skipped = [Domain("python", "", ".py")], []
    if not Path(sysconfig.get_paths()["stdlib"]).is_dir():
        found, skipped = [], ["python: no standard library sources"]
    candidates = [
        ("c-headers", _first_existing("/usr/include"), ".h"),
        ("perl", _first_existing("/usr/share/perl", "/usr/share/perl5"), ".pm"),
        ("docs", _first_existing("/usr/share/doc"), ".txt,.md,.rst,.html"),
    ]
    for name, path, ext in candidates:
        if path is None:
            skipped.append(f"{name}: directory missing")
            continue
        domain = Domain(name, path, ext)
        try:
            domain.corpus()
        except DataError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        found.append(domain)
    return found, skipped
