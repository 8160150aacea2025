"""Config loading, validation, overrides and the CLI error wrapper."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from pipelines.common.cli import run_command
from pipelines.common.config import (
    add_config_arguments,
    dump_config,
    flatten_config,
    load_config,
    save_config,
)
from toolkit.errors import UserError


@dataclasses.dataclass
class Optim:
    learning_rate: float = 1e-3
    epochs: int = 10
    schedule: Literal["noam", "constant"] = "noam"


@dataclasses.dataclass
class Data:
    path: str | None = None
    buckets: list[int] = dataclasses.field(default_factory=lambda: [100, 200])


@dataclasses.dataclass
class Config:
    name: str = "demo"
    use_ctc: bool = True
    optim: Optim = dataclasses.field(default_factory=Optim)
    data: Data = dataclasses.field(default_factory=Data)

    def __post_init__(self):
        if self.optim.epochs < 1:
            raise ValueError(f"optim.epochs must be positive, got {self.optim.epochs}")


def test_defaults_file_and_overrides_in_order(tmp_path):
    defaults = tmp_path / "default.yaml"
    defaults.write_text("name: base\noptim:\n  epochs: 5\n")
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  learning_rate: 0.01\n")
    config = load_config(
        Config,
        user,
        ["optim.epochs=7", "data.buckets=[1, 2, 3]", "name=123", "data.path=/x y"],
        default_path=defaults,
    )
    assert config.name == "123"  # str fields keep the text as is
    assert config.optim.learning_rate == 0.01
    assert config.optim.epochs == 7
    assert config.optim.schedule == "noam"
    assert config.data.buckets == [1, 2, 3]
    assert config.data.path == "/x y"
    assert isinstance(config.optim.learning_rate, float)


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    config = load_config(Config, overrides=["optim.learning_rate=1", "data.path=null"])
    assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
    assert config.data.path is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.momentum=0.9"], "unknown config key 'optim.momentum'"),
        (["model=big"], "unknown config key 'model'"),
        (["name.sub=1"], "'name' has no sub-keys"),
        (["optim.epochs=ten"], "'optim.epochs' expects an integer"),
        (["use_ctc=maybe"], "'use_ctc' expects true or false"),
        (["optim.schedule=cosine"], "one of 'noam', 'constant'"),
        (["optim.epochs=0"], "optim.epochs must be positive"),
        (["noequals"], "not of the form key=value"),
    ],
)
def test_bad_overrides_raise_user_error(overrides, message):
    with pytest.raises(UserError) as info:
        load_config(Config, overrides=overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown config key 'optim\.lr'"):
        load_config(Config, path)


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [1, 2\nname: x\n")
    with pytest.raises(UserError, match=r"bad\.yaml line \d+"):
        load_config(Config, path)
    with pytest.raises(UserError, match="does not exist"):
        load_config(Config, tmp_path / "missing.yaml")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must contain a mapping"):
        load_config(Config, path)


def test_dump_save_and_reload_round_trip(tmp_path):
    config = load_config(Config, overrides=["optim.epochs=3", "data.buckets=[5]"])
    text = dump_config(config)
    assert yaml.safe_load(text)["optim"]["epochs"] == 3
    assert text.index("name") < text.index("optim")  # field order, not sorted
    saved = save_config(config, tmp_path / "run" / "config.yaml")
    again = load_config(Config, saved)
    assert again == config
    assert flatten_config(config)["optim.learning_rate"] == 1e-3
    assert flatten_config(config)["data.buckets"] == [5]


def test_argparse_helper():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--print-config", "a.b=1", "c=2"])
    assert args.print_config and args.config is None and args.overrides == ["a.b=1", "c=2"]


def test_run_command_turns_user_error_into_one_line_and_exit_2(capsys):
    def fails():
        raise UserError("config file x.yaml:\n unknown key 'y'")

    assert run_command(fails) == 2
    err = capsys.readouterr().err
    assert err == "error: config file x.yaml: unknown key 'y'\n"
    assert run_command(lambda: None) == 0
    assert run_command(lambda: 3) == 3

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_command(bug)


@dataclasses.dataclass
class Shapes:
    sizes: tuple[int, ...] = (1, 2)
    window: tuple[float, float] = (0.1, 0.2)


def test_tuple_fields():
    config = load_config(Shapes, overrides=["sizes=[3, 4, 5]", "window=[1, 2]"])
    assert config.sizes == (3, 4, 5)
    assert config.window == (1.0, 2.0) and all(isinstance(v, float) for v in config.window)
    assert yaml.safe_load(dump_config(config)) == {"sizes": [3, 4, 5], "window": [1.0, 2.0]}
    with pytest.raises(UserError, match="'window' expects a list of 2 values"):
        load_config(Shapes, overrides=["window=[1]"])
    with pytest.raises(UserError, match=r"'sizes\[1\]' expects an integer"):
        load_config(Shapes, overrides=["sizes=[1, x]"])
