"""SWORD zText Bible modules, read directly (no libsword): verses as (book, chapter, verse, text).

A zText module folder holds three files per testament (`ot`, `nt`):

    {t}.bzs  one record per compressed block: <III (offset in .bzz, compressed size, size)
    {t}.bzv  one record per verse slot:        <IIH (block number, offset in block, size)
    {t}.bzz  the zlib-compressed blocks, back to back

Slots follow the module's versification: module header, testament header, then for each book
a book-intro slot and for each chapter a chapter-intro slot followed by one slot per verse.
danlu carries no versification tables; numbering comes from the OSIS markers in the entries:
`<div ... osisID="Gen" sID=... type="book"/>` opens a book (its intro slot), `<chapter
osisID="Gen.1" sID=.../>` a chapter (verse 0), and every following slot is the next verse,
empty or not (an empty slot is a verse the translation lacks there, e.g. RV1909's Job
38:39–41), so a missing verse does not shift the ones after it. The book is taken from the
chapter's osisID: in the WEB, the Greek Daniel (6 chapter markers, 59 kB) is packed into the
Hosea intro slot, which hides Hosea's book marker; that slot is an intro, so DanGr is not read.
Text after a book's closing marker is dropped (the WEB appends its glossary to Rev 22:21).

Markup → text: <note>…</note> and <title>…</title> with their content become a space, except
canonical titles (`<title canonical="true" type="psalm">`, 139 psalm superscriptions in the
WEB, which the RV1909 has as plain verse text): their text is kept. Every other tag is removed
without a space (a space per tag would put spaces before punctuation),
except between two adjacent word elements (`</w><transChange…>`, `</transChange><w…>`): the
RV1909 writes "allí</w><transChange>también</transChange><w>bdelio" for "allí también
bdelio" (~580 such joins); then whitespace is collapsed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from danlu.data.text import RawCorpus, RawPairs, RawText, decode, make_pairs
from danlu.errors import DataError

log = logging.getLogger("danlu")

SWORD_ROOTS = ("/usr/share/sword", "~/.sword")
TESTAMENTS = ("ot", "nt")

CHAPTER = re.compile(r'<chapter\b[^>]*\bosisID="([^"]+)\.(\d+)"')  # sID form only has osisID
BOOK_START = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*>')
BOOK_END = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\beID=)[^>]*>')
NOTE_OR_TITLE = re.compile(r'<(note|title)\b(?![^>]*canonical="true")[^>]*(?<!/)>.*?</\1>', re.S)
TAG = re.compile(r"<[^>]*>")


WORD_JOINS = [  # adjacent word elements: keep the words apart
    (f"</{a}><{b}{c}", f"</{a}> <{b}{c}")
    for a in ("w", "transChange")
    for b in ("w", "transChange")
    for c in " >"
]


@dataclass(frozen=True)
class Verse:
    book: str  # OSIS book id: Gen, Matt, 1Macc, ...
    chapter: int
    verse: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"


def osis_text(entry: str) -> str:
    """One verse entry's OSIS markup → plain text (rules in the module docstring)."""
    if "</w><" in entry or "</transChange><" in entry:
        for glued, spaced in WORD_JOINS:
            entry = entry.replace(glued, spaced)
    if "<note" in entry or "<title" in entry:
        entry = NOTE_OR_TITLE.sub(" ", entry).replace("</title>", "</title> ")  # canonical ones
    return " ".join(TAG.sub("", entry).split())  # str.split: any whitespace run


# ------------------------------------------------------------------------ finding modules


