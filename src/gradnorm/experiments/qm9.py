"""QM9: the 11-target molecular regression of the multitask papers (Navon et al. 2022; Liu et al. 2023), on a
subset that trains on a CPU in seconds per method.

Data: the ``qm9pack`` package (``pip install "gradnorm-toolkit[qm9]"``, about 230 MB installed) ships QM9's
130,831 molecules (Ramakrishnan et al. 2014) as CSV files; nothing is downloaded at run time. The package's
own ``import qm9pack`` needs ``pkg_resources`` (gone from recent setuptools), so the CSV files are read
directly from its folder.

Targets: the 11 of Nash-MTL's and FAMO's QM9 experiments (PyTorch Geometric's targets 0, 1, 2, 3, 5, 6, 12,
13, 14, 15, 11): dipole moment mu (D), isotropic polarisability alpha (bohr^3), HOMO and LUMO energies (eV),
electronic spatial extent R^2 (bohr^2), ZPVE (eV), the atomisation energies U0, U, H, G (eV: the total
energy minus the B3LYP energies of the free atoms, QM9's atomref table) and the heat capacity cv (cal/mol K).
Each target is standardised with the training subset's mean and standard deviation, as the papers do
(``--scale-y``; without it FAMO's script gives Delta_m about 110); losses are MSE on standardised targets,
and test errors are MAE in the original units.

Model (a choice for these CPUs, not the papers' message-passing network): a fixed descriptor per molecule,
the sorted eigenvalues of its Coulomb matrix (Rupp et al. 2012; C_ii = Z_i^2.4 / 2, C_ij = Z_i Z_j / |R_i - R_j|
in angstrom, 29 values, zero-padded) and its counts of H, C, N, O and F atoms, standardised; an MLP trunk
34 -> 256 -> 128 (ReLU) whose last Linear is the balancers' shared layer W, and 11 heads 128 -> 32 -> 1.

Subset: a fixed random sample of the molecules (the same for every seed and method): ``train_size`` for
training (default 20,000), 2,000 for validation and ``test_size`` for the test (default 5,000). The seed
chooses the network's initialisation and the batch order.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

HARTREE_EV = 27.211386246

#: Task names and units, in the papers' order.
TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u298", "h298", "g298", "cv")
UNITS = {
    "mu": "D",
    "alpha": "bohr^3",
    "homo": "eV",
    "lumo": "eV",
    "r2": "bohr^2",
    "zpve": "eV",
    "u0": "eV",
    "u298": "eV",
    "h298": "eV",
    "g298": "eV",
    "cv": "cal/mol K",
}
ELEMENTS = ("H", "C", "N", "O", "F")
CHARGES = {"H": 1.0, "C": 6.0, "N": 7.0, "O": 8.0, "F": 9.0}
#: B3LYP/6-31G(2df,p) energies of the free atoms (hartree), QM9's atomref: U0, U(298.15 K), H, G.
ATOMREF = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
ENERGY_COLUMNS = ("InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au")
COLUMNS = (
    "Elements",
    "XYZ_Ang",
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "R2_bohr2",
    "ZPVE_au",
    *ENERGY_COLUMNS,
    "Heatcapacity_Cv_cal_mol_K",
)
PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
MAX_ATOMS = 29
NUM_MOLECULES = 130_831
VAL_SIZE = 2_000
SUBSET_SEED = 12345
HIDDEN = 256
REPRESENTATION = 128
HEAD_HIDDEN = 32
INSTALL_HINT = 'pip install "gradnorm-toolkit[qm9]" (the qm9pack package, about 100 MB to download)'


def data_folder() -> Path:
    """qm9pack's data folder, found without importing the package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the QM9 problem needs the qm9pack package: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [part for part in PARTS if not (folder / part).is_file()]
    if missing:
        raise FileNotFoundError(f"qm9pack at {folder.parent} lacks its data files {missing}; reinstall it: {INSTALL_HINT}")
    return folder


