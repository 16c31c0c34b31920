"""Text sources: text tables (CSV/TSV/JSONL/Parquet/Orange .tab), fortunes, plain-text corpora,
undecodable bytes, hf: names, resolve's routing, and the real built-ins (R8, fortunes)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from danlu.data import builtin, text
from danlu.data.build import resolve
from danlu.data.hf import hf_dataset
from danlu.data.tables import read_table
from danlu.data.text import (
    RawCorpus,
    RawPairs,
    RawText,
    make_pairs,
    read_corpus,
    read_fortunes,
    read_orange_tab,
)
from danlu.errors import DataError

REVIEWS = [
    ("a fine film, well acted", "pos"),
    ("dull and far too long", "neg"),
    ("I laughed, I cried", "pos"),
    ("the plot makes no sense", "neg"),
    ("Überraschend gut — “wow”", "pos"),
]


def _resolve(dataset: str | Path, **kw):
    return resolve(str(dataset), image={}, cache_dir=None, mirror=None, download=False, **kw)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


# ------------------------------------------------------------------------- text tables


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_text_tables_give_raw_text(tmp_path: Path, kind: str) -> None:
    frame = pd.DataFrame({"id": range(5), "review": [t for t, _ in REVIEWS]})
    frame["sentiment"] = [s for _, s in REVIEWS]
    path = tmp_path / f"reviews.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif kind == "jsonl":
        _jsonl(path, frame.to_dict("records"))
    else:
        frame.to_parquet(path)
    raw = _resolve(path, text="review", label="sentiment")
    assert isinstance(raw, RawText)
    assert raw.texts == [t for t, _ in REVIEWS]
    assert raw.labels.tolist() == ["pos", "neg", "pos", "neg", "pos"]
    assert (raw.text_name, raw.label_name, raw.origin) == ("review", "sentiment", str(path))
    assert raw.test_texts is None


def test_jsonl_defaults_to_text_and_label_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl", [{"text": t, "label": i % 2} for i, (t, _) in enumerate(REVIEWS)]
    )
    raw = _resolve(path)
    assert isinstance(raw, RawText) and raw.labels.tolist() == [0, 1, 0, 1, 0]
    frame = read_table(path)  # JSONL is a table format too
    assert list(frame.columns) == ["text", "label"] and len(frame) == 5


def test_jsonl_skips_blank_lines_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\n\n{"text": "b", "label": 2}\n\n')
    assert read_table(path).to_dict("list") == {"text": ["a", "b"], "label": [1, 2]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "b", "label": ', "line 3: not valid JSON"),
        ('["b", 1]', "line 3: expected a JSON object {...}, got list"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n' + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        _resolve(path)
    assert str(path) in str(e.value)


def test_missing_columns_list_the_columns_found(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "x", "stars": 3}])
    with pytest.raises(DataError) as e:
        _resolve(path)
    assert "text column 'text' not found (columns found: body, stars)" in str(e.value)
    assert "set data.text" in str(e.value)
    with pytest.raises(DataError, match=r"label column 'label' not found .*body, stars"):
        _resolve(path, text="body")
    assert _resolve(path, text="body", label="stars").labels.tolist() == [3]


def test_empty_documents_name_the_first_row_and_the_count(tmp_path: Path) -> None:
    rows = [{"text": t, "label": "x"} for t in ["ok", "  ", "fine", "", None, "good"]]
    with pytest.raises(DataError) as e:
        _resolve(_jsonl(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert "row 2 has an empty column 'text' (3 empty of 6)" in msg
    assert "drop the empty documents from the file" in msg


def test_missing_labels_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfirst,a\nsecond,\nthird,\n")
    with pytest.raises(DataError, match="row 2 has no value in label column 'label' \\(2 rows"):
        _resolve(path, text="text")


def test_pairs_from_a_table(tmp_path: Path) -> None:
    rows = [{"en": "hello", "es": "hola"}, {"en": "good night", "es": "buenas noches"}]
    raw = _resolve(_jsonl(tmp_path / "p.jsonl", rows), text="en", target="es")
    assert isinstance(raw, RawPairs)
    assert (raw.sources, raw.targets) == (["hello", "good night"], ["hola", "buenas noches"])
    default = _resolve(
        _jsonl(tmp_path / "q.jsonl", [{"source": "a", "target": "b"}]), task="seq2seq"
    )
    assert (default.sources, default.targets) == (["a"], ["b"])


def test_misaligned_pairs_are_an_error(tmp_path: Path) -> None:
    rows = [
        {"source": "one", "target": "uno"},
        {"source": "two", "target": ""},
        {"source": "three"},
    ]
    with pytest.raises(DataError) as e:
        _resolve(_jsonl(tmp_path / "p.jsonl", rows), task="seq2seq")
    assert "the pairs do not align: row 2 has an empty target side (2 empty of 3)" in str(e.value)
    with pytest.raises(DataError, match="3 source texts but 2 target texts"):
        make_pairs(["a", "b", "c"], ["x", "y"], "lists")
    with pytest.raises(DataError, match=r"the pairs do not align: Gen\.1\.2 has an empty source"):
        make_pairs(["a", " "], ["x", "y"], "verses", keys=["Gen.1.1", "Gen.1.2"])


def test_csv_undecodable_bytes_name_the_offset_or_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncafé,a\n".encode() + "naïve,b\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        _resolve(path, text="text")
    assert f"'{path}': the bytes at offset 21 (ef 76 65 2c) are not valid UTF-8" in str(e.value)
    assert "data.encoding_errors: replace" in str(e.value)
    raw = _resolve(path, text="text", encoding_errors="replace")
    assert raw.texts == ["café", "na\ufffdve"]


def test_jsonl_undecodable_bytes_name_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 2}\n')
    with pytest.raises(DataError, match=r"line 2: the bytes at offset 40 \(e9 22 2c 20\)"):
        _resolve(path)
    assert _resolve(path, encoding_errors="replace").texts == ["ok", "caf\ufffd"]


# ----------------------------------------------------------------------- Orange .tab

ORANGE = (
    "Category\tText\n"
    "d\tstring\n"
    "class\t\n"
    "\n"
    "earn\tshares rose sharply\n"
    "acq\tthe company agreed to buy a rival\n"
    'earn\t"quoted ""profit"" text"\n'
)


def test_orange_tab_layout_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "news.tab"
    path.write_text(ORANGE)
    frame = read_orange_tab(path)
    assert list(frame.columns) == ["Category", "Text"] and len(frame) == 3  # blank row skipped
    assert frame.attrs["orange"] == {"types": ["d", "string"], "flags": ["class", ""]}
    raw = _resolve(path)
    assert raw.labels.tolist() == ["earn", "acq", "earn"]
    assert raw.texts[2] == 'quoted "profit" text'


def test_orange_tab_tweet_layout_without_blank_row_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "tweets.tab"
    rows = [
        "Time\tAuthor\tContent\tPlace",
        "time\tdiscrete\tstring\tstring",
        "\tclass\tmeta include=True\tmeta",
        "2016-09-28\tHillaryClinton\tWho can put the plans into action?\t",
        '2016-09-27\trealDonaldTrump\t"He said ""thanks"", then left"\t',
        '2016-09-27\trealDonaldTrump\ta stray " quote stays\t',
    ]
    path.write_bytes("\r\n".join(rows).encode() + b"\r\n")
    raw = _resolve(path)
    assert (raw.text_name, raw.label_name) == ("Content", "Author")
    assert raw.texts == [
        "Who can put the plans into action?",
        'He said "thanks", then left',
        'a stray " quote stays',
    ]
    assert raw.labels.tolist() == ["HillaryClinton", "realDonaldTrump", "realDonaldTrump"]


def test_orange_tab_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.tab"
    short.write_text("Text\n")
    with pytest.raises(DataError, match="lacks Orange's three header rows"):
        read_orange_tab(short)
    wide = tmp_path / "wide.tab"
    wide.write_text("Category\tText\nd\tstring\nclass\t\nearn\tok\nearn\tone\textra\n")
    with pytest.raises(DataError, match="data row 2 has 3 fields, header 2"):
        read_orange_tab(wide)


# --------------------------------------------------------------------------- fortunes


@pytest.fixture
def fortunes(tmp_path: Path) -> Path:
    """<root>/{art,food} (en), de/{sprueche,witze.fortunes}, es/{vida,amor}.fortunes, plus the
    files a reader must skip: *.dat, *.u8 links, es/off/, a non-.fortunes Spanish file."""
    root = tmp_path / "fortunes"
    (root / "de").mkdir(parents=True)
    (root / "es" / "off").mkdir(parents=True)
    (root / "art").write_text("Art is long.\n%\nLife is short.\n\t\t-- Hippocrates\n%\n")
    (root / "food").write_text("Eat.\n%\n%\nDrink.\n")  # an empty entry is dropped
    (root / "art.dat").write_bytes(b"\x00\x00\x00\x02")
    (root / "art.u8").symlink_to("art")
    (root / "de" / "sprueche").write_text(
        "Übung macht den Meister.\n%\nMorgenstund hat Gold im Mund.\n"
    )
    (root / "de" / "witze.fortunes").write_text("Ein Witz.\n")
    (root / "de" / "sprueche.u8").symlink_to("sprueche")
    (root / "es" / "vida.fortunes").write_text("La vida es sueño.\n% \nY los sueños, sueños son.\n")
    (root / "es" / "amor.fortunes").write_text("Amor con amor se paga.\n")
    (root / "es" / "off" / "malo.fortunes").write_text("no\n")
    (root / "es" / "notas.txt").write_text("not a fortune file\n")
    return root


def test_fortunes_by_language(fortunes: Path) -> None:
    raw = read_fortunes(fortunes)
    assert raw.labels.tolist() == ["en"] * 4 + ["de"] * 3 + ["es"] * 3
    assert raw.texts[:4] == ["Art is long.", "Life is short.\n\t\t-- Hippocrates", "Eat.", "Drink."]
    assert raw.texts[-3:] == [
        "Amor con amor se paga.",
        "La vida es sueño.",
        "Y los sueños, sueños son.",
    ]
    assert (raw.label_name, raw.task) == ("language", "classification")


def test_fortunes_by_category(fortunes: Path) -> None:
    raw = read_fortunes(fortunes, by="category")
    assert sorted(set(raw.labels.tolist())) == [
        "art", "de/sprueche", "de/witze", "es/amor", "es/vida", "food"
    ]  # fmt: skip
    with pytest.raises(DataError, match="by language or category, not 'author'"):
        read_fortunes(fortunes, by="author")


def test_fortunes_undecodable_and_missing(fortunes: Path, tmp_path: Path) -> None:
    (fortunes / "de" / "alt").write_bytes("Grüße\n%\n".encode() + "Straße\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"alt': the bytes at offset 14 \(df 65 0a\)"):
        read_fortunes(fortunes)
    raw = read_fortunes(fortunes, encoding_errors="replace")
    assert "Stra\ufffde" in raw.texts
    with pytest.raises(DataError, match="no fortune files found"):
        read_fortunes(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- corpora


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("First paragraph,\nsecond line.\n\n\nSecond paragraph.\n")
    (root / "b" / "c.txt").write_bytes(b"\xef\xbb\xbfWindows line\r\n\r\nends here\r\n")
    (root / "b" / "notes.md").write_text("not a .txt file\n")
    (root / "empty.txt").write_text("\n\n")
    return root


def test_folder_corpus_streams_paragraphs(corpus_dir: Path) -> None:
    corpus = read_corpus(corpus_dir)
    docs = ["First paragraph,\nsecond line.", "Second paragraph.", "Windows line", "ends here"]
    assert list(corpus.documents()) == docs
    assert list(corpus.documents()) == docs  # re-iterable
    assert corpus.size_bytes == sum(p.stat().st_size for p in corpus_dir.rglob("*.txt")) == 82
    expected = hashlib.sha256()
    for rel in ["a.txt", "b/c.txt", "empty.txt"]:
        data = (corpus_dir / rel).read_bytes()
        expected.update(f"{rel}\0{len(data)}\0".encode() + data)
    assert corpus.content_hash == expected.hexdigest()
    by_file = read_corpus(corpus_dir, unit="file")
    assert list(by_file.documents())[1] == "Windows line\r\n\r\nends here\r"
    assert len(list(read_corpus(corpus_dir, pattern="*.md").documents())) == 1


def test_corpus_hash_follows_content_and_names(corpus_dir: Path) -> None:
    before = read_corpus(corpus_dir).content_hash
    (corpus_dir / "a.txt").rename(corpus_dir / "z.txt")
    renamed = read_corpus(corpus_dir).content_hash
    (corpus_dir / "z.txt").write_text("changed\n")
    assert len({before, renamed, read_corpus(corpus_dir).content_hash}) == 3


def test_corpus_from_file_glob_and_resolve(corpus_dir: Path) -> None:
    lm = {"task": "language_modeling"}
    one = _resolve(corpus_dir / "a.txt", **lm)
    assert isinstance(one, RawCorpus) and len(list(one.documents())) == 2
    assert len(list(_resolve(corpus_dir, **lm).documents())) == 4
    globbed = _resolve(f"{corpus_dir}/**/*.txt", **lm)
    assert list(globbed.documents()) == list(read_corpus(corpus_dir).documents())
    assert globbed.content_hash == read_corpus(corpus_dir).content_hash  # same relative paths
    with pytest.raises(DataError, match="globs of text files are corpora"):
        _resolve(f"{corpus_dir}/*.txt")
    with pytest.raises(DataError, match="no files match"):
        _resolve(f"{corpus_dir}/*.nothing", **lm)
    with pytest.raises(DataError, match=r"has no files matching \*\.rst"):
        read_corpus(corpus_dir, pattern="*.rst")


def test_corpus_from_a_jsonl_text_field(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one two"}, {"text": ""}, {"text": "three"}])
    corpus = _resolve(path, task="language_modeling")
    assert list(corpus.documents()) == ["one two", "three"] and corpus.size_bytes == 12


def test_corpus_undecodable_bytes_across_chunks(tmp_path: Path, monkeypatch) -> None:
    """The offset is exact even when a character is split between read chunks."""
    monkeypatch.setattr(text, "CHUNK", 4)
    path = tmp_path / "t.txt"
    path.write_bytes("abcé".encode() + b"\n\nxy\xffz\n")  # é = c3 a9 spans chunks 1 and 2
    with pytest.raises(DataError) as e:
        read_corpus(path)
    assert f"'{path}': the bytes at offset 9 (ff 7a 0a) are not valid UTF-8" in str(e.value)
    truncated = tmp_path / "u.txt"
    truncated.write_bytes(b"abc\xc3")
    with pytest.raises(DataError, match="offset 3 \\(c3\\)"):
        read_corpus(truncated)
    assert list(read_corpus(path, encoding_errors="replace").documents()) == ["abcé", "xy\ufffdz"]
    with pytest.raises(DataError, match="encoding_errors is 'ignore'"):
        read_corpus(path, encoding_errors="ignore")


# ---------------------------------------------------------------------- hf:, build, list


def test_hf_without_the_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        DataError, match=r"needs the Hugging Face `datasets` package\. pip install datasets"
    ):
        _resolve("hf:imdb")


def test_hf_offline_is_a_clear_error(monkeypatch) -> None:
    """What datasets.load_dataset raises with HF_HUB_OFFLINE=1 and nothing cached."""

    def load_dataset(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DataError) as e:
        hf_dataset("hf:imdb:plain_text", task="classification")
    msg = str(e.value)
    assert "could not load Hugging Face dataset 'hf:imdb:plain_text': ConnectionError" in msg
    assert "HF_HUB_OFFLINE=1 is set and the dataset is not in the local Hugging Face cache" in msg


def test_unsupported_file_mentions_text_options(tmp_path: Path) -> None:
    path = tmp_path / "book.md"
    path.write_text("# A book\n")
    with pytest.raises(DataError, match=r"unsupported type '\.md'"):
        _resolve(path)
    assert list(_resolve(path, task="language_modeling").documents()) == ["# A book"]


# -------------------------------------------------------------------- real built-ins


def _need(name: str) -> None:
    ok, where = builtin.status(builtin.CATALOG[name])
    if not ok:
        pytest.skip(f"{name} is not installed: {where}")


def test_r8_official_split() -> None:
    _need("r8")
    raw = builtin.load("r8", cache=None, mirror=None, download=False)
    assert (len(raw.texts), len(raw.test_texts)) == (5485, 2189)
    assert sorted(set(raw.labels)) == sorted(set(raw.test_labels)) == [
        "acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"
    ]  # fmt: skip
    assert (raw.text_name, raw.label_name, raw.task) == ("Text", "Category", "classification")
    assert raw.texts[0].startswith("champion products ch approves stock split")
    assert int((raw.labels == "earn").sum()) == 2840


def test_election_tweets_and_text_status() -> None:
    _need("election-tweets")
    raw = builtin.load("election-tweets", cache=None, mirror=None, download=False)
    assert len(raw.texts) == 6444 and raw.test_texts is None
    assert dict(zip(*np.unique(raw.labels, return_counts=True), strict=True)) == {
        "HillaryClinton": 3226, "realDonaldTrump": 3218
    }  # fmt: skip
    assert raw.texts[1] == (  # CSV-quoted in the file: "Last night, ... ""smart."" ..."
        'Last night, Donald Trump said not paying taxes was "smart." You know what I call it? '
        "Unpatriotic. https://t.co/t0xmBfj7zF"
    )
    for name in ("r8", "r52", "20newsgroups"):
        ok, where = builtin.status(builtin.CATALOG[name])
        assert ok and where.endswith("orangecontrib/text/datasets")


def test_fortunes_langid() -> None:
    _need("fortunes-langid")
    raw = builtin.load("fortunes-langid", cache=None, mirror=None, download=False)
    labels, counts = np.unique(raw.labels, return_counts=True)
    assert dict(zip(labels.tolist(), counts.tolist(), strict=True)) == {
        "de": 18761, "en": 15217, "es": 10765
    }  # fmt: skip
    assert all(t.strip() and "\n%\n" not in t for t in raw.texts)
