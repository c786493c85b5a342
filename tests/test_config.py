"""Config overrides and validation: every bad key or value is rejected with the key named."""
import os

import ml_collections
import pytest

from jaxvision import config as config_lib
from jaxvision.config import ConfigError


def make_config(tmp_path):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = str(tmp_path / "run")
    c.lr = 0.1
    c.batch_size = 64
    c.steps = 100
    c.widths = (8, 16)
    c.fsdp = False
    c.data = "digits"
    c.optim = ml_collections.ConfigDict({"momentum": 0.9})
    return c


def test_overrides_parse_as_the_keys_type(tmp_path):
    c = config_lib.parse_args(
        ["--config.lr=0.5", "--config.steps=7", "--config.fsdp=true", "--config.widths=(4, 8, 16)",
         "--config.data=tfds:cifar10", "--config.optim.momentum=0.5", "--config.lr=1"],
        lambda: make_config(tmp_path))
    assert c.lr == 1.0 and isinstance(c.lr, float)
    assert c.steps == 7 and c.fsdp is True and c.widths == (4, 8, 16)
    assert c.data == "tfds:cifar10" and c.optim.momentum == 0.5
    with pytest.raises(AttributeError):  # locked after parsing: typos cannot add keys
        c.lrr = 1.0


def test_smoke_flag_picks_the_smoke_config(tmp_path):
    def smoke():
        c = make_config(tmp_path)
        c.steps = 3
        return c

    assert config_lib.parse_args(["--smoke"], lambda: make_config(tmp_path), smoke).steps == 3
    assert config_lib.parse_args(["--smoke", "--config.steps=5"],
                                 lambda: make_config(tmp_path), smoke).steps == 5


@pytest.mark.parametrize("arg, message", [
    ("--config.lrr=0.1", "unknown config key 'lrr'; did you mean 'lr'"),
    ("--config.optim.momentun=0.1", "unknown config key 'optim.momentun'"),
    ("--config.steps=ten", "config key 'steps' expects an integer, got 'ten'"),
    ("--config.lr=fast", "config key 'lr' expects a number, got 'fast'"),
    ("--config.fsdp=maybe", "config key 'fsdp' expects a boolean"),
    ("--config.widths=[", "config key 'widths' expects a tuple"),
    ("--config.steps", "has no value: write --config.steps=VALUE"),
    ("--lr=0.1", "unrecognised argument '--lr=0.1'"),
])
def test_bad_overrides_name_the_key(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_lib.parse_args([arg], lambda: make_config(tmp_path))


@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.1, "config key 'lr' must be a positive number, got -0.1"),
    ("lr", float("nan"), "config key 'lr' must be a positive number"),
    ("batch_size", 12, "config key 'batch_size' must be divisible by the device count \\(8\\)"),
    ("batch_size", 0, "config key 'batch_size' must be a positive integer"),
    ("steps", 0, "config key 'steps' must be a positive integer, got 0"),
    ("optim.momentum", 1.5, "config key 'optim.momentum' must be in \\[0, 1\\)"),
    ("seed", -1, "config key 'seed' must be an integer >= 0"),
])
def test_invalid_values_name_the_key(tmp_path, key, value, message):
    c = make_config(tmp_path)
    config_lib.override(c, key, str(value))
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)
    assert not os.path.exists(c.workdir), "nothing is created for a rejected config"


def test_unwritable_workdir_is_rejected(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    c = make_config(tmp_path)
    c.workdir = str(blocker / "run")  # a directory cannot be made under a file, even as root
    with pytest.raises(ConfigError, match="config key 'workdir' is not a writable directory"):
        config_lib.validate(c)


def test_all_errors_reported_at_once(tmp_path):
    c = make_config(tmp_path)
    c.lr, c.steps = -1.0, 0
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c)
    assert "'lr'" in str(e.value) and "'steps'" in str(e.value)


def test_valid_config_creates_workdir_and_locks(tmp_path):
    c = config_lib.validate(make_config(tmp_path))
    assert os.path.isdir(c.workdir)
    with pytest.raises(AttributeError):
        c.new_key = 1


def test_check_choice(tmp_path):
    c = make_config(tmp_path)
    config_lib.check_choice(c, "data", ("digits",))
    with pytest.raises(ConfigError, match="config key 'data' must be one of 'a', 'b'"):
        config_lib.check_choice(c, "data", ("a", "b"))


def test_experiment_rejects_bad_config_before_loading_data(tmp_path, monkeypatch):
    """A bad value fails in validate(), before data is read or anything is compiled."""
    from experiments import quickstart
    from jaxvision.pipelines import sources

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the config was validated")

    monkeypatch.setattr(sources, "digits", no_data)
    c = quickstart.get_config()
    c.workdir = str(tmp_path / "q")
    c.lr = -1.0
    with pytest.raises(ConfigError, match="'lr'"):
        quickstart.main(c)


def test_command_line_errors_exit_2_with_the_key_named(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", "--config.lrr=0.1"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown config key 'lrr'; did you mean 'lr'?")
