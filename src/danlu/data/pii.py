"""Personal data in text: find it, replace it with typed placeholders, show it masked.

Each built-in detector proposes candidates with a precompiled regular expression and then
checks them, so look-alikes fall out:

- email: local@domain.tld (ASCII; a dot in the domain and a 2+ letter TLD are required);
- phone: Google's libphonenumber (the `phonenumbers` package, offline) finds numbers that are
  *valid* in their numbering plan: international (+CC or 00CC) anywhere, national formats of
  PHONE_REGIONS. It is asked only about runs of 7+ digits that are not dates, dotted quads or
  another detector's match (so 100,000 short lines take seconds). A national number must be
  written with separators (a bare run of digits or a decimal is an id, an amount or a
  coordinate), must not end in a one-digit group (ISBN-like) nor follow ISBN/ISSN/EAN;
- card: 13-19 digits, bare or in groups (first group of 4, then 3-6) split by spaces or
  dashes, starting 2-6 (the card networks' prefixes) and passing the Luhn check;
- iban: country code + 2 check digits + the country's registered length (spaces allowed
  every character), mod-97 checked; upper case only;
- ip: IPv4 with octets 0-255 and no leading zeros, not part of a longer dotted run (1.2.3.4.5)
  nor after "v"/"version"; IPv6 as Python's `ipaddress` parses it (full, `::`, v4-mapped).

Custom detectors are regular expressions by name (`data.pii.patterns`), tried first. When
matches overlap, the earlier detector in CUSTOM → email → iban → card → ip → phone wins.
Everything is deterministic (same text → same output), so redacted data hashes stably.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from danlu.errors import ConfigError

KINDS = ("email", "phone", "card", "iban", "ip")
ORDER = ("email", "iban", "card", "ip", "phone")  # who wins an overlap (custom ones first)
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU")  # national formats recognised
VERSION = 1  # bump when a detector changes what it finds: keys caches of redacted data

Span = tuple[int, int]


@dataclass(frozen=True)
class Match:
    kind: str  # a built-in kind or a custom pattern's name
    start: int
    end: int
    text: str


def placeholder(kind: str) -> str:
    """`email` → `[EMAIL]`, a custom `employee id` → `[EMPLOYEE_ID]`."""
    return "[" + re.sub(r"\W+", "_", kind).strip("_").upper() + "]"


# ------------------------------------------------------------------------------ checksums


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(compact: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters → 10..35, mod 97 == 1."""
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# ------------------------------------------------------------------------------ detectors

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
CARD = re.compile(r"(?<![\w.,+-])(?:\d{13,19}|\d{4}(?:[ -]\d{3,6}){2,4})(?![\w]|[.,-]\d)")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,31}")
IBAN_LENGTHS = dict(
    AD=24, AE=23, AL=28, AT=20, AZ=28, BA=20, BE=16, BG=22, BH=22, BI=27, BR=29, BY=28, CH=21,
    CR=22, CY=28, CZ=24, DE=22, DJ=27, DK=18, DO=28, EE=20, EG=29, ES=24, FI=18, FK=18, FO=18,
    FR=27, GB=22, GE=22, GI=23, GL=18, GR=27, GT=28, HN=28, HR=21, HU=28, IE=22, IL=23, IQ=23,
    IS=26, IT=27, JO=30, KW=30, KZ=20, LB=28, LC=32, LI=21, LT=20, LU=20, LV=21, LY=25, MC=27,
    MD=24, ME=22, MK=19, MN=20, MR=27, MT=31, MU=30, NI=28, NL=18, NO=15, OM=23, PK=24, PL=28,
    PS=29, PT=25, QA=29, RO=24, RS=22, RU=33, SA=24, SC=31, SD=18, SE=24, SI=19, SK=24, SM=27,
    SO=23, ST=25, SV=28, TL=23, TN=24, TR=26, UA=29, VA=22, VG=24, XK=20, YE=30,
)  # fmt: skip
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:]|\.\d)"
)
VERSION_BEFORE = re.compile(r"(?i)(?:\bv|\bversion|\bver\.?|\brelease)\s*$")
CODE_BEFORE = re.compile(r"(?i)\b(?:isbn(?:-1[03])?|issn|ean|upc|doi)\s*[:#]?\s*$")
PHONE_HINT = re.compile(r"\+?\d(?:[\s().\-/]{0,3}\d){6,}")  # 7+ digits: ask libphonenumber
NOT_PHONE = re.compile(  # dates and dotted quads, blanked out before looking for phone hints
    r"(?<![\d./-])(?:\d{4}([-/.])\d{1,2}\1\d{1,2}|\d{1,2}([-/.])\d{1,2}\2\d{2,4}"
    r"|\d{1,3}(?:\.\d{1,3}){3})(?![\d]|[-/.]\d)"
)


