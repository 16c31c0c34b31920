"""Drift: the statistics on hand-computed values, the training reference and its cache, and
verdicts on live traffic drawn from the training distribution or moved away from it."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare, ks_2samp

import danlu
from conftest import tiny_config
from danlu.manifest import verify
from danlu.rundir import RunDir
from danlu.serve import drift
from danlu.serve.drift_checks import (
    Thresholds,
    bin_counts,
    category_check,
    js_divergence,
    numeric_checks,
    output_checks,
    psi,
    quantile_edges,
    size_check,
    vocab_check,
)
from danlu.serve.drift_html import render
from danlu.serve.predictor import Predictor
from danlu.serve.requestlog import record, summarize

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- statistics


def test_psi_matches_the_formula() -> None:
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    # an empty bin is floored at 1e-4 instead of giving an infinite PSI
    expected = -0.5 * math.log(0.5) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert psi([10, 0], [5, 5]) == pytest.approx(expected)


def test_quantile_bins_of_the_reference() -> None:
    sample = np.arange(1.0, 11.0)  # 1..10
    edges = quantile_edges(sample, 2)
    np.testing.assert_allclose(edges, [5.5])
    assert bin_counts(np.array([1.0, 5.5, 6.0, 100.0]), edges).tolist() == [2, 2]
    np.testing.assert_allclose(quantile_edges(sample, 4), [3.25, 5.5, 7.75])
    assert quantile_edges(np.ones(10), 4).tolist() == [1.0]  # ties merge bins


def test_numeric_checks_psi_and_ks() -> None:
    ref = {"sample": [1.0, 2.0, 3.0, 4.0], "mean": 2.5}
    psi_check, ks_check = numeric_checks(
        "x", ref, np.array([3.0, 4.0, 5.0, 6.0, np.nan]), Thresholds()
    )
    # 2 bins split at 2.5: reference [2, 2], live [0, 4]
    hand = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + (1 - 0.5) * math.log(1 / 0.5)
    assert psi_check.value == pytest.approx(hand)
    assert psi_check.status == "drift"
    assert psi_check.plot == {
        "labels": ["≤ 2.5", "> 2.5"],
        "reference": [0.5, 0.5],
        "live": [0.0, 1.0],
    }
    assert ks_check.value == pytest.approx(0.5)  # the CDFs differ most between 2 and 3
    assert ks_check.p == pytest.approx(ks_2samp([1, 2, 3, 4], [3, 4, 5, 6]).pvalue)
    assert ks_check.status == "ok"  # p ≈ 0.69: four values prove nothing


def test_js_divergence() -> None:
    assert js_divergence([1, 1, 0], [0, 1, 1]) == pytest.approx(0.5)
    assert js_divergence([3, 1], [6, 2]) == pytest.approx(0.0)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)


def test_vocabulary_shift_names_the_new_tokens() -> None:
    bags = [[1]] * 50 + [[3]] * 50  # token 2 gone, token 3 new
    c = vocab_check({"1": 50, "2": 50}, bags, Thresholds(), names={1: "cat", 3: "zebra"}.get)
    assert c.value == pytest.approx(0.5)  # JS of (½, ½, 0) and (½, 0, ½)
    assert c.status == "drift"
    assert "'zebra' 50.0% (training 0.0%)" in c.detail and "'cat'" not in c.detail
    assert c.plot == {"labels": ["zebra"], "reference": [0.0], "live": [0.5]}
    same = vocab_check({"1": 50, "2": 50}, [[1]] * 40 + [[2]] * 40, Thresholds())
    assert same.value == pytest.approx(0.0) and same.status == "ok"


def test_unseen_categories_count_in_their_own_bucket() -> None:
    values = ["a"] * 40 + ["b"] * 40 + ["z"] * 20
    c = category_check("psi:c", {"a": 50, "b": 50}, values, Thresholds())
    expected = 2 * (-0.1 * math.log(0.4 / 0.5)) + (0.2 - 1e-4) * math.log(0.2 / 1e-4)
    assert c.value == pytest.approx(expected)
    assert (c.status, c.detail) == ("drift", "unseen: 'z' ×20")
    assert c.plot["labels"] == ["a", "b", "(unseen)"]


def test_class_mix_chi_square_and_confidence() -> None:
    ref = {"outputs": {"classes": ["x", "y"], "counts": [50, 50]},
           "confidence": {"mean": 0.9, "n": 10, "split": "val"}}  # fmt: skip
    outputs = [{"label": "x", "confidence": 0.9}] * 70 + [{"label": "y", "confidence": 0.6}] * 30
    mix, chi2, drop, trend = output_checks(ref, outputs, Thresholds())
    assert mix.name == "psi:class_mix"
    assert mix.value == pytest.approx(psi([0.5, 0.5, 0], [0.7, 0.3, 0]))
    assert chi2.value == pytest.approx(0.2)  # total variation
    assert chi2.p == pytest.approx(chisquare([70, 30], [50, 50]).pvalue)
    assert chi2.status == "drift"
    assert drop.value == pytest.approx(0.9 - 0.81) and drop.status == "warn"
    assert trend.value == pytest.approx(0.9 - 0.6) and trend.status == "drift"  # later: worse


def test_size_mismatch() -> None:
    ok = {"kind": "image", "height": 8, "width": 8}
    c = size_check({"height": 8, "width": 8}, [ok] * 9 + [{**ok, "height": 16}], Thresholds())
    assert (c.value, c.status, c.detail) == (0.1, "warn", "training 8×8; live 16×8 ×1")


# ------------------------------------------------------------------- a table classifier


def blob_rows(n: int, seed: int, shift: float = 0.0, classes=(0, 1, 2)) -> pd.DataFrame:
    """Rows of conftest's blobs_csv distribution (its generator, so seed 0, n 120 is that
    file): class centres (0, 0), (4, 4), (0, 4), noise 0.5, colour tied to the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(n, 2))
    colour = np.where(y == 1, "red", np.where(rng.random(n) < 0.5, "blue", "green"))
    frame = pd.DataFrame({"a": pts[:, 0].round(4) + shift, "b": pts[:, 1].round(4),
                          "colour": colour, "kind": np.array(["ant", "bee", "cat"])[y]})  # fmt: skip
    return frame[np.isin(y, classes)].reset_index(drop=True)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("drift_table")
    blob_rows(120, 0).to_csv(root / "blobs.csv", index=False)
    cfg = tiny_config(str(root / "blobs.csv"), data={"label": "kind"})
    return danlu.train(cfg, run_dir=root / "run", show_progress=False).run


