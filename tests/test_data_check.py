"""`danlu data check` and `danlu.data_check` end to end, and training refusing on a blocker."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu.cli import app
from danlu.errors import DataError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PNG = "data:image/png;base64,"
FAST = {"data": {"sufficiency": {"fractions": [0.25, 0.5, 1.0], "seeds": 2}}}


def check_cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["data", "check", *map(str, args)])
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


def config_file(folder: Path, dataset: str, **data) -> Path:
    cfg = tiny_config(dataset, data=data)
    cfg["data"]["sufficiency"] = FAST["data"]["sufficiency"]
    path = folder / "check.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tickets_csv(tmp_path: Path) -> Path:
    """A table whose label column is an ID: a blocker."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=60), "ticket": [f"T{i}" for i in range(60)]})
    path = tmp_path / "tickets.csv"
    frame.to_csv(path, index=False)
    return path


def test_data_check_writes_the_card_and_a_self_contained_page(blobs_csv: Path) -> None:
    cfg = config_file(blobs_csv.parent, blobs_csv.name, label="kind")
    code, out, err = check_cli(cfg, "--out", "report")
    assert code == 0, err
    card = json.loads(Path("report/data_card.json").read_text())
    assert card["sizes"] == {"train": 84, "val": 12, "test": 24}
    assert card["check"]["class_balance"]["class_weights"]
    assert card["check"]["label_noise"]["checked"] == 84
    assert {f["level"] for f in card["findings"]} <= {"info", "warning"}
    s = card["sufficiency"]
    assert s["model"] == "baseline" and len(s["sizes"]) == 3 and s["seeds"] == 2
    assert s["verdict"]["code"] in ("rising", "flat", "noisy")
    page = Path("report/data_check.html").read_text()
    assert page.count(PNG) == 2  # class balance, learning curve
    assert "<script" not in page and "http" not in page  # nothing loaded from elsewhere
    assert "Findings" in page and s["verdict"]["text"].split(":")[0] in page
    assert "findings: 0 blockers" in out and "verdict:" in out
    assert "wrote report/data_card.json" in out.replace("\n", "")
    assert "learning curve: seed 1/2" in err  # progress goes to stderr


def test_data_check_without_sufficiency_in_the_default_folder(blobs_csv: Path) -> None:
    cfg = config_file(blobs_csv.parent, blobs_csv.name, label="kind")
    code, out, err = check_cli(cfg, "data.check.label_noise=false", "--no-sufficiency")
    assert code == 0, err
    folder = Path("runs/tiny-check")
    card = json.loads((folder / "data_card.json").read_text())
    assert "sufficiency" not in card and "label_noise" not in card["check"]
    assert (folder / "data_check.html").read_text().count(PNG) == 1
    assert "verdict" not in out


def test_a_blocker_exits_with_status_2_after_writing_the_report(tickets_csv: Path) -> None:
    cfg = config_file(tickets_csv.parent, tickets_csv.name, label="ticket")
    code, out, err = check_cli(cfg, "--no-sufficiency", "--out", "r")
    assert code == 2
    assert "Traceback" not in out + err
    assert "blocker" in out and "label column 'ticket' looks like an ID" in out
    card = json.loads(Path("r/data_card.json").read_text())
    assert card["findings"][0]["level"] == "blocker"
    assert "label column" in Path("r/data_check.html").read_text()


def test_data_check_user_errors(blobs_csv: Path) -> None:
    code, _, err = check_cli("nope.yaml")
    assert code == 2 and err.startswith("error: config file 'nope.yaml' not found")
    Path("afile").write_text("x")
    cfg = config_file(blobs_csv.parent, blobs_csv.name, label="kind")
    code, _, err = check_cli(cfg, "--out", "afile")
    assert code == 2 and "--out 'afile' is a file" in err


def test_python_api_data_check(tickets_csv: Path) -> None:
    cfg = tiny_config(str(tickets_csv), data={"label": "ticket", "check": {"label_noise": False}})
    result = danlu.data_check(cfg, sufficiency=False, out="api")
    assert {f["code"] for f in result.blockers} == {"label_is_id", "class_missing_from_train"}
    assert result.sufficiency is None
    assert (Path("api") / "data_card.json").is_file()


# ------------------------------------------------------------------ before training


def test_training_refuses_data_with_a_blocker(tickets_csv: Path) -> None:
    cfg = tiny_config(str(tickets_csv), data={"label": "ticket"})
    with pytest.raises(
        DataError, match=r"the data check found 2 blocker\(s\): [0-9]+ classes in val/test"
    ) as e:
        danlu.train(cfg, show_progress=False)
    assert "label column 'ticket' looks like an ID" in str(e.value)
    assert "data.check.on_blockers: warn" in str(e.value)
    assert not Path("runs").exists()  # refused before any run folder was made


def test_on_blockers_warn_trains_and_logs(tickets_csv: Path, caplog) -> None:
    cfg = tiny_config(
        str(tickets_csv),
        data={"label": "ticket", "check": {"on_blockers": "warn"}},
        train={"epochs": 1},
    )
    with caplog.at_level(logging.WARNING, logger="danlu"):
        result = danlu.train(cfg, show_progress=False)
    assert any("data check blocker: label column" in r.message for r in caplog.records)
    card = json.loads(result.run.data_card.read_text())
    assert "label_is_id" in {f["code"] for f in card["findings"]}


def test_a_run_card_holds_the_check_findings(blobs_csv: Path) -> None:
    result = danlu.train(
        tiny_config(str(blobs_csv), data={"label": "kind"}, train={"epochs": 1}),
        show_progress=False,
    )
    card = json.loads(result.run.data_card.read_text())
    assert card["check"]["class_balance"]["imbalance_ratio"] >= 1
    assert "duplicates" in card["check"] and "label_noise" not in card["check"]
    assert all("code" in f for f in card["findings"])
