"""Dynamic weight averaging (Liu et al., 2019, eq. 7) on a hand-checked sequence."""

import math

import numpy as np
import pytest
import torch

from gradnorm.toolkit.balancers import DynamicWeightAverage

TASKS = ["a", "b"]


def run(balancer, sequence):
    balancer.bind(TASKS, torch.device("cpu"), torch.float64)
    applied = []
    for losses in sequence:
        applied.append(balancer.update(torch.tensor(losses, dtype=torch.float64)).weight.tolist())
    return applied


def test_per_step_weights_on_a_hand_checked_sequence():
    applied = run(DynamicWeightAverage(temperature=2.0), [[4.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    assert applied[0] == [1.0, 1.0] and applied[1] == [1.0, 1.0]
    # Step 2 uses r = L(1)/L(0) = (0.5, 1.0): w = 2 e^{r/2} / (e^{0.25} + e^{0.5}).
    e1, e2 = math.exp(0.25), math.exp(0.5)
    np.testing.assert_allclose(applied[2], [2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def test_windowed_weights_use_period_means():
    sequence = [[4.0, 1.0], [2.0, 1.0], [1.0, 1.0], [1.0, 3.0], [9.0, 9.0]]
    applied = run(DynamicWeightAverage(temperature=1.0, window=2), sequence)
    assert applied[:4] == [[1.0, 1.0]] * 4
    r = np.array([1.0 / 3.0, 2.0 / 1.0])  # period means (3, 1) then (1, 2)
    expected = 2 * np.exp(r) / np.exp(r).sum()
    np.testing.assert_allclose(applied[4], expected)


def test_negative_loss_and_bad_options():
    with pytest.raises(ValueError, match="'b'"):
        run(DynamicWeightAverage(), [[1.0, -1.0]])
    with pytest.raises(ValueError, match="temperature"):
        DynamicWeightAverage(temperature=0)
    with pytest.raises(ValueError, match="window"):
        DynamicWeightAverage(window=0)