def live(run: RunDir, rows: pd.DataFrame, start: float = 1000.0) -> list[dict]:
    """Log records as the server writes them, one second apart."""
    p = Predictor(run)
    inputs = rows.drop(columns=["kind"], errors="ignore")
    preds = p.predict(inputs)
    out = []
    for i, s in enumerate(summarize(p, p.collect(inputs))):
        r = record("m", "/v1/predict", s, preds.iloc[i].to_dict(), 1.0)
        out.append({**r, "t": start + i})
    return out


def test_reference_profiles_the_training_split(table_run: RunDir) -> None:
    ref = drift.reference(table_run)
    lineage = table_run.read("lineage.json")
    assert ref["data_hash"] == lineage["data_hash"]
    assert (ref["input"], ref["task"]) == ("table", "classification")
    train = table_run.read("data_card.json")["sizes"]["train"]
    assert ref["examples"] == train == sum(ref["outputs"]["counts"])
    assert ref["columns"] == {"a": "numeric", "b": "numeric", "colour": "categorical"}
    assert sorted(ref["categorical"]["colour"]) == ["blue", "green", "red"]
    assert ref["numeric"]["a"]["n"] == train and len(ref["numeric"]["a"]["sample"]) == train
    assert ref["outputs"]["classes"] == ["ant", "bee", "cat"]
    assert 0.33 < ref["confidence"]["mean"] <= 1.0 and ref["confidence"]["split"] == "val"


