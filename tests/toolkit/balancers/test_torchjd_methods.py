"""The TorchJD methods as balancers: each effective weight vector is checked against its paper's defining
property by a computation of our own (not TorchJD's), and the session trains on, and records, exactly
those weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

pytest.importorskip("torchjd", reason="the TorchJD methods need the 'methods' extra (pip install -e '.[methods]')")

from gradnorm import hooks  # noqa: E402
from gradnorm.toolkit.balancers import TorchJDWeighting  # noqa: E402
from gradnorm.toolkit.balancers.torchjd_methods import METHODS  # noqa: E402
from tests.helpers.models import TinyNet, batch, task_losses  # noqa: E402
from tests.toolkit.balancers.test_state_dict import bound, drive, round_trip  # noqa: E402

CPU = torch.device("cpu")


def solver_available(method: str) -> bool:
    try:
        TorchJDWeighting(method)
    except ImportError:
        return False
    return True


def requires(method: str):
    return pytest.mark.skipif(not solver_available(method), reason=f"{method}: TorchJD's solver is not installed (pip install -e '.[methods]')")


def weights_for(method: str, grads: np.ndarray, **options) -> np.ndarray:
    balancer = TorchJDWeighting(method, **options)
    balancer.bind([f"t{i}" for i in range(len(grads))], CPU, torch.float64)
    losses = torch.ones(len(grads), dtype=torch.float64)
    return balancer.step_weights(losses, None, torch.tensor(grads)).numpy()


def conflicting(seed: int, tasks: int = 3, dim: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(tasks, dim)) * rng.uniform(0.2, 5.0, size=(tasks, 1))
    grads[1] = -0.6 * grads[0] + 0.3 * rng.normal(size=dim)  # a real conflict between tasks 0 and 1
    return grads


@requires("imtl-g")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtl_g_equal_projections_on_unit_gradients(seed):
    """IMTL-G (Liu et al. 2021, section 3.2): d . g_i / ||g_i|| is the same for every task."""
    grads = conflicting(seed)
    d = weights_for("imtl-g", grads) @ grads
    projections = grads @ d / np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(projections, projections.mean(), rtol=1e-6)
    assert projections.mean() > 0


@requires("cagrad")
@pytest.mark.parametrize("seed", [0, 1])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(seed):
    """CAGrad (Liu et al. 2021, eq. 4): d maximises min_i g_i . d over ||d - g0|| <= c ||g0||; no point of the
    ball we sample does better (per unit length: TorchJD's weights fix d's direction), and the worst task gains
    more than under the mean gradient."""
    c = 0.4
    grads = conflicting(seed)
    g0 = grads.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    d = weights_for("cagrad", grads, c=c) @ grads
    # TorchJD's weights are those of d up to a positive scale (its Gram matrix is normalised): compare directions
    # by rescaling d onto the ball's farthest point along it from g0.
    best = (grads @ d).min() / np.linalg.norm(d)
    rng = np.random.default_rng(seed + 10)
    directions = rng.normal(size=(20000, grads.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    samples = g0 + radius * directions * rng.uniform(0, 1, size=(20000, 1)) ** (1 / grads.shape[1])
    sampled = ((samples @ grads.T).min(axis=1) / np.linalg.norm(samples, axis=1)).max()
    assert best >= sampled - 1e-3
    assert (grads @ d).min() > (grads @ g0).min()  # better for the worst task than the mean gradient


@requires("upgrad")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upgrad_never_conflicts_and_is_the_mean_without_conflict(seed):
    """UPGrad (Quinton and Rey 2024): d . g_i >= 0 for every task; gradients already in the dual cone are averaged."""
    grads = conflicting(seed)
    d = weights_for("upgrad", grads) @ grads
    assert (grads @ d).min() >= -1e-8 * np.abs(grads @ d).max()
    aligned = np.abs(conflicting(seed)) + 0.1  # all pairwise products positive
    np.testing.assert_allclose(weights_for("upgrad", aligned), np.full(3, 1 / 3), atol=1e-6)


@requires("dualproj")
def test_dualproj_never_conflicts():
    grads = conflicting(4)
    d = weights_for("dualproj", grads) @ grads
    assert (grads @ d).min() >= -1e-8 * np.abs(grads @ d).max()


@requires("fairgrad")
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_solves_its_fairness_equation(alpha):
    """FairGrad (Ban and Ji 2024, eq. 4): G w = w^(-1/alpha), G the Gram matrix, w > 0."""
    grads = np.abs(conflicting(5)) + 0.2  # a well-posed system: positive Gram matrix
    w = weights_for("fairgrad", grads, alpha=alpha)
    gram = grads @ grads.T
    assert (w > 0).all()
    np.testing.assert_allclose(gram @ w, w ** (-1 / alpha), rtol=1e-4)


@requires("nash-mtl")
def test_nash_mtl_bargaining_solution():
    """Nash-MTL (Navon et al. 2022, eq. 2 and Algorithm 1): the bargaining solution has alpha_i (G alpha)_i = 1
    for every task, G the Gram matrix g_i . g_j; checked with the norm clipping off."""
    grads = np.abs(conflicting(6)) + 0.2
    alpha = weights_for("nash-mtl", grads, max_norm=0.0, optim_niter=100)
    gram = grads @ grads.T
    np.testing.assert_allclose(alpha * (gram @ alpha), np.ones(3), rtol=0.05)


@requires("aligned-mtl")
def test_aligned_mtl_orthogonal_gradients_get_the_smallest_singular_value():
    """Aligned-MTL (Senushkin et al. 2023): the aligned matrix is sigma_min U V^T; for orthogonal gradients
    that makes every task's contribution sigma_min times its unit gradient, combined with TorchJD's default
    preference vector (the mean, 1/T): w_i = min_j ||g_j|| / (T ||g_i||)."""
    norms = np.array([0.5, 2.0, 4.0])
    grads = np.eye(3, 5) * norms[:, None]
    np.testing.assert_allclose(weights_for("aligned-mtl", grads), norms.min() / norms / 3, rtol=1e-6)


def test_rlw_weights_are_a_softmax_of_standard_normals():
    """RLW (Lin et al. 2022, Algorithm 2): w = softmax(z), z ~ N(0, I): log(w_i / w_j) = z_i - z_j ~ N(0, 2),
    independent between steps; the draws come from the balancer's own seeded stream."""
    balancer = TorchJDWeighting("rlw", seed=3)
    balancer.bind(["a", "b", "c", "d"], CPU, torch.float64)
    assert balancer.task_gradients is None  # no gradient needed
    before = torch.get_rng_state()
    draws = np.stack([balancer.step_weights(torch.ones(4, dtype=torch.float64), None, None).numpy() for _ in range(4000)])
    assert torch.equal(torch.get_rng_state(), before)  # the training loop's random stream is untouched
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-12)
    log_ratio = np.log(draws[:, 0] / draws[:, 1])
    assert abs(log_ratio.mean()) < 4 * np.sqrt(2 / 4000)
    assert log_ratio.var() == pytest.approx(2.0, rel=0.1)
    assert abs(np.corrcoef(log_ratio[:-1], log_ratio[1:])[0, 1]) < 0.06
    again = TorchJDWeighting("rlw", seed=3)
    again.bind(["a", "b", "c", "d"], CPU, torch.float64)
    np.testing.assert_array_equal(again.step_weights(torch.ones(4, dtype=torch.float64), None, None).numpy(), draws[0])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rlw"])
