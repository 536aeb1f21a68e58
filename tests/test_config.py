"""``CascadeConfig``: validated when built (before any model loads), frozen, round-tripped through
files (old files included), and ``Cascade.with_config`` reusing loaded levels."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from csdrafting import Cascade, CascadeConfig, ConfigError
from csdrafting.config import AUTO_MAG_FIRST
from csdrafting.kmatrix import KMatrix

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lenience=0.5), "lenience"),
        (dict(lenience=float("nan")), "lenience"),
        (dict(drafters=["a"], k_matrix=[[1, 2], [3, 4]]), "below the diagonal"),
        (dict(drafters=["a"], k_matrix=[[1]]), "2x2"),
        (dict(mag_first=0), "mag_first"),
        (dict(mag_first=True), "mag_first"),
        (dict(dtype="float8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(runner="fast"), "runner"),
        (dict(backend="onnx"), "backend"),
        (dict(mag="yes"), "mag"),
        (dict(drafters="models/pycode-5m"), "drafters"),
    ],
)
def test_bad_values_raise_before_anything_loads(fields, message):
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        CascadeConfig(target="/no/such/model", **fields)
    assert time.perf_counter() - started < 0.5  # nothing was loaded (the target does not even exist)


def test_frozen():
    config = CascadeConfig(target="t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lenience = 2.0


def test_auto_is_resolved_in_one_place():
    auto = CascadeConfig(target="t", drafters=["a", "b"]).resolve()
    assert auto.k_matrix == KMatrix.default(2, True) and auto.adaptive and auto.mag_first == AUTO_MAG_FIRST
    explicit = CascadeConfig(target="t", drafters=["a"], k_matrix=[[2, 1], [0, 3]]).resolve()
    assert explicit.k_matrix.as_lists() == [[2, 1], [0, 3]] and not explicit.adaptive and explicit.mag_first is None
    no_mag = CascadeConfig(target="t", mag=False, mag_first=4, k_matrix=[]).resolve()
    assert no_mag.mag_first is None  # nothing to gate


def test_files_round_trip_and_old_files_load(tmp_path):
    config = CascadeConfig(target="t", drafters=["a"], k_matrix="3,2;1", lenience=2, mag_first=4)
    path = tmp_path / "c.json"
    config.save(path)
    assert CascadeConfig.load(path) == config
    old = {"target": "t", "drafters": ["a"], "k_matrix": None, "adaptive": None}  # as early versions wrote
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert CascadeConfig.load(tmp_path / "old.json").is_auto
    for shipped in [MODELS_DIR / "csd_default.json", *sorted((REPO / "benchmarks" / "configs").glob("*.json"))]:
        assert CascadeConfig.load(shipped).target is not None
    (tmp_path / "typo.json").write_text(json.dumps({"target": "t", "lenienc": 2}))
    with pytest.raises(ConfigError, match="unknown configuration keys"):
        CascadeConfig.load(tmp_path / "typo.json")


@pytest.fixture(scope="module")
def family():
    return Cascade.from_pretrained(
        MODELS_DIR / "pycode-22m",
        [MODELS_DIR / "pycode-5m", MODELS_DIR / "pycode-1m"],
        k_matrix=[[2, 1, 3], [0, 1, 2], [0, 0, 3]],
    )


def test_with_config_reuses_the_levels_and_changes_speed_never_output(family):
    prompt = "import os\n\n\ndef walk(path):\n"
    reference = family.generate(prompt, 32).token_ids
    for changes in (
        dict(drafters=family.config.drafters[1:], k_matrix=[[2, 4], [0, 3]]),
        dict(drafters=(), k_matrix=[[6]], mag_first=3),
        dict(drafters=(), mag=False, k_matrix=[]),
        dict(k_matrix="auto"),
        dict(lenience=3.0),
    ):
        started = time.perf_counter()
        other = family.with_config(dataclasses.replace(family.config, **changes))
        assert time.perf_counter() - started < 0.5
        assert other.target is family.target  # the same loaded level, not a reload
        assert other.generate(prompt, 32).token_ids == reference


def test_with_config_refuses_what_needs_a_reload(family):
    with pytest.raises(ConfigError, match="reload"):
        family.with_config(dataclasses.replace(family.config, dtype="float64"))
    with pytest.raises(ConfigError, match="not among the loaded levels"):
        family.with_config(dataclasses.replace(family.config, drafters=("/elsewhere/pycode-5m",), k_matrix="auto"))