def find_module(name: str | Path) -> Path:
    """A module folder given directly, or found by name under $SWORD_PATH or the usual roots."""
    path = Path(name).expanduser()
    if (path / "ot.bzs").is_file() or (path / "nt.bzs").is_file():
        return path
    roots = [*filter(None, os.environ.get("SWORD_PATH", "").split(os.pathsep)), *SWORD_ROOTS]
    for root in roots:
        for folder in (str(name), str(name).lower()):
            candidate = Path(root).expanduser() / "modules" / "texts" / "ztext" / folder
            if (candidate / "ot.bzs").is_file() or (candidate / "nt.bzs").is_file():
                return candidate
    raise DataError(
        f"SWORD zText module '{name}' not found (looked in {', '.join(roots)})",
        fix="install it, e.g. `sudo apt-get install sword-text-web sword-text-sparv`, or give "
        "the module folder holding ot.bzs/ot.bzv/ot.bzz",
    )


def installed(*names: str) -> Path | None:
    """The module's folder (several modules: their common parent) if all are installed."""
    try:
        folders = [find_module(name) for name in names]
    except DataError:
        return None
    return Path(os.path.commonpath(folders))


def module_files(folder: Path) -> list[Path]:
    return [folder / f"{t}.{ext}" for t in TESTAMENTS for ext in ("bzs", "bzv", "bzz")]


# ------------------------------------------------------------------------ binary layout