def _scan(pattern: re.Pattern[str], text: str, accept: Callable[[re.Match], int | None]):
    """Candidates of `pattern`; `accept` returns where a good one ends (it may cut it short,
    and the search goes on from there) or None (the search goes on after its start)."""
    pos = 0
    while m := pattern.search(text, pos):
        end = accept(m)
        if end is not None:
            yield m.start(), end
        pos = end if end is not None else m.start() + 1


def _emails(text: str) -> Iterator[Span]:
    if "@" in text:
        for m in EMAIL.finditer(text):
            yield m.span()


def _card_end(m: re.Match) -> int | None:
    """The longest run of whole groups that is 13-19 digits, starts 2-6 and passes Luhn."""
    groups = re.split(r"[ -]", m.group())
    for n in range(len(groups), 0, -1):
        digits = "".join(groups[:n])
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits):
            return m.start() + len(" ".join(groups[:n]))
    return None


def _iban_end(m: re.Match) -> int | None:
    """Cut the candidate at its country's length; the cut must fall between words."""
    want, chars, text = IBAN_LENGTHS.get(m.group()[:2]), 0, m.string
    for i in range(m.start(), m.end()):
        chars += text[i] != " "
        if chars == want:
            end = i + 1
            ok = end == len(text) or not text[end].isalnum()
            compact = text[m.start() : end].replace(" ", "")
            return end if ok and iban_ok(compact) else None
    return None


def _ips(text: str) -> Iterator[Span]:
    if "::" in text or text.count(":") >= 7:  # IPv6 first: it may end in an IPv4 address
        for m in IPV6.finditer(text):
            if m.group() != "::" and _is_ipv6(m.group()):
                yield m.span()
    if "." in text:
        for m in IPV4.finditer(text):
            if not VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
                yield m.span()


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


class PhoneFinder:
    """Valid phone numbers by libphonenumber, in international form or national form of any
    of `regions` (looked up region by region only while a digit run is still unexplained)."""

    def __init__(self, regions: Sequence[str]) -> None:
        try:
            import phonenumbers
        except ImportError:
            raise ConfigError(
                "the phone detector of data.pii needs the phonenumbers package",
                fix="pip install 'danlu[privacy]' (or drop phone from data.pii.kinds)",
            ) from None
        self.pn = phonenumbers
        self.regions = tuple(regions)

    def __call__(self, text: str, taken: Sequence[Match] = ()) -> Iterator[Span]:
        hints = self._hints(text, taken)
        found: list[Span] = []
        for region in self.regions:
            if all(any(s <= a and b <= e for s, e in found) for a, b in hints):
                break
            leniency = self.pn.Leniency.VALID
            for m in self.pn.PhoneNumberMatcher(text, region, leniency=leniency):
                span = (m.start, m.end)
                near = any(a < m.end and m.start < b for a, b in hints)
                if near and span not in found and self._plausible(text, m.start, m.raw_string):
                    found.append(span)
        return iter(sorted(found))

    @staticmethod
    def _hints(text: str, taken: Sequence[Match]) -> list[Span]:
        """Runs of 7+ digits that may be phone numbers: not dates, not another detector's
        match, not a bare run of digits (unless international: +CC or 00CC)."""
        if not PHONE_HINT.search(text):
            return []
        blanked = NOT_PHONE.sub(lambda m: " " * len(m.group()), text)
        hints = []
        for m in PHONE_HINT.finditer(blanked):
            (a, b), run = m.span(), m.group()
            if any(a < t.end and t.start < b for t in taken):
                continue
            if run.isdigit() and not run.startswith("00"):
                continue
            hints.append((a, b))
        return hints

    @staticmethod
    def _plausible(text: str, start: int, raw: str) -> bool:
        if CODE_BEFORE.search(text, max(0, start - 12), start):
            return False
        international = raw.lstrip("( ").startswith(("+", "00"))
        if not international and (raw.isdigit() or re.fullmatch(r"\d+[.,]\d+", raw)):
            return False  # a plain integer or decimal: an id, an amount, a coordinate
        return len(re.findall(r"\d+", raw)[-1]) > 1  # "0-306-40615-2" is an ISBN


# ------------------------------------------------------------------------------- detector