def read_molecules(rows: Optional[int] = None) -> Any:
    """The QM9 table (pandas), the columns this problem reads; ``rows``: only the first rows of part 1."""
    import pandas as pd

    folder = data_folder()
    if rows is not None:
        return pd.read_csv(folder / PARTS[0], usecols=list(COLUMNS), nrows=rows)
    return pd.concat([pd.read_csv(folder / part, usecols=list(COLUMNS)) for part in PARTS], ignore_index=True)


def parse_elements(text: str) -> list[str]:
    elements = ast.literal_eval(text)
    unknown = sorted(set(elements) - set(CHARGES))
    if unknown:
        raise ValueError(f"QM9 molecule with elements {unknown} outside {list(ELEMENTS)}")
    return list(elements)


def parse_positions(text: str, count: int, row: int) -> np.ndarray:
    """[[x, y, z], ...] in angstrom; QM9 writes numbers as "0." and some exponents the Mathematica way (1.2*^-5)."""
    values = [float(v) for v in text.replace("*^", "e").replace("[", " ").replace("]", " ").split(",") if v.strip()]
    if len(values) != 3 * count:
        raise ValueError(f"QM9 row {row}: {count} elements but {len(values)} coordinates")
    return np.asarray(values, dtype=np.float64).reshape(count, 3)