def test_reference_is_cached_and_reused(table_run: RunDir, monkeypatch) -> None:
    first = drift.reference(table_run)
    path = table_run.path / "drift_reference.json"
    stamp = path.stat().st_mtime_ns

    def fail(run):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(drift, "build_reference", fail)
    assert drift.reference(table_run) == first
    assert path.stat().st_mtime_ns == stamp
    verify(table_run.path)  # pinned in manifest.json: the run still verifies
    monkeypatch.undo()
    stale = {**first, "data_hash": "0" * 64}  # made for other data: built again
    path.write_text(json.dumps(stale))
    assert drift.reference(table_run)["data_hash"] == first["data_hash"]


def test_no_drift_on_rows_from_the_training_distribution(table_run: RunDir) -> None:
    report = drift.compare(drift.reference(table_run), live(table_run, blob_rows(300, 1)))
    assert report.status == "ok", [(c.name, c.value) for c in report.checks if c.status != "ok"]
    assert report.message == f"no drift in {len(report.checks)} checks on 300 live samples"
    names = {c.name for c in report.checks}
    assert {"psi:a", "ks:a", "psi:b", "ks:b", "psi:colour", "psi:class_mix",
            "chi2:class_mix", "confidence_drop", "confidence_trend"} <= names  # fmt: skip
    g = drift.gauges(report)
    assert g["drift"] == 0.0 and g["live_samples"] == 300.0
    assert g["psi:a"] < 0.1 and 0 < g["ks_p:a"] <= 1


def test_a_feature_moved_by_three_sigma_drifts(table_run: RunDir) -> None:
    ref = drift.reference(table_run)
    sigma = ref["numeric"]["a"]["std"]
    records = live(table_run, blob_rows(150, 1), start=1000.0)
    records += live(table_run, blob_rows(150, 2, shift=3 * sigma), start=2000.0)
    report = drift.compare(ref, records)
    assert report.status == "drift"
    drifted = {c.name for c in report.drifted}
    assert {"psi:a", "ks:a"} <= drifted and "psi:b" not in drifted
    assert report.checks[0].value > 0.25
    assert report.since == 2000.0  # the shifted half: chunks 4-6 of 50 records drift
    assert drift.gauges(report)["drift"] == 1.0
    data = json.loads(json.dumps(report.to_dict()))  # as drift.json holds it
    assert data["since"] == "1970-01-01T00:33:20+00:00" and data["gauges"]["drift"] == 1.0
    assert drift.gauges(data) == drift.gauges(report) == data["gauges"]


def test_a_changed_class_mix_drifts(table_run: RunDir) -> None:
    report = drift.compare(
        drift.reference(table_run), live(table_run, blob_rows(300, 3, classes=(0, 2)))
    )
    checks = {c.name: c for c in report.checks}
    assert checks["psi:class_mix"].status == "drift"
    assert checks["chi2:class_mix"].status == "drift" and checks["chi2:class_mix"].p < 1e-6


def test_too_few_live_samples_give_no_verdict(table_run: RunDir) -> None:
    records = live(table_run, blob_rows(150, 1, shift=10.0))
    report = drift.compare(drift.reference(table_run), records[:50], Thresholds(min_samples=100))
    assert (report.status, report.message) == ("not enough", "not enough live samples (50 < 100)")
    assert report.checks == []
    assert drift.gauges(report) == {"drift": 0.0, "live_samples": 50.0}


def test_html_shows_the_drifted_feature_and_escapes_names(table_run: RunDir) -> None:
    rows = blob_rows(150, 1, shift=6.0)
    rows.loc[:20, "colour"] = "<script>alert(1)</script>"
    report = drift.compare(drift.reference(table_run), live(table_run, rows))
    page = render(report.to_dict(), "tab<le>")
    assert "<code>psi:a</code>" in page and "Drift: tab&lt;le&gt;" in page
    assert "data:image/png;base64," in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ------------------------------------------------------------------------------ texts

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small", "red", "blue"]


