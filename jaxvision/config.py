"""Experiment configs: one `ml_collections.ConfigDict` per experiment, command-line overrides, and
validation that runs before any data is read or any function is compiled.

An experiment file defines `get_config()` (every knob, visible) and `smoke_config()`; its
`__main__` calls `parse_args(sys.argv[1:], get_config, smoke_config)`:

    python -m experiments.quickstart --config.steps=300 --config.lr=0.05
    python -m experiments.cifar10_convnet --smoke --config.workdir=/tmp/run

Overrides must name an existing key (`--config.lrr=...` is an error that names `lrr` and suggests
`lr`) and must parse as the key's type. `validate` then checks values by key name (see `_RULES`),
so a negative learning rate or a batch size that the devices cannot split is rejected with the key
named, before jax compiles anything.
"""
from __future__ import annotations

import ast
import difflib
import math
import os
import tempfile
from typing import Any, Callable, Sequence

import ml_collections


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Overrides from the command line.


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` as the type of `current` (the value in the experiment's config)."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {text!r}")

    if isinstance(current, bool):  # before int: bool is an int subclass
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise fail("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise fail("an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise fail("a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise fail("a tuple such as '(1, 2)'") from None
        if isinstance(value, (int, float, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise fail("a tuple such as '(1, 2)'")
        return type(current)(value)
    # None or anything else: a Python literal if it is one, else the string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` of `config` from the string `text`, in place.

    Raises:
      ConfigError: `key` is not in the config (with close matches), or `text` does not parse.
    """
    known = _leaf_keys(config)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint} (known keys: {', '.join(known)})")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    value = _parse_value(key, text, node[leaf])
    with node.unlocked():
        # ConfigDict is type-safe: assigning a float to an int field raises. A value typed None in
        # the experiment's config (e.g. `max_per_class = None`) takes the parsed type.
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"config key '{key}': {e}") from None


def parse_args(
    argv: Sequence[str],
    get_config: Callable[[], ml_collections.ConfigDict],
    smoke_config: Callable[[], ml_collections.ConfigDict] | None = None,
) -> ml_collections.ConfigDict:
    """Builds the config from `argv`: `[--smoke] [--config.KEY=VALUE ...]`; returns it locked.

    `--help` prints the config's keys and values and exits.
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print("usage: python -m experiments.NAME [--smoke] [--config.KEY=VALUE ...]\n")
        print((smoke_config if "--smoke" in argv and smoke_config else get_config)())
        raise SystemExit(0)
    config = get_config()
    if "--smoke" in argv:
        if smoke_config is None:
            raise ConfigError("this experiment has no --smoke setting")
        config = smoke_config()
        argv.remove("--smoke")
    for arg in argv:
        if not arg.startswith("--config."):
            raise ConfigError(
                f"unrecognised argument {arg!r}: expected --smoke or --config.KEY=VALUE")
        key, sep, text = arg[len("--config."):].partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} has no value: write --config.{key}=VALUE")
        override(config, key, text)
    config.lock()
    return config


# ---------------------------------------------------------------------------------------------
# Validation by key name. A rule returns an error message or None.


def _positive(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        return f"must be a positive number, got {v!r}"


def _non_negative(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        return f"must be >= 0, got {v!r}"


def _positive_int(v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        return f"must be a positive integer, got {v!r}"


def _non_negative_int(v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return f"must be an integer >= 0, got {v!r}"


def _unit_interval(v):  # [0, 1)
    if not isinstance(v, (int, float)) or not 0 <= v < 1:
        return f"must be in [0, 1), got {v!r}"


def _divisible_by_devices(v):
    if err := _positive_int(v):
        return err
    import jax  # imported here so that parsing a config never initialises a backend

    n = jax.device_count()
    if v % n:
        return f"must be divisible by the device count ({n}), got {v}"


def _writable_dir(v):
    if not isinstance(v, str) or not v:
        return f"must be a directory path, got {v!r}"
    try:
        os.makedirs(v, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=v, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"is not a writable directory: {v!r} ({e.strerror or e})"


def _on_bad(v):
    if v not in ("raise", "skip"):
        return f"must be 'raise' or 'skip', got {v!r}"


# Key name -> rule. Matched on the last component of a dotted key, so `optim.lr` is checked too.
_RULES: dict[str, Callable[[Any], str | None]] = {
    "lr": _positive,
    "learning_rate": _positive,
    "batch_size": _divisible_by_devices,
    "eval_batch_size": _divisible_by_devices,
    "steps": _positive_int,
    "epochs": _positive_int,
    "warmup_steps": _non_negative_int,
    "log_every": _positive_int,
    "eval_every": _non_negative_int,  # 0: only at the end
    "ckpt_every": _non_negative_int,  # 0: only at the end
    "keep_checkpoints": _positive_int,
    "weight_decay": _non_negative,
    "l2": _non_negative,
    "momentum": _unit_interval,
    "label_smoothing": _unit_interval,
    "dropout": _unit_interval,
    "seed": _non_negative_int,
    "prefetch": _non_negative_int,
    "on_bad": _on_bad,
    "workdir": _writable_dir,  # last: it creates the directory, so only once the rest is good
}


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every key that has a rule; raises one ConfigError listing each bad key.

    Returns the config, locked (unknown keys can no longer be set by mistake).
    """
    flat = {k: _get(config, k) for k in _leaf_keys(config)}
    errors = []
    for key, value in sorted(flat.items(), key=lambda kv: kv[0].endswith("workdir")):
        rule = _RULES.get(key.rsplit(".", 1)[-1])
        if rule is None or (errors and rule is _writable_dir):
            continue
        if msg := rule(value):
            errors.append(f"config key '{key}' {msg}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    config.lock()
    return config


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for p in dotted.split("."):
        node = node[p]
    return node


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Sequence[Any]) -> None:
    """Raises ConfigError naming `key` unless its value is one of `choices`."""
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}, "
                          f"got {value!r}")


def cli(main: Callable[[ml_collections.ConfigDict], Any],
        get_config: Callable[[], ml_collections.ConfigDict],
        smoke_config: Callable[[], ml_collections.ConfigDict] | None = None,
        argv: Sequence[str] | None = None) -> Any:
    """An experiment's `__main__`: join several hosts if asked, parse, run `main(config)`.

    A bad key or value prints `error: ...` (naming the key) and exits with status 2, like any
    command-line tool, instead of a traceback.
    """
    import sys

    from jaxvision import distributed

    distributed.initialize_from_env()  # several hosts: see jaxvision/distributed.py
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv, get_config, smoke_config)
        return main(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
