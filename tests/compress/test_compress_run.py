"""`danlu compress RUN` end to end on tiny runs: each variant is a run directory that names its
parent, loads, predicts and is evaluated on the parent's split; the trade-off table and its
page are written; bad settings give one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import danlu
from conftest import tiny_config, tiny_gpt_config
from danlu.api_compress import compress
from danlu.cli import app
from danlu.errors import ConfigError
from danlu.rundir import RunDir, sha256_file
from danlu.serve.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(cfg: dict, run_dir: str) -> RunDir:
    return danlu.train(cfg, run_dir=run_dir, show_progress=False).run


@pytest.fixture
def blobs_run(blobs_csv: Path) -> RunDir:
    data = {"label": "kind", "split": {"val": 0.2, "test": 0.25}}
    return _train(
        tiny_config(str(blobs_csv), data=data, model={"hidden_sizes": [32, 32]}), "runs/b"
    )


def test_a_distilled_student_is_a_run_of_its_own_named_by_the_table(blobs_run):
    variants = [{"name": "student", "method": "distill", "student": {"hidden_sizes": [8]},
                 "temperature": 2.0, "alpha": 0.7, "train": {"max_steps": 40}}]  # fmt: skip
    result = compress(blobs_run, {"variants": variants}, measure=False)
    student = result.variants["student"]
    assert student.path == blobs_run.path / "compressed" / "student"
    meta = json.loads((student.path / "compression.json").read_text())
    assert meta["kind"] == "distill" and meta["method"] == "distill"
    assert meta["parameters_after"] < meta["parameters_before"]
    lineage = student.read("lineage.json")
    assert lineage["kind"] == "compressed" and lineage["status"] == "completed"
    assert lineage["parent"]["run"] == str(blobs_run.path)
    assert lineage["parent"]["weights_sha256"] == sha256_file(blobs_run.weights)
    assert student.load_config().model.hidden_sizes == [8]
    # evaluated on the parent's split, in the table next to the parent
    rows = {r["name"]: r for r in result.table["rows"]}
    assert set(rows) == {"parent", "student"}
    assert rows["student"]["metric"] == student.read("metrics.json")["test"]["accuracy"]
    assert rows["student"]["parameters"] == meta["parameters_after"]
    assert rows["student"]["metric"] > 0.6  # 3 separable blobs: the student learned them
    assert (blobs_run.path / "compress_report.html").is_file()
    saved = json.loads((blobs_run.path / "compress_report.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["parent", "student"]
    # it predicts like any run
    frame = Predictor.load(student).predict(
        __import__("pandas").DataFrame({"a": [4.0], "b": [4.0], "colour": ["red"]})
    )
    assert frame["label"].tolist() == ["bee"]


def test_complete_variants_are_kept_on_a_rerun_unless_overwritten(blobs_run):
    cfg = {"variants": [{"name": "s", "method": "distill", "student": {"hidden_sizes": [4]},
                         "train": {"max_steps": 5}}]}  # fmt: skip
    first = compress(blobs_run, cfg, measure=False).variants["s"]
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    compress(blobs_run, cfg, measure=False)
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp
    compress(blobs_run, cfg, measure=False, overwrite=True)
    assert (first.path / "model.safetensors").stat().st_mtime_ns != stamp


def test_a_tied_language_model_shares_its_embedding_and_loads(tmp_path):
    cfg = tiny_gpt_config(tmp_path, 10, dim=16, tie_weights=False)
    parent = _train(cfg, "runs/lm")
    result = compress(
        parent, {"variants": [{"name": "tied", "method": "tie_weights"}]}, measure=False
    )
    tied = result.variants["tied"]
    meta = tied.read("compression.json")
    vocab, dim = parent.read("preprocess.json")["text"]["vocab_size"], 16
    assert meta["parameters_before"] - meta["parameters_after"] == vocab * dim
    assert tied.load_config().model.tie_weights is True
    # the output layer is the embedding: one tensor fewer on disk
    assert len(load_file(str(tied.weights))) == len(load_file(str(parent.weights))) - 1
    assert danlu.generate(tied, ["the "], max_new_tokens=3, temperature=0)[0]


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"name": "big", "method": "distill", "student": {"hidden_sizes": [64, 64]}},
         "the student has"),
        ({"name": "t", "method": "tie_weights"}, "no output layer to tie"),
        ({"name": "s", "method": "distill", "student": {"layers": 2}}, "layers is not a key"),
    ],
)  # fmt: skip
def test_bad_variants_fail_in_one_line(blobs_run, variant, message):
    with pytest.raises(ConfigError, match=message) as err:
        compress(blobs_run, {"variants": [variant]}, measure=False)
    assert "\n" not in str(err.value)
    assert not (blobs_run.path / "compressed" / variant["name"]).exists()


def test_compressed_runs_ensembles_and_unknown_names_are_refused(blobs_run):
    cfg = {"variants": [{"name": "s", "method": "distill", "student": {"hidden_sizes": [4]},
                         "train": {"max_steps": 5}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="--only names nope"):
        compress(blobs_run, cfg, only=["nope"], measure=False)
    variant = compress(blobs_run, cfg, measure=False).variants["s"]
    with pytest.raises(ConfigError, match="itself a compressed variant"):
        compress(variant, cfg, measure=False)


def test_the_cli_prints_the_table_and_reports_config_errors_in_one_line(blobs_run, tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text(yaml.safe_dump({"compress": {"budget": 2.0, "variants": [
        {"name": "s", "method": "distill", "student": {"hidden_sizes": [8]},
         "train": {"max_steps": 30}}]}}))  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(blobs_run.path), "--config", str(good)])
    assert res.exit_code == 0, res.output
    assert "recommended:" in res.output and "compress_report.html" in res.output
    assert "accuracy on test (budget 2.0 points)" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"compress": {"variants": [{"name": "p", "method": "neurons",
                                                              "amount": 1.5}]}}))  # fmt: skip
    res = runner.invoke(app, ["compress", str(blobs_run.path), "--config", str(bad)])
    assert res.exit_code == 2
    assert "compress.variants.0.amount" in res.output and "less than 1" in res.output
    assert "Traceback" not in res.output


def test_pruned_variants_shrink_or_sparsify_and_load_through_the_run(blobs_run):
    variants = [
        {"name": "neurons", "method": "neurons", "amount": 0.5, "train": {"max_steps": 20}},
        {"name": "sparse", "method": "magnitude", "amount": 0.6},
    ]
    result = compress(blobs_run, {"variants": variants}, measure=False)
    rows = {r["name"]: r for r in result.table["rows"]}
    neurons, sparse = result.variants["neurons"], result.variants["sparse"]
    meta = neurons.read("compression.json")
    assert meta["format"] == "pruned" and meta["parameters_after"] < meta["parameters_before"]
    assert rows["neurons"]["parameters"] == meta["parameters_after"]
    assert rows["neurons"]["file_bytes"] < rows["parent"]["file_bytes"]
    assert neurons.read("lineage.json")["steps"] == 20  # the recovery fine-tune ran
    weights = load_file(str(neurons.weights))
    assert weights["body.0.weight"].shape[0] == 16  # 32 hidden units → 16
    # magnitude pruning zeroes weights but does not claim a smaller file
    smeta = sparse.read("compression.json")
    assert smeta["format"] == "plain" and smeta["shrinks"] is False
    assert abs(smeta["sparsity"] - 0.6) < 0.01
    assert abs(rows["sparse"]["file_bytes"] - rows["parent"]["file_bytes"]) < 200  # header only
    for variant in (neurons, sparse):
        assert Predictor.load(variant).predict(
            __import__("pandas").DataFrame({"a": [4.0], "b": [4.0], "colour": ["red"]})
        )["label"].tolist() == ["bee"]


def test_onnx_variants_run_in_onnx_runtime_with_parity_recorded(blobs_run, tmp_path):
    variants = [{"name": "onnx", "method": "onnx"}, {"name": "onnx-int8", "method": "onnx_int8"}]
    result = compress(blobs_run, {"variants": variants}, measure=False)
    fp32, int8 = result.variants["onnx"], result.variants["onnx-int8"]
    assert (fp32.path / "model.onnx").is_file() and not (fp32.path / "model.safetensors").exists()
    assert fp32.read("compression.json")["parity"]["max_abs_diff"] < 1e-4
    assert int8.read("compression.json")["parity"]["max_abs_diff"] > 0  # int8 is not exact
    rows = {r["name"]: r for r in result.table["rows"]}
    assert rows["onnx"]["metric"] == rows["parent"]["metric"]
    assert rows["onnx-int8"]["file_bytes"] < rows["onnx"]["file_bytes"]
    from danlu.models.onnx_runtime import OnnxModel

    predictor = Predictor.load(int8)
    assert isinstance(predictor.model, OnnxModel)
    frame = predictor.predict(
        __import__("pandas").DataFrame({"a": [4.0, 0.0], "b": [4.0, 0.0], "colour": ["red"] * 2})
    )
    assert frame["label"].tolist() == ["bee", "ant"]


def test_export_writes_a_checked_file_and_refuses_unknown_formats(blobs_run, tmp_path):
    result = danlu.export(blobs_run, "onnx", tmp_path / "out")
    assert result.path == tmp_path / "out" / "model.onnx" and result.path.is_file()
    assert result.parity["max_abs_diff"] < 1e-4 and result.parity["inputs"] == 2
    res = CliRunner().invoke(app, ["export", str(blobs_run.path), "--format", "torchscript"])
    assert res.exit_code == 0, res.output
    assert (blobs_run.path / "export" / "model.torchscript.pt").is_file()
    assert "max |Δ|" in res.output
    res = CliRunner().invoke(app, ["export", str(blobs_run.path), "--format", "tflite"])
    assert res.exit_code == 2 and "--format 'tflite' is not an export format" in res.output
