"""SWORD zText modules: the binary layout (written here with struct + zlib), OSIS markup →
text, verse numbering, the verse join, corrupt files, and the real English/Spanish Bibles."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

from danlu.data import builtin, sword
from danlu.errors import DataError

HEADER = ["", '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>']


def write_ztext(folder: Path, testament: str, entries: list[str], per_block: int = 3) -> Path:
    """Write {t}.bzs (<III per block), {t}.bzv (<IIH per slot), {t}.bzz (zlib blocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for first in range(0, len(entries), per_block):
        block, offsets = bytearray(), []
        for entry in entries[first : first + per_block]:
            data = entry.encode() if isinstance(entry, str) else entry
            offsets.append((len(block), len(data)))
            block += data
        packed = zlib.compress(bytes(block))
        bzs += struct.pack("<III", len(bzz), len(packed), len(block))
        bzz += packed
        for offset, size in offsets:
            bzv += struct.pack("<IIH", first // per_block, offset if size else 0, size)
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{testament}.{ext}").write_bytes(bytes(data))
    return folder


def book(osis: str) -> str:
    return (
        f'<div canonical="true" osisID="{osis}" sID="g{osis}" type="book"/> '
        f'<title type="main">The Book of {osis}</title> <div sID="p" type="x-p"/>'
    )


def chapter(osis: str) -> str:
    n = osis.split(".")[1]
    return f'<div sID="x" type="x-p"/><chapter n="{n}" osisID="{osis}" sID="{osis}"/>'


EN_OT = [
    *HEADER,
    '<div sID="f" type="front"/><title>Preface</title> Not a verse.',
    book("Gen"),
    chapter("Gen.1"),
    '<w lemma="strong:H7225">In</w> <w lemma="strong:H0430">the beginning</w>, God'
    '<note placement="foot"><reference>1:1 </reference>Hebrew “Elohim”.</note> created.',
    '<div type="x-milestone" subType="x-preverse" sID="pv1"/><title>Light</title>'
    "<w>God</w> said, “<w>Let</w> there be light,” and there was light.",
    "",  # Gen 1:3 is missing from this translation: the slot is empty
    'The fourth verse.\n  Over   two lines. <chapter eID="Gen.1"/>',
    chapter("Gen.2"),
    'Finished.<chapter eID="Gen.2"/> <div eID="gGen" type="book"/>'
    '<div type="glossary"/>Abaddon: a glossary appended to the last verse.',
]
EN_NT = [
    *HEADER,
    book("Matt") + chapter("Matt.1"),  # the chapter marker may share the book-intro slot
    "The book of the genealogy.",
    "<title>Heading only</title>",  # markup without text: no record
    "Abraham became the father of Isaac.",
]
ES_OT = [
    *HEADER,
    book("Gen"),
    chapter("Gen.1"),
    "<w>EN el principio</w> crió Dios.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
    "Tercero.",
    "Cuarto.",
    chapter("Gen.2"),
    '<w>hay allí</w><transChange type="added">también</transChange><w>bdelio</w>, '
    'preguntándo<transChange type="added">le</transChange>.',
]


@pytest.fixture
def modules(tmp_path: Path) -> tuple[Path, Path]:
    en = write_ztext(tmp_path / "en", "ot", EN_OT)
    write_ztext(en, "nt", EN_NT, per_block=2)
    es = write_ztext(tmp_path / "es", "ot", ES_OT, per_block=4)  # no New Testament
    return en, es


def test_verses_and_markup(modules: tuple[Path, Path]) -> None:
    en, es = modules
    got = [(v.key, v.text) for v in sword.read_verses(en)]
    assert got == [
        ("Gen.1.1", "In the beginning, God created."),
        ("Gen.1.2", "God said, “Let there be light,” and there was light."),
        ("Gen.1.4", "The fourth verse. Over two lines."),
        ("Gen.2.1", "Finished."),
        ("Matt.1.1", "The book of the genealogy."),
        ("Matt.1.3", "Abraham became the father of Isaac."),
    ]
    spanish = sword.read_verses(es)
    assert spanish[-1].text == "hay allí también bdelio, preguntándole."  # words kept apart
    assert (spanish[-1].book, spanish[-1].chapter, spanish[-1].verse) == ("Gen", 2, 1)


def test_osis_text_rules() -> None:
    assert sword.osis_text('<w a="1">word</w>, <w>next</w>.') == "word, next."
    assert sword.osis_text("a<note>n</note>b <title>t</title>c") == "a b c"
    assert sword.osis_text('<title type="x"/>kept<note n="1"/>') == "kept"
    assert sword.osis_text("<l/>  many \n spaces\t<l/>") == "many spaces"
    psalm = '<title canonical="true" type="psalm">A Psalm.</title><w>Yahweh</w>, how'
    assert sword.osis_text(psalm) == "A Psalm. Yahweh, how"  # canonical titles are verse text


def test_pairs_join_on_verse_numbers(modules: tuple[Path, Path]) -> None:
    en, es = modules
    pairs = sword.bible_pairs(en, es)
    assert pairs.keys == ["Gen.1.1", "Gen.1.2", "Gen.1.4", "Gen.2.1"]
    assert pairs.targets == [
        "EN el principio crió Dios.",
        "Y dijo Dios: Sea la luz: y fué la luz.",
        "Cuarto.",
        "hay allí también bdelio, preguntándole.",
    ]
    assert pairs.sources[2] == "The fourth verse. Over two lines."
    assert pairs.unmatched == {"en": 2, "es": 1}  # Matt.1.1, Matt.1.3 | Gen.1.3


def test_corpus_per_chapter_and_book(modules: tuple[Path, Path]) -> None:
    en, _ = modules
    corpus = sword.bible_corpus(en)
    docs = list(corpus.documents())
    assert docs == [
        "In the beginning, God created. God said, “Let there be light,” and there was light. "
        "The fourth verse. Over two lines.",
        "Finished.",
        "The book of the genealogy. Abraham became the father of Isaac.",
    ]
    assert corpus.size_bytes == sum(len(d.encode()) for d in docs)
    assert corpus.origin == "SWORD module en (3 chapters)"
    assert len(list(sword.bible_corpus(en, unit="book").documents())) == 2
    before = corpus.content_hash
    bzz = en / "nt.bzz"
    bzz.write_bytes(bzz.read_bytes() + b"\0")
    assert sword.bible_corpus(en).content_hash != before


def test_undecodable_verse_names_block_and_offset(tmp_path: Path) -> None:
    folder = write_ztext(
        tmp_path / "m", "ot", [*HEADER, book("Gen"), chapter("Gen.1"), b"caf\xe9 au lait"]
    )
    with pytest.raises(DataError) as e:
        sword.read_verses(folder)
    msg = str(e.value)
    assert f"{folder / 'ot.bzz'}, block 1 (decompressed), verse slot 4" in msg
    offset = len(chapter("Gen.1")) + 3  # block 1 holds the chapter slot, then "caf"
    assert f"the bytes at offset {offset} (e9 20 61 75) are not valid UTF-8" in msg
    assert sword.read_verses(folder, "replace")[0].text == "caf\ufffd au lait"


def test_corrupt_modules(tmp_path: Path) -> None:
    folder = write_ztext(tmp_path / "m", "ot", [*HEADER, book("Gen"), chapter("Gen.1"), "v"])
    good = {ext: (folder / f"ot.{ext}").read_bytes() for ext in ("bzs", "bzv", "bzz")}

    def broken(ext: str, data: bytes, message: str) -> None:
        (folder / f"ot.{ext}").write_bytes(data)
        with pytest.raises(DataError, match=message):
            sword.read_verses(folder)
        (folder / f"ot.{ext}").write_bytes(good[ext])

    broken("bzs", good["bzs"][:-1], r"has 23 bytes, not a multiple of its 12-byte records")
    broken("bzv", good["bzv"][:-3], r"not a multiple of its 10-byte records")
    broken(
        "bzv",
        good["bzv"] + struct.pack("<IIH", 7, 0, 5),
        r"verse slot 5 points at block 7, but .*ot.bzs' lists 2",
    )
    broken(
        "bzv",
        good["bzv"] + struct.pack("<IIH", 1, 0, 999),
        r"slot 5 reads bytes 0–999 of block 1, which has \d+ bytes",
    )
    broken("bzz", good["bzz"][:-4] + b"xxxx", r"block 1 .* is not zlib data")
    start, packed, size = struct.unpack_from("<III", good["bzs"], 12)
    wrong = good["bzs"][:12] + struct.pack("<III", start, packed, size + 1)
    broken("bzs", wrong, rf"block 1 inflates to {size} bytes, index says {size + 1}")
    assert [v.text for v in sword.read_verses(folder)] == ["v"]


def test_missing_module_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    with pytest.raises(DataError, match="SWORD zText module 'klingon' not found") as e:
        sword.find_module("klingon")
    assert "apt-get install sword-text-web" in str(e.value)
    write_ztext(tmp_path / "modules" / "texts" / "ztext" / "klingon", "nt", [*HEADER])
    assert sword.find_module("klingon") == tmp_path / "modules/texts/ztext/klingon"
    with pytest.raises(DataError, match="holds no verses"):
        sword.read_verses("klingon")
    assert sword.installed("klingon", "nothing") is None


# ------------------------------------------------------------------------ real modules


def test_english_spanish_bible() -> None:
    """The Debian WEB and RV1909 modules: 31,077 verses share a number; ~1 s on a quiet core."""
    if not builtin.status(builtin.CATALOG["bible-en-es"])[0]:
        pytest.skip("sword-text-web / sword-text-sparv are not installed")
    start = time.perf_counter()
    pairs = builtin.load("bible-en-es", cache=None, mirror=None, download=False)
    print(f"parse + align {time.perf_counter() - start:.2f} s")
    assert len(pairs.sources) == 31077
    assert pairs.unmatched == {"engWEB2015eb": 6381, "spaRV1909eb": 7}
    assert (pairs.keys[0], pairs.keys[-1]) == ("Gen.1.1", "Rev.22.21")
    assert pairs.sources[0] == "In the beginning, God created the heavens and the earth."
    assert pairs.targets[0] == "EN el principio crió Dios los cielos y la tierra."
    gen_2_12 = pairs.targets[pairs.keys.index("Gen.2.12")]
    assert (
        gen_2_12
        == "Y el oro de aquella tierra es bueno: hay allí también bdelio y piedra cornerina."
    )
    assert pairs.sources[-1] == "The grace of the Lord Jesus Christ be with all the saints. Amen."
    assert not any(" ," in s or " ." in s for s in pairs.targets)
    psalm = pairs.keys.index("Ps.54.1")  # both carry the superscription as text
    assert pairs.sources[psalm].startswith("For the Chief Musician. On stringed instruments.")
    assert pairs.targets[psalm].startswith("Al Músico principal: en Neginoth: Masquil de David")


def test_verses_labelled_by_book_division(modules: tuple[Path, Path]) -> None:
    en, _ = modules
    raw = sword.bible_genres(en)  # the test module holds Gen 1 and Matt 1
    assert raw.labels.tolist() == ["law"] * 4 + ["gospels"] * 2  # Gen 1:1–2:1, Matt 1:1, 1:3
    assert raw.texts[0] == "In the beginning, God created."
    assert raw.label_name == "genre" and raw.task == "classification"


def test_bible_genre_builtin() -> None:
    if not builtin.status(builtin.CATALOG["bible-genre"])[0]:
        pytest.skip("sword-text-web is not installed")
    raw = builtin.load("bible-genre", cache=None, mirror=None, download=False)
    counts = {g: int((raw.labels == g).sum()) for g in sword.GENRES}
    assert counts == {"law": 5852, "history": 7018, "wisdom": 4785, "prophets": 5490,
                      "gospels": 4782, "letters": 3168}  # fmt: skip


def test_english_prose_corpus() -> None:
    if not builtin.status(builtin.CATALOG["bible-en"])[0]:
        pytest.skip("sword-text-web is not installed")
    corpus = builtin.load("bible-en", cache=None, mirror=None, download=False)
    docs = list(corpus.documents())
    assert len(docs) == 1388
    assert corpus.size_bytes == 4_873_864  # UTF-8 bytes of the chapters (verses joined by spaces)
    assert sum(len(d.split()) for d in docs) == 905_651
    assert docs[0].startswith("In the beginning, God created the heavens and the earth. The earth")