def texts(n: int, seed: int, new: list[str] | None = None, longer: int = 1) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9) * longer)]
        words += [rng.choice(new) for _ in range(4)] if new else []
        rows.append({"text": " ".join(words), "label": "yes" if "cat" in words else "no"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("drift_text")
    texts(150, 0).to_csv(root / "texts.csv", index=False)
    cfg = {
        "seed": 0,
        "data": {"dataset": str(root / "texts.csv"), "text": "text", "label": "label",
                 "tokenizer": {"type": "wordpiece", "vocab_size": 60, "min_frequency": 1}},
        "model": {"type": "rnn", "num_layers": 1, "dim": 16, "hidden_size": 16},
        "train": {"epochs": 1, "batch_size": 16, "tensorboard": False, "precision": "fp32"},
    }  # fmt: skip
    return danlu.train(cfg, run_dir=root / "run", show_progress=False).run


def text_records(run: RunDir, frame: pd.DataFrame) -> list[dict]:
    p = Predictor(run)
    summaries = summarize(p, p.collect(list(frame["text"])))
    return [{**record("m", "/v1/predict", s, {}, 1.0), "t": 1000.0 + i}
            for i, s in enumerate(summaries)]  # fmt: skip


TEXT_CHECKS = ("psi:text.chars", "ks:text.chars", "psi:text.tokens", "ks:text.tokens",
               "unk_rate_shift", "vocab_js")  # fmt: skip


def test_texts_like_training_do_not_drift(text_run: RunDir) -> None:
    ref = drift.reference(text_run)
    assert ref["text"]["unk_rate"] == 0.0 and len(ref["text"]["token_counts"]) >= 12
    report = drift.compare(ref, text_records(text_run, texts(200, 1)))
    checks = {c.name: c for c in report.checks}
    assert [checks[n].status for n in TEXT_CHECKS] == ["ok"] * 6


def test_longer_texts_with_new_words_drift(text_run: RunDir) -> None:
    p = Predictor(text_run)
    names = p.encoder.tokenizer.id_to_token
    new = texts(200, 2, new=["zebra", "quantum", "xylophone"], longer=2)
    report = drift.compare(
        drift.reference(text_run), text_records(text_run, new), token_names=names
    )
    checks = {c.name: c for c in report.checks}
    assert report.status == "drift"
    assert [checks[n].status for n in TEXT_CHECKS[:5]] == ["drift"] * 5
    assert checks["psi:text.chars"].detail.startswith("mean 2")  # ~26 characters in training
    assert checks["unk_rate_shift"].value > 0.1
    assert checks["vocab_js"].status in ("warn", "drift")
    assert "'[UNK]'" in checks["vocab_js"].detail  # the new words are unknown tokens


# ----------------------------------------------------------------------------- images


def test_brighter_or_larger_images_drift(tmp_path_factory: pytest.TempPathFactory) -> None:
    from PIL import Image

    from conftest import make_images

    root = tmp_path_factory.mktemp("drift_images")
    x, y = make_images(90)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (root / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(root / "imgs" / f"c{label}" / f"{i}.png")
    run = danlu.train(
        tiny_config(str(root / "imgs")), run_dir=root / "run", show_progress=False
    ).run
    ref = drift.reference(run)
    assert ref["image"] == {"height": 8, "width": 8, "channels": 1}
    p = Predictor(run)
    same = [a[0] for a in make_images(150, seed=3)[0]]
    bright = [np.clip(a.astype(int) + 80, 0, 255).astype(np.uint8) for a in same]
    large = [np.asarray(Image.fromarray(a).resize((16, 16))) for a in same]
    statuses = {}
    for name, images in (("same", same), ("bright", bright), ("large", large)):
        records = [{**record("m", "/v1/predict", s, {}, 1.0), "t": float(i)}
                   for i, s in enumerate(summarize(p, images))]  # fmt: skip
        statuses[name] = {c.name: c.status for c in drift.compare(ref, records).checks}
    assert set(statuses["same"].values()) == {"ok"}
    assert statuses["bright"]["psi:pixel.mean"] == statuses["bright"]["ks:pixel.mean"] == "drift"
    assert statuses["large"]["size_mismatch"] == "drift"
    assert statuses["large"]["psi:pixel.mean"] == "ok"  # resizing keeps the brightness
