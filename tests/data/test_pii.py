"""PII detectors (true positives and look-alikes per kind), redaction, masking, `danlu data
scan`, and `data.redact_pii` reaching the tokenizer and the data card of a training run."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import danlu
import danlu.cli_pii  # (registers `danlu data scan`)
from conftest import tiny_config
from danlu.cli import app
from danlu.data import build, pii
from danlu.errors import ConfigError, DataError

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kinds_in(text: str, **kw) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in pii.find(text, **kw)]


def only(kind: str, text: str) -> list[str]:
    return [m.text for m in pii.find(text) if m.kind == kind]


# ----------------------------------------------------------------------------- detectors


@pytest.mark.parametrize(
    "text, found",
    [
        ("mail john.doe@example.com today", "john.doe@example.com"),
        ("J_S+tag@mail.co.uk.", "J_S+tag@mail.co.uk"),
        ("<x-1%y@sub.domain-name.org>", "x-1%y@sub.domain-name.org"),
    ],
)
def test_email_true_positives(text, found):
    assert only("email", text) == [found]


@pytest.mark.parametrize(
    "text", ["a@b", "follow @handle", "x@y.z", "user@localhost", "a@b.c0m", "name at example.com"]
)
def test_email_look_alikes(text):
    assert only("email", text) == []


@pytest.mark.parametrize(
    "text, found",
    [
        ("call +44 20 7946 0958 now", "+44 20 7946 0958"),
        ("US (415) 555-2671", "(415) 555-2671"),
        ("tel 415-555-2671.", "415-555-2671"),
        ("415.555.2671", "415.555.2671"),
        ("+1 (415) 555-2671", "+1 (415) 555-2671"),
        ("+33 6 12 34 56 78", "+33 6 12 34 56 78"),
        ("Paris 01 42 68 53 00", "01 42 68 53 00"),
        ("Berlin 030 901820", "030 901820"),
        ("0049 30 1234567", "0049 30 1234567"),
        ("London 020 7946 0958", "020 7946 0958"),
        ("+4930901820", "+4930901820"),
    ],
)
def test_phone_true_positives(text, found):
    assert only("phone", text) == [found]


@pytest.mark.parametrize(
    "text",
    [
        "on 2024-01-15 we met",
        "15/01/2024",
        "2024-01-15 10:30:00",
        "costs 1234.56 USD",
        "price $1,299.00",
        "1.299,00 EUR",
        "ISBN 978-3-16-148410-0",
        "ISBN-10: 0-306-40615-2",
        "0-306-40615-2",
        "order 12345678901",
        "timestamp 1700000000123",
        "lat 37.7749, -122.4194",
        "version 1.2.3.4",
        "population 1 234 567",
        "zip 94107-1234",
        "(c) 1999-2024",
    ],
)
def test_phone_look_alikes(text):
    assert only("phone", text) == []


@pytest.mark.parametrize(
    "text, found",
    [
        ("card 4111 1111 1111 1111 exp 12/27", "4111 1111 1111 1111"),
        ("4111-1111-1111-1111", "4111-1111-1111-1111"),
        ("paid with 5500005555555559.", "5500005555555559"),
        ("amex 3782 822463 10005", "3782 822463 10005"),
        ("6011 0009 9013 9424 then 2024", "6011 0009 9013 9424"),
    ],
)
def test_card_true_positives(text, found):
    assert only("card", text) == [found]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # fails Luhn
        "order 1234567890123456",  # an order id (fails Luhn)
        "order 8111111111111111",  # passes Luhn, but no card network starts with 8
        "0000 0000 0000 0000",
        "4111 1111 1111 111",  # 15 digits, fails Luhn
        "41111111111111111111",  # 20 digits
        "ref 4111111111111111-2",
    ],
)
def test_card_look_alikes(text):
    assert only("card", text) == []


@pytest.mark.parametrize(
    "text, found",
    [
        ("IBAN DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX", "DE89 3704 0044 0532 0130 00"),
        ("GB82WEST12345698765432", "GB82WEST12345698765432"),
        ("NL91 ABNA 0417 1643 00", "NL91 ABNA 0417 1643 00"),
        ("FR1420041010050500013M02606.", "FR1420041010050500013M02606"),
    ],
)
def test_iban_true_positives(text, found):
    assert only("iban", text) == [found]


@pytest.mark.parametrize(
    "text",
    [
        "DE88 3704 0044 0532 0130 00",  # wrong check digits
        "NL92ABNA0417164300",
        "GB82 WEST 1234 5698 7654 3",  # one character short
        "XX82WEST12345698765432",  # no such country
        "de89 3704 0044 0532 0130 00",  # lower case
    ],
)
def test_iban_look_alikes(text):
    assert only("iban", text) == []


def test_two_ibans_in_a_row_are_both_found():
    text = "DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32"
    assert only("iban", text) == ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32"]


@pytest.mark.parametrize(
    "text, found",
    [
        ("server 192.168.0.1.", "192.168.0.1"),
        ("dns 8.8.8.8 and", "8.8.8.8"),
        ("ip 10.0.0.1:8080", "10.0.0.1"),
        ("host 2001:db8::ff00:42:8329 up", "2001:db8::ff00:42:8329"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("mapped ::ffff:192.168.0.1", "::ffff:192.168.0.1"),
        ("loopback ::1", "::1"),
    ],
)
def test_ip_true_positives(text, found):
    assert only("ip", text) == [found]


@pytest.mark.parametrize(
    "text",
    [
        "999.1.1.1",
        "10.0.0.256",
        "192.168.001.1",
        "release 1.2.3.4.5",
        "v2.0.1",
        "v1.2.3.4",
        "version 10.0.0.1",
        "1.2.3",
        "at 12:30:45",
        "std::vector",
        "a::b::c",
        "mac 00:1A:2B:3C:4D:5E",
    ],
)
def test_ip_look_alikes(text):
    assert only("ip", text) == []


def test_kinds_select_detectors_and_overlaps_go_to_the_stronger_one():
    text = "john.2025550143@example.com 4111 1111 1111 1111 +44 20 7946 0958"
    assert kinds_in(text) == [
        ("email", "john.2025550143@example.com"),
        ("card", "4111 1111 1111 1111"),
        ("phone", "+44 20 7946 0958"),
    ]
    assert kinds_in(text, kinds=["phone"]) == [("phone", "+44 20 7946 0958")]
    with pytest.raises(ConfigError, match=r"unknown kind\(s\) \['ssn'\]"):
        pii.find(text, kinds=["ssn"])


def test_custom_patterns_come_first_and_a_bad_regex_is_named():
    patterns = {"employee id": r"\bE\d{6}\b", "ticket": r"TCK-\d+"}
    text = "E123456 filed TCK-42 from 8.8.8.8"
    assert kinds_in(text, patterns=patterns) == [
        ("employee id", "E123456"),
        ("ticket", "TCK-42"),
        ("ip", "8.8.8.8"),
    ]
    assert pii.redact(text, patterns=patterns) == "[EMPLOYEE_ID] filed [TICKET] from [IP]"
    assert pii.find("x", patterns={"empty": "a*"}) == []  # empty matches are ignored
    with pytest.raises(ConfigError) as e:
        pii.find("x", patterns={"bad one": r"E(\d+"})
    assert "data.pii.patterns.bad one" in str(e.value) and "missing )" in str(e.value)


def test_redact_puts_typed_placeholders_and_counts():
    text = (
        "Hi, I'm ann.lee@example.com, call +44 20 7946 0958; card 4111-1111-1111-1111, "
        "IBAN DE89 3704 0044 0532 0130 00 from 192.168.0.12 on 2024-01-15."
    )
    out, counts = pii.detector().redact(text)
    assert out == (
        "Hi, I'm [EMAIL], call [PHONE]; card [CARD], IBAN [IBAN] from [IP] on 2024-01-15."
    )
    assert counts == {"email": 1, "phone": 1, "card": 1, "iban": 1, "ip": 1}
    assert pii.redact(text) == out and pii.redact(out) == out  # deterministic, idempotent
    assert pii.redact("nothing here 1.2.3") == "nothing here 1.2.3"


@pytest.mark.parametrize(
    "value, kind, shown",
    [
        ("john.doe@example.com", "email", "j***@e***.com"),
        ("4111 1111 1111 1111", "card", "**** **** **** 1111"),
        ("DE89 3704 0044 0532 0130 00", "iban", "DE****************3000"),
        ("+44 20 7946 0958", "phone", "+** ** **** **58"),
        ("192.168.0.12", "ip", "192.*.*.*"),
        ("2001:db8::ff00:42:8329", "ip", "2001:****"),
        ("E123456", "employee id", "E***"),
    ],
)
def test_mask_never_shows_the_value(value, kind, shown):
    assert pii.mask(value, kind) == shown
    if kind != "employee id":
        assert pii.mask(value) == shown  # the kind is recognised
    digits = re.sub(r"\D", "", value)
    assert value not in shown and (len(digits) < 5 or digits not in re.sub(r"\D", "", shown))


def test_the_phone_detector_asks_for_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "phonenumbers", None)
    with pytest.raises(ConfigError, match="phonenumbers") as e:
        pii.Detector(["phone"])
    assert "danlu[privacy]" in str(e.value)
    assert pii.Detector(["email"]).find("a@b.com")[0].kind == "email"


def test_scanning_many_lines_is_fast_enough():
    """Precompiled patterns, libphonenumber only for digit runs: 5,000 mixed lines (the brief
    measured 100,000 in ~2.5 s on one core) must not take long even on a busy machine."""
    rng = random.Random(0)
    lines = [
        rng.choice(
            ["plain words {i}", "on 2024-01-{d:02d}", "me{i}@example.com", "ip 10.0.0.{d}"]
        ).format(i=i, d=i % 28 + 1)
        for i in range(5000)
    ]
    det = pii.detector()
    counts = {}
    for line in lines:
        for m in det.find(line):
            counts[m.kind] = counts.get(m.kind, 0) + 1
    assert set(counts) == {"email", "ip"} and sum(counts.values()) > 2000


# ---------------------------------------------------------------------------------- scan


def scan_cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["data", "scan", *map(str, args)], env={"COLUMNS": "200"})
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


PEOPLE = [
    ("Ann", "mail ann.lee@example.com or call +44 20 7946 0958", 12.5, "a"),
    ("Bob", "card 4111 1111 1111 1111 on 2024-01-15", 3.0, "b"),
    ("Cy", "nothing here, version 1.2.3.4", 7.0, "a"),
    ("Di", "server 192.168.0.12, iban DE89 3704 0044 0532 0130 00", 1.0, "b"),
    ("Ed", "write to ed@example.org or ed.b@example.org", 2.0, "a"),
]


def people_config(folder: Path, **data) -> Path:
    pd.DataFrame(PEOPLE, columns=["name", "note", "amount", "label"]).to_csv(
        folder / "people.csv", index=False
    )
    cfg = tiny_config("people.csv", data={"label": "label", **data})
    cfg["name"] = "people"
    path = folder / "people.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scan_a_table_reports_counts_and_masked_examples(tmp_path):
    code, out, err = scan_cli(people_config(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "runs/people-scan/pii.json").read_text())
    note = report["columns"]["note"]
    assert {k: v["count"] for k, v in note["found"].items()} == {
        "email": 3,
        "phone": 1,
        "card": 1,
        "ip": 1,
        "iban": 1,
    }
    assert note["values"] == 5 and note["values_with_pii"] == 4
    assert note["found"]["email"]["examples"] == ["a***@e***.com", "e***@e***.org"]
    assert note["found"]["card"]["examples"] == ["**** **** **** 1111"]
    assert report["columns"]["name"]["found"] == {} and "amount" not in report["columns"]
    assert report["total"] == 7 and report["redact_pii"] is False
    assert "found 7 pieces of personal data" in out and "data.redact_pii: true" in out
    assert "a***@e***.com" in out and "**** **** **** 1111" in out
    for raw in ("ann.lee@example.com", "4111 1111 1111 1111", "192.168.0.12", "7946 0958"):
        assert raw not in out and raw not in json.dumps(report)


def test_scan_named_columns_and_a_custom_pattern(tmp_path):
    config = people_config(tmp_path, pii={"columns": ["name"], "patterns": {"who": "^[A-D]\\w"}})
    code, _, err = scan_cli(config, "--out", tmp_path / "scan")
    assert code == 0, err
    report = json.loads((tmp_path / "scan/pii.json").read_text())
    assert list(report["columns"]) == ["name"]
    assert report["columns"]["name"]["found"] == {"who": {"count": 4, "examples": ["***"]}}


def test_scan_a_text_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text(
        "reach me at zoe@example.net\nor +1 202 555 0143\n\nnothing else\nip 8.8.4.4\n"
    )
    cfg = tiny_config("notes.txt", data={"task": "language_modeling"})
    cfg["name"] = "notes"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = scan_cli(tmp_path / "c.yaml")
    assert code == 0, err
    text = json.loads((tmp_path / "runs/notes-scan/pii.json").read_text())["columns"]["text"]
    assert text["values"] == 4 and text["values_with_pii"] == 3
    assert {k: v["count"] for k, v in text["found"].items()} == {"email": 1, "phone": 1, "ip": 1}
    assert "zoe@example.net" not in out and "z***@e***.net" in out


def test_scan_finds_nothing_and_bad_input_exits_2(tmp_path):
    config = people_config(tmp_path, pii={"kinds": ["iban"], "columns": ["name"]})
    code, out, _ = scan_cli(config)
    assert code == 0 and "no personal data found" in out
    code, _, err = scan_cli(people_config(tmp_path, pii={"columns": ["nope"]}))
    assert code == 2 and "data.pii.columns names ['nope']" in err
    code, _, err = scan_cli(people_config(tmp_path, pii={"patterns": {"bad": "(("}}))
    assert code == 2 and "data.pii.patterns.bad" in err and "not a valid regular" in err


# ------------------------------------------------------------------------------ redaction


def test_redacting_a_table_keeps_column_types_and_records_counts(tmp_path):
    people_config(tmp_path)
    bundle = build(dataset="people.csv", label="label", redact_pii=True, split={"val": 0.2})
    assert bundle.card["pii_redacted"] == {
        "name": {},
        "note": {"email": 3, "phone": 1, "card": 1, "ip": 1, "iban": 1},
        "label": {},
    }
    frame = bundle.raw.frame
    assert frame["note"][0] == "mail [EMAIL] or call [PHONE]"
    assert frame["amount"].dtype == "float64" and list(frame["name"]) == [
        "Ann",
        "Bob",
        "Cy",
        "Di",
        "Ed",
    ]
    plain = build(dataset="people.csv", label="label", split={"val": 0.2})
    assert "pii_redacted" not in plain.card and plain.content_hash != bundle.content_hash
    assert bundle.spec.table["redact_pii"]["columns"] == ["name", "note", "label"]
    again = build(dataset="people.csv", label="label", redact_pii=True, split={"val": 0.2})
    assert again.content_hash == bundle.content_hash  # deterministic


def test_a_redacted_corpus_gets_its_own_token_cache_key(tmp_path):
    (tmp_path / "c.txt").write_text(("mail amy@example.com about the cat. " * 40) + "\n")
    opts = dict(
        dataset="c.txt",
        task="language_modeling",
        tokenizer={"type": "char"},
        block_size=16,
        split={"val": 0.1, "test": 0.0},
    )
    plain = build(**opts)
    red = build(**opts, redact_pii=True, pii={"kinds": ["email"]})
    assert red.card["pii_redacted"] == {"text": {"email": 40}}
    assert red.content_hash != plain.content_hash
    assert red.card["text"]["token_cache"] != plain.card["text"]["token_cache"]
    doc = next(red.raw.documents())
    assert "amy@" not in doc and doc.startswith("mail [EMAIL] about the cat.")
    assert red.spec.text["redact_pii"] == {"kinds": ["email"], "patterns": {}}


def test_chat_data_cannot_be_redacted_yet():
    with pytest.raises(ConfigError, match=r"data\.redact_pii is not supported"):
        build(dataset="chat.jsonl", task="chat", redact_pii=True)


def test_scan_of_images_says_there_is_no_text(idx_folder):
    from danlu.data.build import resolve
    from danlu.data.pii_scan import scan

    raw = resolve(str(idx_folder), image={}, cache_dir=None, mirror=None, download=False)
    with pytest.raises(DataError, match="holds no text"):
        scan(raw)


def test_training_with_redact_pii_feeds_placeholders_to_the_tokenizer(tmp_path):
    rng = random.Random(0)
    words = {"x": ["alpha", "beta", "gamma"], "y": ["delta", "omega", "sigma"]}
    rows = []
    for i in range(60):
        label = "xy"[i % 2]
        text = " ".join(rng.choice(words[label]) for _ in range(5))
        if i % 3 == 0:
            text += f" mail quokka{i}@zebrafish.example.com"
        if i % 5 == 0:
            text += " call +44 20 7946 0958"
        rows.append({"text": text, "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    cfg = tiny_config(
        "t.csv",
        data={
            "text": "text",
            "label": "label",
            "redact_pii": True,
            "tokenizer": {"type": "wordpiece", "vocab_size": 100, "min_frequency": 1},
        },
        model={"type": "rnn", "hidden_size": 8, "num_layers": 1, "dim": 8},
        train={"epochs": 1},
    )
    cfg["model"].pop("hidden_sizes")
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run.path
    card = json.loads((run / "data_card.json").read_text())
    assert card["pii_redacted"] == {"text": {"email": 20, "phone": 12}}
    vocab = json.loads((run / "tokenizer.json").read_text())["model"]["vocab"]
    assert "EMAIL" in vocab and "PHONE" in vocab
    assert not any(p in vocab for p in ("@", "q", "z", "7", "##z", "##q"))  # no raw e-mail
    spec = json.loads((run / "preprocess.json").read_text())
    assert spec["text"]["redact_pii"]["kinds"] == ["email", "iban", "card", "ip", "phone"]
    # prediction redacts the same way: the e-mail reaches the model as its placeholder
    from danlu.serve.predictor import Predictor

    prepared = Predictor.load(run).prepare("alpha beta mail someone@zebrafish.example.com")
    pieces = [p.strip() for row in prepared.tokens for p in row]
    assert "EMAIL" in pieces and not any("@" in p or "zebra" in p for p in pieces)