def read_entries(folder: Path, testament: str, errors: str = "strict") -> Iterator[str]:
    """Every verse slot of one testament, in order, decoded ("" for an empty slot)."""
    bzs, bzv, bzz = (folder / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
    index, slots, data = (_read(p) for p in (bzs, bzv, bzz))
    for path, raw, size in ((bzs, index, 12), (bzv, slots, 10)):
        if len(raw) % size:
            raise DataError(
                f"'{path}' has {len(raw)} bytes, not a multiple of its {size}-byte records",
                fix="the module is truncated or corrupt; reinstall it",
            )
    blocks: dict[int, bytes] = {}
    for slot, (block, offset, size) in enumerate(struct.iter_unpack("<IIH", slots)):
        if size == 0:
            yield ""
            continue
        if block not in blocks:
            blocks = {block: _block(bzs, bzz, index, data, block, slot)}  # blocks come in order
        text = blocks[block]
        if offset + size > len(text):
            raise DataError(
                f"'{bzv}': verse slot {slot} reads bytes {offset}–{offset + size} of block "
                f"{block}, which has {len(text)} bytes",
                fix="the module is corrupt; reinstall it",
            )
        where = f"{bzz}, block {block} (decompressed), verse slot {slot}"
        yield decode(text[offset : offset + size], where, errors, offset)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read SWORD module file '{path}': {e.strerror or e}") from None


def _block(bzs: Path, bzz: Path, index: bytes, data: bytes, block: int, slot: int) -> bytes:
    if (block + 1) * 12 > len(index):
        raise DataError(
            f"verse slot {slot} points at block {block}, but '{bzs}' lists {len(index) // 12}"
        )
    start, packed, size = struct.unpack_from("<III", index, block * 12)
    try:
        text = zlib.decompress(data[start : start + packed])
    except zlib.error as e:
        raise DataError(
            f"'{bzz}': block {block} (bytes {start}–{start + packed}) is not zlib data ({e})",
            fix="the module is corrupt; reinstall it",
        ) from None
    if len(text) != size:
        raise DataError(f"'{bzz}': block {block} inflates to {len(text)} bytes, index says {size}")
    return text


# -------------------------------------------------------------------------- verses


def read_verses(module: str | Path, errors: str = "strict") -> list[Verse]:
    """All verses of a module (both testaments) in module order; empty verses are left out."""
    folder = find_module(module)
    verses: list[Verse] = []
    for testament in TESTAMENTS:
        if not (folder / f"{testament}.bzs").is_file():
            continue
        book, chapter, number = "", None, 0
        for entry in read_entries(folder, testament, errors):
            if "<chapter" in entry and "osisID" in entry and (marks := CHAPTER.findall(entry)):
                book, chapter, number = marks[-1][0], int(marks[-1][1]), 0
                continue  # a chapter-intro slot (verse 0): headings, not a verse
            if 'type="book"' in entry and BOOK_START.search(entry):
                chapter = None  # a book-intro slot
                continue
            if chapter is None:
                continue
            number += 1
            if 'type="book"' in entry and (end := BOOK_END.search(entry)):
                entry = entry[: end.start()]
            if entry and (text := osis_text(entry)):
                verses.append(Verse(book, chapter, number, text))
    if not verses:
        raise DataError(f"SWORD module '{folder}' holds no verses")
    return verses


def content_hash(folder: Path) -> str:
    """SHA-256 over the module files (relative name, size, bytes), sorted by name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in module_files(folder) if p.is_file()):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def bible_corpus(module: str | Path, unit: str = "chapter", errors: str = "strict") -> RawCorpus:
    """The module as prose: one document per chapter (or per book), verses joined by spaces."""
    if unit not in ("chapter", "book"):
        raise DataError(f"Bible corpus unit '{unit}' is not chapter or book")
    folder = find_module(module)
    docs: dict[tuple, list[str]] = {}
    for v in read_verses(folder, errors):
        docs.setdefault((v.book, v.chapter) if unit == "chapter" else (v.book,), []).append(v.text)
    texts = [" ".join(parts) for parts in docs.values()]
    size = sum(len(t.encode()) for t in texts)
    origin = f"SWORD module {folder.name} ({len(texts)} {unit}s)"
    return RawCorpus(lambda: iter(texts), origin, content_hash(folder), size)


def bible_pairs(source: str | Path, target: str | Path, errors: str = "strict") -> RawPairs:
    """Verses of two modules joined on (book, chapter, verse), in the source's order.

    Versifications differ (WEB: NRSVA with the deuterocanon; RV1909: KJV), so verses present
    in one module only are dropped and counted in `unmatched`. Known defect of the RV1909
    module: where its own numbering differs from KJV it leaves a slot empty and shifts the next
    chapter by a verse (Num 13, Num 30, 1 Sam 24, Hos 12, Jonah 2, Job 39–40, 2 Chr 33, 2 Cor
    13; ~200 pairs): those pairs are kept, as the join cannot tell.
    """
    src, tgt = find_module(source), find_module(target)
    left = read_verses(src, errors)
    right = {(v.book, v.chapter, v.verse): v.text for v in read_verses(tgt, errors)}
    keys, sources, targets = [], [], []
    for v in left:
        if (t := right.get((v.book, v.chapter, v.verse))) is not None:
            keys.append(v.key)
            sources.append(v.text)
            targets.append(t)
    if not keys:
        raise DataError(f"SWORD modules '{src.name}' and '{tgt.name}' share no verse numbers")
    pairs = make_pairs(sources, targets, f"{src.name} → {tgt.name} verses", keys)
    pairs.unmatched = {src.name: len(left) - len(keys), tgt.name: len(right) - len(keys)}
    log.info("%d aligned verses; unmatched: %s", len(keys), pairs.unmatched)
    return pairs


GENRES = {  # the usual divisions of the Protestant canon; deuterocanonical books are left out
    "law": "Gen Exod Lev Num Deut",
    "history": "Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth",
    "wisdom": "Job Ps Prov Eccl Song",
    "prophets": "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal",
    "gospels": "Matt Mark Luke John Acts",
    "letters": "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas "
    "1Pet 2Pet 1John 2John 3John Jude Rev",
}


def bible_genres(module: str | Path, errors: str = "strict") -> RawText:
    """Verses labelled by the division of their book (law, history, wisdom, prophets, gospels,
    letters): a topic task whose clues are names, places and style, not single words."""
    folder = find_module(module)
    genre_of = {book: g for g, books in GENRES.items() for book in books.split()}
    verses = [v for v in read_verses(folder, errors) if v.book in genre_of and v.text.strip()]
    labels = np.array([genre_of[v.book] for v in verses], dtype=object)
    return RawText(
        [v.text for v in verses], labels, f"SWORD module {folder.name} verses by book division",
        label_name="genre", task="classification",
    )  # fmt: skip
