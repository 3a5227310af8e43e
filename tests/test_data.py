"""Corpora, document-level splits and chunking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saematch_core import data
from saematch_core.data import Document, chunk_documents, corpus_chunks, read_corpus, split_documents
from saematch_core.models import ByteTokenizer
from saematch_core.profiles import DataConfig


def _docs(n: int = 200) -> list[Document]:
    return [Document("toy", f"doc{i:03d}", f"document number {i} " * (1 + i % 7)) for i in range(n)]


def test_splits_are_disjoint_complete_and_deterministic() -> None:
    docs = _docs()
    train = split_documents(docs, "train", eval_fraction=0.2)
    evals = split_documents(docs, "eval", eval_fraction=0.2)
    assert {d.doc_id for d in train}.isdisjoint(d.doc_id for d in evals)
    assert len(train) + len(evals) == len(docs)
    assert 0.1 < len(evals) / len(docs) < 0.3
    # Independent of input order, and not simply the input order.
    assert split_documents(docs[::-1], "eval", eval_fraction=0.2) == evals
    assert [d.doc_id for d in train] != sorted(d.doc_id for d in train)
    # A document's split does not depend on which other documents exist.
    assert set(split_documents(docs[:50], "eval", eval_fraction=0.2)) == {d for d in evals if d in docs[:50]}


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'eval', got 'test'"):
        split_documents(_docs(3), "test", eval_fraction=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"eval_fraction: expected in \(0, 1\), got 0"):
        split_documents(_docs(3), "eval", eval_fraction=0)


@pytest.mark.parametrize("bos_id", [None, 7])
def test_chunks_tile_each_document(bos_id: int | None) -> None:
    tok = ByteTokenizer()
    docs = _docs(20)
    chunks = chunk_documents(docs, tok.encode, chunk_len=16, n_tokens=10**9, bos_id=bos_id)
    assert all(2 <= len(c.ids) <= 16 for c in chunks)
    for doc in docs:
        mine = [c for c in chunks if c.doc_id == doc.doc_id]
        if bos_id is not None:
            assert all(c.ids[0] == bos_id for c in mine)
        content = np.concatenate([c.ids[bos_id is not None :] for c in mine])
        assert tok.decode(content.tolist()) == doc.text
        assert [c.start for c in mine] == sorted(c.start for c in mine)


def test_chunk_budget_and_max_chars() -> None:
    tok = ByteTokenizer()
    chunks = chunk_documents(_docs(50), tok.encode, chunk_len=8, n_tokens=100)
    total = sum(len(c.ids) for c in chunks)
    assert 100 <= total < 108
    capped = chunk_documents(_docs(5), tok.encode, chunk_len=8, n_tokens=10**9, max_chars=10)
    assert sum(len(c.ids) for c in capped) == 50
    with pytest.raises(TypeError, match="encode: expected a callable"):
        chunk_documents(_docs(1), "abc", chunk_len=8, n_tokens=10)  # type: ignore[arg-type]


def test_missing_austen_names_the_apt_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "JANEAUSTENR_DIRS", (tmp_path / "janeaustenr",))
    data._read_austen.cache_clear()
    try:
        with pytest.raises(
            FileNotFoundError, match=r"apt-get install -y --no-install-recommends r-cran-janeaustenr"
        ):
            read_corpus("austen")
    finally:
        data._read_austen.cache_clear()


def test_unknown_corpus() -> None:
    with pytest.raises(
        ValueError, match=r"name: expected one of \['austen', 'code', 'reference'\], got 'wiki'"
    ):
        read_corpus("wiki")


def test_code_corpus_excludes_tests() -> None:
    assert data._is_test_path(Path("test/test_os.py"))
    assert data._is_test_path(Path("idlelib/idle_test/htest.py"))
    assert data._is_test_path(Path("unittest/test_x.py"))
    assert not data._is_test_path(Path("json/decoder.py"))
    assert not data._is_test_path(Path("unittest/case.py"))


def _have_austen() -> bool:
    return any((p / "data" / "Rdata.rdx").is_file() for p in data.JANEAUSTENR_DIRS)


@pytest.mark.skipif(not _have_austen(), reason="r-cran-janeaustenr not installed")
def test_real_corpora() -> None:
    austen = read_corpus("austen")
    books = {d.doc_id.split("/")[0] for d in austen}
    assert books == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "persuasion",
        "prideprejudice",
        "sensesensibility",
    }
    assert len(austen) > 250  # one document per chapter
    pride = next(d for d in austen if d.doc_id == "prideprejudice/000")
    assert "It is a truth universally acknowledged" in pride.text
    code = read_corpus("code")
    assert any(d.doc_id == "json/decoder.py" for d in code)
    assert not any("/test/" in f"/{d.doc_id}" or Path(d.doc_id).name.startswith("test_") for d in code)
    reference = read_corpus("reference")
    assert len(reference) > 150 and len({d.text for d in reference}) == len(reference)
    assert next(d for d in reference if d.doc_id == "for/00").text.startswith('The "for" statement')
    config = DataConfig(chunk_len=32, train_tokens=300, eval_tokens=100, max_chars=2000)
    train = corpus_chunks(config, ByteTokenizer().encode, "train")
    evals = corpus_chunks(config, ByteTokenizer().encode, "eval")
    for name in config.corpora:
        assert 300 <= sum(len(c.ids) for c in train[name]) < 332
        assert {c.doc_id for c in train[name]}.isdisjoint(c.doc_id for c in evals[name])
    assert corpus_chunks(config, ByteTokenizer().encode, "train")["code"][0].doc_id == train["code"][0].doc_id
