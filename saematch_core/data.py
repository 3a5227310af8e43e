"""Three real corpora, deterministic document-level splits, and chunks of tokens.

Stand-ins for the paper's OpenWebText / GitHub / WikiText, all available offline:

``austen``
    Jane Austen's six novels, one document per chapter, read from the R package ``janeaustenr``
    (Debian ``r-cran-janeaustenr``): an R lazy-load database (``data/Rdata.rdx`` index +
    ``Rdata.rdb`` blobs, each a 4-byte big-endian length and a zlib stream) parsed with ``rdata``.
``code``
    The Python standard library's own ``*.py`` sources, one document per file, test folders and
    ``test_*`` files excluded.
``reference``
    ``pydoc_data.topics``: the language reference topics behind ``help()``, one document per
    titled section of a topic.

A document belongs to the evaluation split when a hash of ``(corpus, doc_id)`` falls below
``eval_fraction``, so no text is in both splits and the split never depends on reading order.
Documents are taken in hash order (a deterministic shuffle) until the token budget is met and
cut into chunks of at most ``chunk_len`` tokens that never span two documents.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
import struct
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from saematch_core.profiles import CORPUS_NAMES, DataConfig

__all__ = [
    "CORPUS_VERSION",
    "JANEAUSTENR_DIRS",
    "Chunk",
    "Document",
    "Split",
    "chunk_documents",
    "corpus_chunks",
    "read_corpus",
    "split_documents",
]

Split = Literal["train", "eval"]

CORPUS_VERSION = 2
"""Version of the readers' document definitions; part of every activation-cache spec, so caches
built from other documents are rebuilt. Bump it whenever a reader changes what it returns."""

JANEAUSTENR_DIRS: tuple[Path, ...] = (
    Path("/usr/lib/R/site-library/janeaustenr"),
    Path("/usr/local/lib/R/site-library/janeaustenr"),
    Path("/usr/lib/R/library/janeaustenr"),
    Path("/usr/local/lib/R/library/janeaustenr"),
)
"""Where R (Debian's ``r-cran-janeaustenr`` or ``install.packages``) puts the package."""

_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[IVXLCDM\d]+\.?\s*$")
# A heading line followed by an underline of *, = or - (reStructuredText rendered as text).
_SECTION = re.compile(r"\n(?=[^\n]+\n[*=\-]{3,}\n)")
_TEST_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


class Document(NamedTuple):
    """One unit of text that is never split across train and eval."""

    corpus: str
    """Corpus name (``austen``, ``code``, ``reference``)."""
    doc_id: str
    """Identifier, unique within the corpus (``emma/012``, ``json/decoder.py``, ``for``)."""
    text: str
    """The text."""


class Chunk(NamedTuple):
    """At most ``chunk_len`` consecutive tokens of one document."""

    corpus: str
    """Corpus name."""
    doc_id: str
    """Document it comes from."""
    start: int
    """Offset of the first content token within the tokenised document."""
    ids: np.ndarray
    """Token ids, shape (n,), int64, 2 ≤ n ≤ chunk_len; BOS first when the tokenizer has one."""


# ------------------------------------------------------------------------------------------ readers
def _find_janeaustenr() -> Path:
    for folder in JANEAUSTENR_DIRS:
        if (folder / "data" / "Rdata.rdx").is_file():
            return folder / "data"
    tried = ", ".join(str(p) for p in JANEAUSTENR_DIRS)
    raise FileNotFoundError(
        f"{JANEAUSTENR_DIRS[0] / 'data' / 'Rdata.rdx'}: the Austen corpus (R package janeaustenr) is missing "
        f"(looked in {tried}); install it with "
        "`apt-get install -y --no-install-recommends r-cran-janeaustenr` (or `make system-deps`)"
    )


def _parse_r(data: bytes, *, strings: bool = False) -> Any:
    """An R serialised object; with ``strings``, a character vector as a list of str.

    For character vectors the parsed tree is read directly (each element's bytes), which skips
    rdata's conversion step, about 40% of the time.
    """
    import rdata

    with warnings.catch_warnings():
        # Lazy-load blobs carry no RDS header; rdata warns and then parses them correctly.
        warnings.simplefilter("ignore", UserWarning)
        parsed = rdata.parser.parse_data(data)
    obj = parsed.object
    if strings and obj.info.type == rdata.parser.RObjectType.STR:
        return [b"" if x.value is None else x.value for x in obj.value]
    converted = rdata.conversion.convert(parsed)
    return [str(v) for v in np.asarray(converted).tolist()] if strings else converted


@functools.lru_cache(maxsize=1)
def _read_austen() -> tuple[Document, ...]:
    folder = _find_janeaustenr()
    index = _parse_r(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    blob = (folder / "Rdata.rdb").read_bytes()
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(
            f"{folder / 'Rdata.rdx'}: expected an R lazy-load index with 'variables', got {type(index)}"
        )
    docs: list[Document] = []
    for book, (offset, length) in sorted(index["variables"].items()):
        raw = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", raw[:4])
        payload = zlib.decompress(raw[4:])
        if len(payload) != size:
            raise ValueError(
                f"{folder / 'Rdata.rdb'}: object {book!r} inflates to {len(payload)} bytes, expected {size}"
            )
        lines = [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v
            for v in _parse_r(payload, strings=True)
        ]
        docs.extend(_austen_chapters(str(book), lines))
    return tuple(docs)


def _austen_chapters(book: str, lines: Sequence[str]) -> list[Document]:
    starts = [i for i, line in enumerate(lines) if _CHAPTER.match(line)]
    docs = []
    for n, (a, b) in enumerate(zip(starts, [*starts[1:], len(lines)], strict=True)):
        # The R data keeps the printed line wraps; re-join lines into paragraphs.
        paragraphs: list[str] = []
        current: list[str] = []
        for line in lines[a:b]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        docs.append(Document("austen", f"{book}/{n:03d}", "\n\n".join(paragraphs)))
    return docs


def _is_test_path(rel: Path) -> bool:
    return any(part in _TEST_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_")


@functools.lru_cache(maxsize=1)
def _read_code() -> tuple[Document, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not (root / "os.py").is_file():
        raise FileNotFoundError(
            f"{root}: the Python standard library sources (the code corpus) are missing; on Debian install "
            f"`apt-get install -y libpython{sys.version_info.major}.{sys.version_info.minor}-stdlib`"
        )
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _is_test_path(rel) or rel.parts[0] == "pydoc_data":
            continue
        docs.append(Document("code", rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")))
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def _read_reference() -> tuple[Document, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise FileNotFoundError(
            "pydoc_data/topics.py: the reference corpus is missing from the Python standard library; "
            f"on Debian install `apt-get install -y libpython{version}-stdlib`"
        ) from exc
    docs: list[Document] = []
    seen: set[str] = set()
    for name, text in sorted(topics.items()):
        # A topic holds several titled sections; each is a document, so a 10% evaluation split
        # gets enough text. Some sections appear under several topics: keep the first only.
        for n, section in enumerate(_SECTION.split(text.strip())):
            if section.strip() and section not in seen:
                seen.add(section)
                docs.append(Document("reference", f"{name}/{n:02d}", section))
    return tuple(docs)


_READERS = {"austen": _read_austen, "code": _read_code, "reference": _read_reference}


def read_corpus(name: str) -> tuple[Document, ...]:
    """Every document of a corpus, sorted by ``doc_id`` (read once per process).

    Raises
    ------
    FileNotFoundError
        Naming the Debian package to install when the corpus's files are missing.
    """
    if name not in _READERS:
        raise ValueError(f"name: expected one of {list(CORPUS_NAMES)}, got {name!r}")
    return _READERS[name]()


# ------------------------------------------------------------------------------------ splits, chunks
def _unit_hash(*parts: str) -> float:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Sequence[Document], split: Split, *, eval_fraction: float) -> list[Document]:
    """The documents of one split, in a deterministic pseudo-random order.

    A document goes to ``eval`` iff ``sha256(corpus, doc_id)`` as a number in [0, 1) is below
    ``eval_fraction``; the returned order is by a second hash, so a token budget samples the
    whole corpus instead of its first files.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction: expected in (0, 1), got {eval_fraction}")
    chosen = [d for d in docs if (_unit_hash(d.corpus, d.doc_id) < eval_fraction) == (split == "eval")]
    return sorted(chosen, key=lambda d: _unit_hash("order", d.corpus, d.doc_id))


def chunk_documents(
    docs: Sequence[Document],
    encode: Callable[[str], Sequence[int]],
    *,
    chunk_len: int,
    n_tokens: int,
    bos_id: int | None = None,
    max_chars: int | None = None,
) -> list[Chunk]:
    """Tokenise documents in order and cut them into chunks until ``n_tokens`` tokens are collected.

    Parameters
    ----------
    encode : callable ``str -> list[int]`` (the tokenizer's ``encode``).
    chunk_len : maximum tokens per chunk, BOS included.
    n_tokens : budget; whole chunks are taken, so the total may exceed it by less than a chunk.
    bos_id : token prepended to every chunk (Gemma), or None.
    max_chars : read at most this many characters of each document.
    """
    if not callable(encode):
        raise TypeError(f"encode: expected a callable str -> list[int], got {type(encode).__name__}")
    if chunk_len < 2:
        raise ValueError(f"chunk_len: expected >= 2, got {chunk_len}")
    step = chunk_len - (bos_id is not None)
    prefix = [] if bos_id is None else [bos_id]
    chunks: list[Chunk] = []
    total = 0
    for doc in docs:
        text = doc.text if max_chars is None else doc.text[:max_chars]
        ids = encode(text)
        for start in range(0, len(ids), step):
            piece = prefix + list(ids[start : start + step])
            # A lone token has no next-token target and only the excluded position 0.
            if len(piece) < 2:
                continue
            chunks.append(Chunk(doc.corpus, doc.doc_id, start, np.asarray(piece, dtype=np.int64)))
            total += len(piece)
            if total >= n_tokens:
                return chunks
    return chunks


def corpus_chunks(
    config: DataConfig, encode: Callable[[str], Sequence[int]], split: Split, *, bos_id: int | None = None
) -> dict[str, list[Chunk]]:
    """Chunks of every corpus in ``config.corpora`` for one split (train or eval budget)."""
    budget = config.train_tokens if split == "train" else config.eval_tokens
    out = {}
    for name in config.corpora:
        docs = split_documents(read_corpus(name), split, eval_fraction=config.eval_fraction)
        out[name] = chunk_documents(
            docs,
            encode,
            chunk_len=config.chunk_len,
            n_tokens=budget,
            bos_id=bos_id,
            max_chars=config.max_chars,
        )
    return out
