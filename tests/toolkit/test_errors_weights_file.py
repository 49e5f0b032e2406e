"""Hostile exported-weights files: a clear error naming the problem, never weights that train wrongly.

The weights file (paper 5.2/5.3: E_t[w_i] of a run, retrained as static weights) is loaded by
``toolkit.weights_file.load_weights``; a file whose tasks do not match the new run is refused by
:class:`toolkit.balancers.StaticWeights` when it binds to the run's tasks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradnorm.toolkit import weights_file
from gradnorm.toolkit.balancers import StaticWeights

VALID = {
    "format": "gradnorm-weights",
    "version": 1,
    "weights": {"a": 0.5, "b": 1.5},
    "run": "r",
    "window": [10, 100],
    "method": "gradnorm",
    "convergence": 0.01,
}


def write(tmp_path, payload, raw: bool = False):
    path = tmp_path / "weights.json"
    path.write_text(payload if raw else json.dumps(payload), encoding="utf-8")
    return path


def with_weights(**weights):
    payload = dict(VALID)
    payload["weights"] = weights
    return payload


def test_a_valid_file_loads_exactly(tmp_path):
    assert weights_file.load_weights(write(tmp_path, VALID)) == {"a": 0.5, "b": 1.5}


@pytest.mark.parametrize(
    "payload, named",
    [
        (with_weights(a=0.5, b=-1.0), ["'b'", "-1"]),
        (with_weights(a=0.0, b=2.0), ["'a'", "0"]),
        (with_weights(a=float("nan"), b=2.0), ["'a'", "nan"]),
        (with_weights(a=1.0, b=float("inf")), ["'b'", "inf"]),
        (with_weights(a="1.0", b=1.0), ["'a'"]),
        (with_weights(a=None, b=1.0), ["'a'"]),
        (with_weights(a=True, b=1.0), ["'a'"]),
    ],
)
def test_bad_weight_values_name_the_task(tmp_path, payload, named):
    with pytest.raises(ValueError) as info:
        weights_file.load_weights(write(tmp_path, payload))
    message = str(info.value).lower()
    for part in named:
        assert part.lower() in message, (part, message)


@pytest.mark.parametrize(
    "payload",
    [
        "{not json",
        "",
        "[1, 2]",
        json.dumps({**VALID, "format": "something-else"}),
        json.dumps({k: v for k, v in VALID.items() if k != "weights"}),
        json.dumps({**VALID, "weights": [0.5, 1.5]}),
        json.dumps({**VALID, "weights": {}}),
        json.dumps({**VALID, "version": 99}),
        json.dumps({**VALID, "extra": 3}),
    ],
)
def test_malformed_files_are_refused_with_the_path(tmp_path, payload):
    path = write(tmp_path, payload, raw=True)
    with pytest.raises(ValueError) as info:
        weights_file.load_weights(path)
    assert str(path) in str(info.value) or path.name in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere.json"):
        weights_file.load_weights(tmp_path / "nowhere.json")


def test_weights_for_other_tasks_are_refused_when_retraining(tmp_path):
    weights = weights_file.load_weights(write(tmp_path, with_weights(a=0.5, z=1.5)))
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\], missing tasks \['b'\]"):
        StaticWeights(weights).bind(["a", "b"], torch.device("cpu"))
    bound = StaticWeights(weights_file.load_weights(write(tmp_path, VALID)))
    bound.bind(["b", "a"], torch.device("cpu"))
    assert bound.weights().tolist() == [1.5, 0.5]  # by name, not by position
    assert all(math.isfinite(w) for w in bound.weights().tolist())