class Detector:
    """The chosen built-in kinds plus custom patterns, compiled once."""

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        patterns: dict[str, str] | None = None,
        regions: Sequence[str] = PHONE_REGIONS,
    ) -> None:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ConfigError(
                f"data.pii.kinds has unknown kind(s) {unknown}", fix=f"use some of {list(KINDS)}"
            )
        self.kinds = [k for k in ORDER if k in kinds]
        self.patterns = dict(patterns or {})
        self.finders: list[tuple[str, Callable[[str], Iterator[Span]]]] = [
            (name, _regex_finder(name, regex)) for name, regex in self.patterns.items()
        ]
        builtin = {
            "email": _emails,
            "iban": functools.partial(_scan, IBAN, accept=_iban_end),
            "card": functools.partial(_scan, CARD, accept=_card_end),
            "ip": _ips,
        }
        parts: list[Any] = [VERSION, self.kinds, sorted(self.patterns.items())]
        for kind in self.kinds:
            if kind == "phone":
                phones = PhoneFinder(regions)
                parts += [phones.regions, phones.pn.__version__]
            self.finders.append((kind, phones if kind == "phone" else builtin[kind]))
        self.signature = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """What it looks for (recorded in reports and with a run's text spec)."""
        return {"kinds": list(self.kinds), "patterns": dict(self.patterns)}

    def find(self, text: str) -> list[Match]:
        """Non-overlapping matches in text order (an overlap goes to the earlier detector)."""
        taken: list[Match] = []
        for kind, finder in self.finders:
            spans = finder(text, taken) if isinstance(finder, PhoneFinder) else finder(text)
            for start, end in spans:
                if all(end <= t.start or start >= t.end for t in taken):
                    taken.append(Match(kind, start, end, text[start:end]))
        return sorted(taken, key=lambda m: m.start)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """Text with every match replaced by its placeholder, and the count per kind."""
        matches = self.find(text)
        if not matches:
            return text, Counter()
        pieces, pos = [], 0
        for m in matches:
            pieces += [text[pos : m.start], placeholder(m.kind)]
            pos = m.end
        pieces.append(text[pos:])
        return "".join(pieces), Counter(m.kind for m in matches)


def _regex_finder(name: str, regex: str) -> Callable[[str], Iterator[Span]]:
    try:
        compiled = re.compile(regex)
    except re.error as e:
        raise ConfigError(
            f"data.pii.patterns.{name}: {regex!r} is not a valid regular expression ({e})",
            fix="fix the pattern (Python `re` syntax; quote it in YAML)",
        ) from None

    def finder(text: str) -> Iterator[Span]:
        return (m.span() for m in compiled.finditer(text) if m.end() > m.start())

    return finder


@functools.lru_cache(maxsize=16)
def _cached(kinds: tuple[str, ...], patterns: tuple[tuple[str, str], ...]) -> Detector:
    return Detector(kinds, dict(patterns))


def detector(
    kinds: Sequence[str] | None = None, patterns: dict[str, str] | None = None
) -> Detector:
    """A compiled Detector, reused for the same kinds and patterns."""
    return _cached(tuple(KINDS if kinds is None else kinds), tuple((patterns or {}).items()))


def find(
    text: str, kinds: Sequence[str] | None = None, patterns: dict[str, str] | None = None
) -> list[Match]:
    """Every piece of personal data in `text` (all built-in kinds unless `kinds` is given)."""
    return detector(kinds, patterns).find(text)


def redact(
    text: str, kinds: Sequence[str] | None = None, patterns: dict[str, str] | None = None
) -> str:
    """`text` with each match replaced by a typed placeholder: [EMAIL], [PHONE], [CARD], ..."""
    return detector(kinds, patterns).redact(text)[0]


# ------------------------------------------------------------------------------- masking


def mask(value: str, kind: str | None = None) -> str:
    """A hint of what was found that never shows the value: `j***@e***.com`,
    `**** **** **** 1234`, `DE****************3000`, `+** ** **** **58`, `192.*.*.*`."""
    kind = kind or _kind_of(value)
    maskers: dict[str, Callable[[str], str]] = {
        "email": _mask_email,
        "card": lambda v: "**** **** **** " + re.sub(r"\D", "", v)[-4:],
        "iban": lambda v: (c := v.replace(" ", ""))[:2] + "*" * (len(c) - 6) + c[-4:],
        "phone": _mask_phone,
        "ip": lambda v: v.split(".")[0] + ".*.*.*" if "." in v else v.split(":")[0] + ":****",
    }
    return maskers.get(kind, _mask_any)(value)


def _kind_of(value: str) -> str:
    matches = find(value)
    whole = [m for m in matches if m.start == 0 and m.end == len(value)]
    return whole[0].kind if whole else ""


def _mask_email(value: str) -> str:
    local, _, domain = value.partition("@")
    head, _, tld = domain.rpartition(".")
    return f"{local[:1]}***@{head[:1]}***.{tld}"


def _mask_phone(value: str) -> str:
    keep = len(re.sub(r"\D", "", value)) - 2  # digits to hide: all but the last two
    out = []
    for ch in value:
        if ch.isdigit() and keep > 0:
            ch, keep = "*", keep - 1
        out.append(ch)
    return "".join(out)


def _mask_any(value: str) -> str:
    return value[:1] + "***" if len(value) > 3 else "***"
