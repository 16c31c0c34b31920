"""The config schema: loading, overrides, validation and the messages a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from danlu.config import EXAMPLES_DIR, Config, apply_overrides, examples, load, validate
from danlu.errors import ConfigError


def base(**sections) -> dict:
    """The smallest valid config, with sections merged in."""
    raw = {"data": {"dataset": "iris"}, "model": {"type": "mlp"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def error(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load(source, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------- unknown keys


def test_unknown_nested_key_names_full_path_and_suggests():
    msg = error(base(train={"optimzer": {"lr": 0.1}}))
    assert msg == ("config: unknown key 'train.optimzer'; did you mean 'train.optimizer'?")


def test_unknown_key_in_tagged_model_section_suggests_without_the_tag():
    msg = error(base(model={"type": "cnn", "chanels": [8]}))
    assert "unknown key 'model.chanels'; did you mean 'model.channels'?" in msg
    assert "model.cnn" not in msg
    assert "'cnn'" not in msg


def test_unknown_key_is_checked_against_the_chosen_model_type():
    # hidden_sizes is an MLP key: a CNN section suggests its own nearest key instead
    msg = error(base(model={"type": "cnn", "hidden_sizes": [8]}))
    assert "unknown key 'model.hidden_sizes'; did you mean 'model.head_sizes'?" in msg
    msg = error(base(model={"type": "mlp", "channels": [8]}))
    assert "unknown key 'model.channels'" in msg
    assert "valid keys here: activation, dropout, hidden_sizes, norm, output, type" in msg


def test_unknown_top_level_key_suggests():
    assert error(base(nmae="x")) == "config: unknown key 'nmae'; did you mean 'name'?"


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error(base(train={"zzqqx": 1}))
    assert "unknown key 'train.zzqqx'; valid keys here: batch_size, checkpoint_every," in msg
    for key in ("epochs", "max_steps", "optimizer", "schedule", "tensorboard"):
        assert key in msg
    msg = error(base(zzqqx=1))
    from danlu.config import Config

    assert msg.endswith("valid keys here: " + ", ".join(sorted(Config.model_fields)))
    assert "compress, data, evaluate, model, name" in msg


def test_every_problem_is_reported_in_one_line():
    msg = error(base(train={"optimzer": {}, "batch_size": 0}, data={"lable": "y"}))
    assert msg.count(";") >= 3
    assert "'train.optimzer'" in msg
    assert "did you mean 'data.label'?" in msg
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)" in msg


# ------------------------------------------------------------------- types and ranges


def test_wrong_type_names_key_value_and_expectation():
    msg = error(base(train={"batch_size": "abc"}))
    assert msg == (
        "config: train.batch_size: Input should be a valid integer, unable to parse string "
        "as an integer (got 'abc')"
    )


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"train": {"optimizer": {"lr": -1}}},
            "train.optimizer.lr: Input should be greater than 0 (got -1)",
        ),
        (
            {"data": {"dataset": "iris", "split": {"val": 1.5}}},
            "data.split.val: Input should be less than 1 (got 1.5)",
        ),
        (
            {"model": {"type": "mlp", "hidden_sizes": [8, 0]}},
            "model.hidden_sizes.1: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"train": {"precision": "fp64"}},
            "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'fp64')",
        ),
        (
            {"train": {"device": "gpu"}},
            "train.device: String should match pattern",
        ),
        (
            {"name": "bad name!"},
            "name: String should match pattern",
        ),
    ],
)
def test_out_of_range_values_name_key_value_and_expectation(sections, expected):
    assert expected in error(base(**sections))


def test_union_member_names_do_not_leak_into_the_key_path():
    msg = error(base(data={"split": {"test": "half"}}, train={"class_weights": "x"}))
    assert "data.split.test: Input should be a valid number" in msg
    assert "or Input should be 'auto' or 'official' (got 'half')" in msg
    assert "train.class_weights: Input should be 'none' or 'auto', or " in msg
    for tag in ("float", "literal[", "list[float]"):
        assert f".{tag}" not in msg


def test_invalid_model_type_suggests_closest():
    msg = error(base(model={"type": "mpl"}))
    assert msg == (
        "config: model.type: got 'mpl', expected one of 'mlp', 'cnn', 'rnn', 'gpt', 'bert', "
        "'seq2seq', 'hf', 'ensemble'; did you mean 'mlp'?"
    )


def test_missing_model_type_lists_types():
    assert error({"data": {"dataset": "iris"}, "model": {"hidden_sizes": [4]}}) == (
        "config: missing required key 'model.type' (one of 'mlp', 'cnn', 'rnn', 'gpt', 'bert', "
        "'seq2seq', 'hf', 'ensemble')"
    )


def test_missing_required_keys():
    assert error({"data": {}, "model": {"type": "mlp"}}) == (
        "config: missing required key 'data.dataset'"
    )
    assert error({"model": {"type": "mlp"}}) == "config: missing required key 'data'"
    assert error({"data": {"dataset": "iris"}}) == "config: missing required key 'model'"


def test_section_of_the_wrong_type():
    msg = error(base(train={"optimizer": 3}))
    assert "train.optimizer: Input should be a valid dictionary" in msg
    assert "(got 3)" in msg


# -------------------------------------------------------------------- cross-field checks


def test_nesterov_needs_sgd_with_momentum():
    msg = error(base(train={"optimizer": {"name": "sgd", "nesterov": True}}))
    assert msg == "config: train.optimizer: nesterov needs name: sgd and momentum > 0"
    cfg = load(base(train={"optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}}))
    assert cfg.train.optimizer.nesterov is True


def test_momentum_applies_to_sgd_only():
    msg = error(base(train={"optimizer": {"name": "adam", "momentum": 0.9}}))
    assert msg == "config: train.optimizer: momentum applies to sgd only (got name: adam)"


def test_training_length_is_required():
    msg = error(base(train={"epochs": None, "max_steps": None}))
    assert msg == "config: train: set train.epochs or train.max_steps"
    assert load(base(train={"epochs": None, "max_steps": 7})).train.max_steps == 7


def test_split_fractions_must_leave_training_data():
    msg = error(base(data={"split": {"val": 0.5, "test": 0.5}}))
    assert msg == "config: data.split: val + test must leave training data, got 0.5 + 0.5"


# ---------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("train.epochs=3", lambda c: c.train.epochs, 3),
        ("train.optimizer.lr=0.05", lambda c: c.train.optimizer.lr, 0.05),
        ("train.optimizer.lr=1e-4", lambda c: c.train.optimizer.lr, 1e-4),
        ("data.normalize=false", lambda c: c.data.normalize, False),
        ("train.tensorboard=no", lambda c: c.train.tensorboard, False),
        ("model.hidden_sizes=[8,4]", lambda c: c.model.hidden_sizes, [8, 4]),
        ("model.hidden_sizes=[]", lambda c: c.model.hidden_sizes, []),
        ("train.max_steps=null", lambda c: c.train.max_steps, None),
        ("train.max_steps=", lambda c: c.train.max_steps, None),
        ("name=my-run.2", lambda c: c.name, "my-run.2"),
        ("data.split={val: 0.2, test: official}", lambda c: c.data.split.test, "official"),
        ("train.early_stopping.patience=3", lambda c: c.train.early_stopping.patience, 3),
    ],
)
def test_override_values_are_parsed_as_yaml(override, get, expected):
    cfg = load(base(train={"max_steps": 5}), [override])
    value = get(cfg)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_in_order_and_into_a_new_section():
    cfg = load(base(), ["train.epochs=2", "train.epochs=5", "evaluate.split=val"])
    assert cfg.train.epochs == 5
    assert cfg.evaluate.split == "val"


def test_override_switching_model_type_validates_the_new_type():
    cfg = load(base(model={"type": "mlp"}), ["model.type=cnn", "model.channels=[4]"])
    assert cfg.model.type == "cnn"
    assert cfg.model.channels == [4]
    msg = error(base(), ["model.type=cnn", "model.chanels=[4]"])
    assert "did you mean 'model.channels'?" in msg


def test_overrides_are_validated_again():
    msg = error(base(), ["train.epochs=0"])
    assert msg == "config: train.epochs: Input should be greater than or equal to 1 (got 0)"
    msg = error(base(), ["train.optimzer.lr=0.1"])
    assert "unknown key 'train.optimzer'; did you mean 'train.optimizer'?" in msg
    msg = error(base(), ["train.optimizer.name=adam", "train.optimizer.momentum=0.9"])
    assert "momentum applies to sgd only" in msg


@pytest.mark.parametrize("bad", ["train.epochs", "=3", " =3", "train..epochs=3", "train.=3"])
def test_bad_override_syntax(bad):
    msg = error(base(), [bad])
    assert msg == (
        f"override '{bad}' is not key=value. "
        "write it like train.max_steps=200 or model.hidden_sizes=[64,32]"
    )


def test_override_into_a_scalar():
    with pytest.raises(ConfigError) as info:
        apply_overrides(base(train={"epochs": 3}), ["train.epochs.x=1"])
    assert (
        str(info.value) == "override 'train.epochs.x=1': 'train.epochs' is a value, not a section"
    )
    # a default-valued scalar is not in the file: validation names the key and what it got
    msg = error(base(), ["train.epochs.x=1"])
    assert msg == "config: train.epochs: Input should be a valid integer (got {'x': 1})"


def test_apply_overrides_does_not_mutate_its_input():
    raw = base(train={"optimizer": {"lr": 0.1}})
    out = apply_overrides(raw, ["train.optimizer.lr=0.5", "model.hidden_sizes=[2]"])
    assert raw["train"]["optimizer"]["lr"] == 0.1
    assert "hidden_sizes" not in raw["model"]
    assert out["train"]["optimizer"]["lr"] == 0.5
    assert out["model"]["hidden_sizes"] == [2]


def test_unparseable_yaml_value_is_kept_as_text():
    out = apply_overrides({}, ["data.label=[unclosed"])
    assert out == {"data": {"label": "[unclosed"}}


# ------------------------------------------------------------------------------- files


def write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", base(train={"optimzer": {}}))
    assert error(path).startswith(f"{path}: unknown key 'train.optimzer'")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  dataset: iris\nmodel: {type: mlp\ntrain:\n  epochs: 1\n")
    msg = error(path)
    assert msg.startswith(f"{path}: line ")
    assert "invalid YAML" in msg
    line = int(msg.split("line ")[1].split(":")[0])
    assert 3 <= line <= 5


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert error(path) == f"{path}: expected a mapping of sections, got list"


def test_empty_yaml_reports_missing_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    msg = error(path)
    assert "missing required key 'data'" in msg
    assert "missing required key 'model'" in msg


def test_missing_file_lists_bundled_examples():
    msg = error("nope/missing.yaml")
    assert msg.startswith("config file 'nope/missing.yaml' not found. check the path;")
    listed = msg.split("bundled examples: ")[1].split(", ")
    assert listed == examples() and {"fashion_cnn", "mnist_mlp", "gpt_bible_char"} <= set(listed)


def test_a_folder_is_not_a_config(tmp_path):
    (tmp_path / "somedir").mkdir()
    msg = error(tmp_path / "somedir")
    assert f"'{tmp_path / 'somedir'}' is a folder, expected a YAML config file" in msg


def test_bundled_examples_resolve_by_name():
    assert {"fashion_cnn", "linear_regression", "mnist_mlp", "tabular_wine", "xor_mlp"} <= set(
        examples()
    )
    cfg = load("fashion_cnn")
    assert cfg.name == "fashion_cnn"
    assert cfg.model.type == "cnn"
    assert cfg.data.dataset == "fashion-mnist"
    assert load("configs/fashion_cnn.yaml") == cfg  # the repository path works from anywhere
    assert load("fashion_cnn", ["train.epochs=1"]).train.epochs == 1


def test_a_local_file_wins_over_a_bundled_example(tmp_path):
    write(tmp_path / "fashion_cnn.yaml", base(name="mine"))
    assert load("fashion_cnn.yaml").name == "mine"


def test_relative_dataset_path_resolves_next_to_the_config(tmp_path):
    (tmp_path / "project" / "data").mkdir(parents=True)
    csv = tmp_path / "project" / "data" / "t.csv"
    csv.write_text("x,y\n1,2\n")
    path = write(tmp_path / "project" / "c.yaml", base(data={"dataset": "data/t.csv"}))
    assert load(path).data.dataset == str(csv.resolve())
    assert load("project/c.yaml").data.dataset == str(csv.resolve())
    # built-in names and paths that do not exist next to the file are left alone
    assert load(write(tmp_path / "project" / "b.yaml", base())).data.dataset == "iris"
    other = write(tmp_path / "project" / "o.yaml", base(data={"dataset": "elsewhere.csv"}))
    assert load(other).data.dataset == "elsewhere.csv"


def test_dict_source_is_not_mutated():
    raw = base(train={"epochs": 2})
    load(raw, ["train.epochs=4"])
    assert raw == base(train={"epochs": 2})


# ------------------------------------------------------------------------ the Config


def test_defaults_are_filled_in():
    cfg = load(base())
    assert cfg.name == "run"
    assert cfg.runs_dir == "runs"
    assert cfg.train.epochs == 10
    assert cfg.train.optimizer.name == "adamw"
    assert cfg.train.optimizer.betas == (0.9, 0.999)
    assert cfg.data.split.test == "auto"
    assert cfg.evaluate.split == "test"
    assert cfg.model.hidden_sizes == [128]


def test_config_is_frozen():
    cfg = load(base())
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 1
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.optimizer.lr = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model.type = "cnn"


def test_validate_returns_a_config_and_names_the_origin():
    assert isinstance(validate(base()), Config)
    with pytest.raises(ConfigError, match=r"^my.yaml: missing required key 'data'$"):
        validate({"model": {"type": "mlp"}}, "my.yaml")


def test_to_yaml_round_trips(tmp_path):
    cfg = load(
        base(
            name="round",
            seed=7,
            data={"label": "y", "columns": {"a": "categorical"}, "augment": {"hflip": True}},
            model={"type": "cnn", "channels": [4, 8]},
            train={"optimizer": {"name": "sgd", "momentum": 0.5}, "class_weights": [1.0, 2.0]},
        )
    )
    text = cfg.to_yaml()
    again = load(yaml.safe_load(text))
    assert again == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load(path) == cfg
    assert again.to_yaml() == text
    assert cfg.to_dict()["train"]["optimizer"]["betas"] == [0.9, 0.999]


EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def test_examples_are_found():
    assert len(EXAMPLE_FILES) >= 5


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_every_example_config_loads_validates_and_round_trips(path):
    cfg = load(path)
    assert cfg.name == path.stem
    assert load(yaml.safe_load(cfg.to_yaml())) == cfg
    if cfg.data.dataset.endswith(".csv"):
        assert Path(cfg.data.dataset).is_file()