def test_session_trains_on_and_records_torchjd_weights(method, tmp_path):
    """Through attach(): the loss is sum_i w_i L_i with TorchJD's weights of the autograd gradients at W, and
    the run's weight column holds those weights."""
    if not solver_available(method):
        pytest.skip(f"{method}: TorchJD's solver is not installed")
    aggregation = pytest.importorskip("torchjd.aggregation")
    model = TinyNet()
    x, y = batch()
    session = hooks.attach(model.shared, TorchJDWeighting(method), runs_root=tmp_path, run_name="run")
    losses = task_losses(model, x, y)
    grads = torch.stack([torch.autograd.grad(v, model.shared.weight, retain_graph=True)[0].flatten() for v in losses.values()]).double()
    total = session.loss(losses)
    applied = session.balancer.weights()
    if METHODS[method].stateful:
        assert torch.isfinite(applied).all()
    else:  # a fresh TorchJD weighting on our own autograd gradients gives the same weights
        spec = METHODS[method]
        weighting = getattr(aggregation, spec.weighting)(**spec.defaults)
        expected = weighting(grads if spec.reads == "matrix" else grads @ grads.T)
        torch.testing.assert_close(applied.double(), expected.double(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(total, (applied * torch.stack(list(losses.values()))).sum())
    total.backward()
    session.close()
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["balancer"]["recorded_weight"].startswith("effective")
    assert meta["balancer"]["source"] == f"torchjd.aggregation.{METHODS[method].weighting}"
    rows = ds.dataset(tmp_path / "run" / "metrics", format="parquet", partitioning="hive").to_table().to_pandas()
    rows = rows[rows.split == "train"].set_index("task").loc[list(losses)]
    np.testing.assert_allclose(rows["weight"].to_numpy(), applied.numpy(), rtol=1e-6)


def test_rlw_resumes_its_random_stream_and_stateful_methods_refuse_a_checkpoint():
    factory = lambda: TorchJDWeighting("rlw", seed=1)
    expected = drive(bound(factory), range(8), False)
    first = bound(factory)
    before = drive(first, range(4), False)
    resumed = factory()
    resumed.load_state_dict(round_trip(first.state_dict()))
    resumed.bind(["a", "b", "c"], CPU, torch.float64)
    after = drive(resumed, range(4, 8), False)
    assert all(torch.equal(g, e) for g, e in zip(before + after, expected))
    with pytest.raises(NotImplementedError, match="gradvac"):
        bound(lambda: TorchJDWeighting("gradvac")).state_dict()


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="'sgdr'"):
        TorchJDWeighting("sgdr")
    with pytest.raises(ValueError, match="space"):
        TorchJDWeighting("upgrad", space="all")
    balancer = TorchJDWeighting("imtl-g")
    balancer.bind(["a", "b"], CPU, torch.float64)
    with pytest.raises(RuntimeError, match="per-task gradients"):
        balancer.step_weights(torch.ones(2, dtype=torch.float64), None, None)


def test_torchjd_is_not_imported_with_the_toolkit():
    code = "import sys, gradnorm, gradnorm.toolkit.balancers; gradnorm.UPGrad; print('torchjd' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