def coulomb_eigenvalues(charges: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Sorted (descending) eigenvalues of the Coulomb matrix (Rupp et al. 2012), zero-padded to MAX_ATOMS."""
    count = len(charges)
    distance = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    np.fill_diagonal(distance, 1.0)
    matrix = np.outer(charges, charges) / distance
    np.fill_diagonal(matrix, 0.5 * charges**2.4)
    values = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    out = np.zeros(MAX_ATOMS)
    out[:count] = values
    return out


def features_and_targets(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, 34) descriptors and (N, 11) targets in the units of :data:`UNITS` for rows of the QM9 table."""
    features = np.zeros((len(frame), MAX_ATOMS + len(ELEMENTS)))
    targets = np.zeros((len(frame), len(TASKS)))
    for row, (elements_text, xyz_text) in enumerate(zip(frame["Elements"], frame["XYZ_Ang"])):
        elements = parse_elements(elements_text)
        positions = parse_positions(xyz_text, len(elements), row)
        charges = np.array([CHARGES[e] for e in elements])
        features[row, :MAX_ATOMS] = coulomb_eigenvalues(charges, positions)
        features[row, MAX_ATOMS:] = [elements.count(e) for e in ELEMENTS]
    counts = features[:, MAX_ATOMS:]
    reference = counts @ np.array([ATOMREF[e] for e in ELEMENTS])  # (N, 4): the free atoms' energies
    targets[:, 6:10] = (frame[list(ENERGY_COLUMNS)].to_numpy(dtype=np.float64) - reference) * HARTREE_EV
    targets[:, 0] = frame["Dipole_debye"].to_numpy()
    targets[:, 1] = frame["Polarizability_bohr3"].to_numpy()
    targets[:, 2] = frame["HOMO_au"].to_numpy() * HARTREE_EV
    targets[:, 3] = frame["LUMO_au"].to_numpy() * HARTREE_EV
    targets[:, 4] = frame["R2_bohr2"].to_numpy()
    targets[:, 5] = frame["ZPVE_au"].to_numpy() * HARTREE_EV
    targets[:, 10] = frame["Heatcapacity_Cv_cal_mol_K"].to_numpy()
    return features, targets


@dataclass
class QM9Data:
    """Standardised descriptors and targets of the subset; ``target_mean``/``target_std`` undo the scaling."""

    x_train: Tensor
    x_val: Tensor
    x_test: Tensor
    y_train: Tensor  # standardised, (N, 11)
    y_val: Tensor
    y_test: Tensor
    target_mean: Tensor
    target_std: Tensor
    seed: int

    def with_seed(self, seed: int) -> QM9Data:
        """The same subset for another seed (the seed fixes initialisation and batch order)."""
        return QM9Data(self.x_train, self.x_val, self.x_test, self.y_train, self.y_val, self.y_test, self.target_mean, self.target_std, seed)


def cache_path(train_size: int, test_size: int) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradnorm"
    key = hashlib.sha256(f"{train_size}-{VAL_SIZE}-{test_size}-{SUBSET_SEED}-v1".encode()).hexdigest()[:12]
    return root / f"qm9-{train_size}-{test_size}-{key}.npz"


def load_arrays(train_size: int, test_size: int, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and targets of the fixed subset (train, then validation, then test rows), cached on disk."""
    path = cache_path(train_size, test_size)
    if cache and path.is_file():
        with np.load(path) as stored:
            return stored["features"], stored["targets"]
    frame = read_molecules()
    order = np.random.default_rng(SUBSET_SEED).permutation(len(frame))[: train_size + VAL_SIZE + test_size]
    features, targets = features_and_targets(frame.iloc[order].reset_index(drop=True))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, features=features, targets=targets)
        temporary.replace(path)
    return features, targets


def load_qm9(seed: int = 0, train_size: int = 20_000, test_size: int = 5_000, cache: bool = True) -> QM9Data:
    """The subset, with descriptors and targets standardised by the training rows' statistics."""
    if train_size < 2 or test_size < 1:
        raise ValueError(f"QM9 subset: train_size must be >= 2 and test_size >= 1, got {train_size} and {test_size}")
    if train_size + VAL_SIZE + test_size > NUM_MOLECULES:
        raise ValueError(f"QM9 subset of {train_size} + {VAL_SIZE} + {test_size} molecules exceeds the {NUM_MOLECULES} in QM9")
    features, targets = load_arrays(train_size, test_size, cache)
    return split(features, targets, train_size, seed)


def split(features: np.ndarray, targets: np.ndarray, train_size: int, seed: int) -> QM9Data:
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(targets, dtype=torch.float32)
    train, val, test = slice(0, train_size), slice(train_size, train_size + VAL_SIZE), slice(train_size + VAL_SIZE, None)
    x_mean, x_std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    y_mean, y_std = y[train].mean(0), y[train].std(0)
    if bool((y_std <= 0).any()):
        raise ValueError(f"QM9 subset: targets {[t for t, s in zip(TASKS, y_std.tolist()) if s <= 0]} are constant on the training rows")
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std
    return QM9Data(xs[train], xs[val], xs[test], ys[train], ys[val], ys[test], y_mean, y_std, seed)


class QM9Net(nn.Module):
    """MLP trunk over the descriptor, one small head per target; ``shared_layer`` is the trunk's last Linear."""

    def __init__(self, in_features: int = MAX_ATOMS + len(ELEMENTS)) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, REPRESENTATION), nn.ReLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(REPRESENTATION, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, 1)) for _ in TASKS)

    @property
    def shared_layer(self) -> nn.Linear:
        layer = self.trunk[2]
        assert isinstance(layer, nn.Linear)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def make_model(data: QM9Data) -> QM9Net:
    torch.manual_seed(data.seed + 1)
    return QM9Net(data.x_train.shape[1])


def task_losses(predictions: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """MSE per target on standardised targets (Nash-MTL's QM9 loss)."""
    return {task: F.mse_loss(predictions[:, i], targets[:, i]) for i, task in enumerate(TASKS)}


def evaluate(model: QM9Net, x: Tensor, y: Tensor, data: QM9Data) -> tuple[Tensor, dict[str, float]]:
    """(per-task MSE on standardised targets (T,), per-task MAE in the original units)."""
    with torch.no_grad():
        predictions = model(x)
        mse = ((predictions - y) ** 2).mean(0)
        mae = ((predictions - y).abs().mean(0) * data.target_std).tolist()
    return mse, dict(zip(TASKS, mae))


def delta_m(errors: dict[str, float], baseline: dict[str, float], tasks: Sequence[str] = TASKS) -> float:
    """Delta_m% (Maninis et al. 2019): mean over tasks of (M_i - M_i,baseline) / M_i,baseline x 100; lower is better."""
    return 100.0 * float(np.mean([(errors[t] - baseline[t]) / baseline[t] for t in tasks]))
