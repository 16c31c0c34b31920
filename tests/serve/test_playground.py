"""The web playground end to end in a real browser: headless Chromium (Debian's, driven by the
pip `playwright` package) against the server running in this process on a free local port.

Four tiny runs are trained once and served together (so the model picker is used too): a text
classifier, an image classifier, a table classifier and a character GPT. In the page, a typed
text, an uploaded PNG and a filled table row each give the label `Predictor.predict` gives, with
one probability bar per class; a prompt streams its continuation chunk by chunk into the reply
and ends as the non-streamed greedy completion. A second server with an API key shows the 401
in the error box until the key is entered. One screenshot per page kind goes to tmp_path.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live import LiveServer

import danlu
from conftest import make_images, tiny_config, tiny_gpt_config, write_idx
from danlu.rundir import RunDir
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServeSettings, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
WAIT_MS = 15_000  # longest wait for one thing to appear in the page
KEY = "sk-playground-test"
TOPICS = {
    "sport": ["goal", "match", "team", "score", "coach", "league", "player", "referee"],
    "food": ["recipe", "oven", "flour", "sauce", "bake", "butter", "garlic", "simmer"],
}


# ----------------------------------------------------------------------------- browser


def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and allowed, else a skip."""
    if CHROMIUM.exists():
        return str(CHROMIUM)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no /usr/bin/chromium: run `make setup` or `sudo apt-get install -y chromium`")
    install = ["apt-get", "install", "-y", "chromium"]
    for command in (install, ["apt-get", "update"], install):  # stale package lists: update
        subprocess.run(command, capture_output=True, timeout=900, check=False)
        if CHROMIUM.exists():
            return str(CHROMIUM)
    pytest.skip("`apt-get install -y chromium` did not install /usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


# -------------------------------------------------------------------------------- runs


def write_topics(path: Path) -> Path:
    """Two clearly separable topics: sentences drawn from two disjoint word lists."""
    rng = random.Random(0)
    rows = [
        f"{' '.join(rng.choices(words, k=6))},{topic}"
        for _ in range(60)
        for topic, words in TOPICS.items()
    ]
    path.write_text("text,topic\n" + "\n".join(rows) + "\n")
    return path


def write_table(path: Path) -> Path:
    """Three classes around three centres of (a, b), with a colour that mostly follows them."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    points = np.array([[0, 0], [5, 5], [0, 5]])[y] + rng.normal(0, 0.5, size=(90, 2))
    colour = np.array(["red", "green", "blue"])[(y + (rng.random(90) < 0.2)) % 3]
    label = np.array(["ant", "bee", "cat"])[y]
    lines = [
        f"{p[0]:.3f},{p[1]:.3f},{c},{k}" for p, c, k in zip(points, colour, label, strict=True)
    ]
    path.write_text("a,b,colour,kind\n" + "\n".join(lines) + "\n")
    return path


def write_digits(folder: Path) -> Path:
    folder.mkdir()
    for prefix, (x, y) in {"train": make_images(60), "t10k": make_images(30, seed=1)}.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


def text_config(csv: Path) -> dict:
    cfg = tiny_config(
        str(csv),
        data={"text": "text", "label": "topic",
              "tokenizer": {"type": "wordpiece", "vocab_size": 80}},
        model={"type": "rnn", "hidden_size": 16, "num_layers": 1, "dim": 16},
    )  # fmt: skip
    del cfg["model"]["hidden_sizes"]
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four tiny trained runs (two evaluated); the run directory's name is the served name."""
    root = tmp_path_factory.mktemp("playground")
    env = pytest.MonkeyPatch()
    env.setenv("DANLU_CACHE", str(root / "cache"))
    configs = {
        "topics": text_config(write_topics(root / "topics.csv")),
        "digits": tiny_config(str(write_digits(root / "idx"))),
        "blobs": tiny_config(str(write_table(root / "blobs.csv")), data={"label": "kind"}),
        "gpt": tiny_gpt_config(root, 80, dim=32),
    }
    out = {}
    for name, cfg in configs.items():
        out[name] = danlu.train(cfg, run_dir=root / name, show_progress=False).run.path
    for name in ("topics", "gpt"):  # test metrics for the info panel
        danlu.evaluate(out[name])
    env.undo()
    return out


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Iterator[LiveServer]:
    app = create_app(list(runs.values()), ServeSettings(max_wait_ms=1.0))
    with LiveServer(app) as live:
        yield live


# ------------------------------------------------------------------------------- helpers


def open_model(page: Any, server: LiveServer, name: str) -> None:
    page.goto(f"{server.url}/")
    picker = page.get_by_test_id("model-picker")
    picker.wait_for(state="visible")
    picker.select_option(name)
    page.wait_for_function(f"document.body.dataset.model === {name!r}")
    assert page.get_by_test_id("model-id").text_content() == name


# --------------------------------------------------------------------------------- tests


def test_a_typed_text_gets_the_predictors_label_and_a_bar_per_class(page, server, runs, tmp_path):
    open_model(page, server, "topics")
    assert page.get_by_test_id("classes").locator("li").all_text_contents() == ["food", "sport"]
    metrics = RunDir.open(runs["topics"]).read("metrics.json")["test"]
    first = page.get_by_test_id("metrics").locator("dt, dd").all_text_contents()[:2]
    assert first == ["accuracy", f"{metrics['accuracy']:.4g}"]
    assert page.get_by_test_id("lineage").locator("dd").first.text_content() == "topics"

    text = "coach team score goal match player"
    page.get_by_test_id("text-input").fill(text)
    page.get_by_test_id("predict").click()
    label = page.get_by_test_id("result-label")
    label.wait_for()
    expected = Predictor.load(runs["topics"]).predict([text]).iloc[0]
    assert label.text_content() == expected["label"] == "sport"
    confidence = page.get_by_test_id("result-confidence").text_content()
    assert confidence == f"{100 * expected['confidence']:.1f}% confidence"
    assert page.get_by_test_id("bar").count() == 2
    assert page.get_by_test_id("bar-name").all_text_contents() == ["sport", "food"]  # sorted
    width = page.locator(".bar-fill").first.evaluate("e => parseFloat(e.style.width)")
    assert width == pytest.approx(100 * expected["confidence"], abs=1e-3)
    assert page.get_by_test_id("latency").text_content().startswith("Answered in ")
    page.screenshot(path=tmp_path / "text.png", full_page=True)


def test_an_uploaded_png_gets_a_label(page, server, runs, tmp_path):
    from PIL import Image

    open_model(page, server, "digits")
    x, _ = make_images(3, seed=5)
    png = tmp_path / "digit.png"
    Image.fromarray(x[1, 0]).save(png)
    page.get_by_test_id("image-input").set_input_files(str(png))
    page.get_by_test_id("image-preview").wait_for(state="visible")
    src = page.get_by_test_id("image-preview").get_attribute("src")
    assert src == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    page.get_by_test_id("predict").click()
    label = page.get_by_test_id("result-label")
    label.wait_for()
    expected = Predictor.load(runs["digits"]).predict(str(png)).iloc[0]["label"]
    assert label.text_content() == expected
    assert page.get_by_test_id("bar").count() == 3
    page.screenshot(path=tmp_path / "image.png", full_page=True)


def test_a_table_row_filled_in_the_form_gets_a_label(page, server, runs, tmp_path):
    open_model(page, server, "blobs")
    colour = page.get_by_test_id("feature-colour")
    assert colour.locator("option").all_text_contents() == ["blue", "green", "red"]
    assert page.get_by_test_id("feature-a").input_value() == ""  # numbers start empty
    page.get_by_test_id("predict").click()  # empty numbers are sent as null: the server says so
    message = page.get_by_test_id("error-message")
    message.wait_for()
    assert "column 'a' is missing a value" in message.text_content()

    page.get_by_test_id("feature-a").fill("5")
    page.get_by_test_id("feature-b").fill("5.2")
    colour.select_option("green")
    page.get_by_test_id("predict").click()
    label = page.get_by_test_id("result-label")
    label.wait_for()
    expected = Predictor.load(runs["blobs"]).predict({"a": 5.0, "b": 5.2, "colour": "green"})
    assert label.text_content() == expected.iloc[0]["label"] == "bee"
    assert page.get_by_test_id("bar").count() == 3
    assert page.get_by_test_id("error-box").is_hidden()  # a good answer clears the error
    page.screenshot(path=tmp_path / "table.png", full_page=True)


COUNT_UPDATES = """() => {
    window.updates = 0;
    window.callbacks = 0;
    new MutationObserver((records) => { window.updates += records.length; window.callbacks++; })
        .observe(document.querySelector('[data-testid="messages"]'),
                 {characterData: true, childList: true, subtree: true});
}"""


def test_a_prompt_streams_its_greedy_continuation(page, server, runs, tmp_path):
    open_model(page, server, "gpt")
    assert page.get_by_test_id("chat-mode").text_content().startswith("Completion")
    page.get_by_test_id("max-tokens").fill("24")
    page.get_by_test_id("temperature").fill("0")
    page.evaluate(COUNT_UPDATES)
    prompt = "the cat "
    page.get_by_test_id("chat-input").fill(prompt)
    page.get_by_test_id("send").click()
    page.locator('[data-testid="assistant-message"][data-state="done"]').wait_for()

    body = {"model": "gpt", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()
    expected = whole["choices"][0]["text"]
    reply = page.get_by_test_id("assistant-message")
    assert reply.locator(".bubble-text").text_content() == expected != ""
    assert page.get_by_test_id("user-message").locator(".bubble-text").text_content() == prompt
    chunks = int(reply.get_attribute("data-chunks"))
    updates = page.evaluate("window.updates")
    assert chunks > 1
    assert updates == 1 + chunks  # the two bubbles added at once, then one update per chunk
    print(f"stream: {chunks} chunks, {page.evaluate('window.callbacks')} observer callbacks")
    assert reply.get_attribute("data-finish") == whole["choices"][0]["finish_reason"]
    assert page.get_by_test_id("send").is_enabled() and page.get_by_test_id("stop").is_disabled()
    page.screenshot(path=tmp_path / "chat.png", full_page=True)


def test_a_missing_api_key_shows_the_401_until_the_key_is_entered(page, runs, tmp_path):
    app = create_app([runs["blobs"]], ServeSettings(api_keys=[KEY]))
    with LiveServer(app) as live:
        page.goto(f"{live.url}/")
        box, message = page.get_by_test_id("error-box"), page.get_by_test_id("error-message")
        box.wait_for(state="visible")
        assert page.get_by_test_id("error-title").text_content() == "Error 401"
        assert message.text_content().startswith("an API key is required")
        page.screenshot(path=tmp_path / "error.png", full_page=True)

        page.get_by_test_id("api-key").fill("wrong-key")
        page.get_by_test_id("api-key-save").click()
        page.wait_for_function(
            "document.querySelector('[data-testid=error-box]').dataset.status === '403'"
        )
        assert message.text_content() == "the API key is not valid"

        page.get_by_test_id("api-key").fill(KEY)
        page.get_by_test_id("api-key-save").click()
        page.wait_for_function("document.body.dataset.ready === 'true'")
        assert box.is_hidden()
        assert page.evaluate("localStorage.getItem('danlu.apiKey')") == KEY
        assert page.get_by_test_id("model-id").text_content() == "blobs"
        assert page.get_by_test_id("picker-wrap").is_hidden()  # one model: no picker
        page.get_by_test_id("feature-a").fill("0")
        page.get_by_test_id("feature-b").fill("0")
        page.get_by_test_id("predict").click()
        page.get_by_test_id("result-label").wait_for()
        row = {"a": 0.0, "b": 0.0, "colour": "blue"}  # a category starts at its first value
        expected = Predictor.load(runs["blobs"]).predict(row).iloc[0]["label"]
        assert page.get_by_test_id("result-label").text_content() == expected
