"""Test-wide settings.

Hypothesis runs derandomised by default, so the suite gives the same verdict on every machine and CI run;
``HYPOTHESIS_PROFILE=explore`` draws fresh random examples, many more of them, to hunt for new failures
(a failure found that way becomes an explicit ``@example``).

Neither profile has a deadline or the too-slow health check: no test here is about how long one example
takes, and on a loaded CI machine an example that exceeds a deadline once and not on its replay makes
Hypothesis report the test as flaky. A test that must not hang bounds its call itself (test_fuzz_runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

UNTIMED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", derandomize=True, print_blob=True, **UNTIMED)
settings.register_profile("explore", derandomize=False, max_examples=2000, print_blob=True, **UNTIMED)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel and installed (non-editable) into its own folder, once per test session."""
    from tests.helpers.packaging import build_wheel, install_wheel

    workdir = tmp_path_factory.mktemp("wheel")
    return install_wheel(build_wheel(workdir), workdir / "site")


def pytest_configure(config: pytest.Config) -> None:
    # The suite's models are tiny (the toy's 100 x 100 layers and smaller): a second intra-op thread buys
    # nothing and, on a shared 2-core machine, makes every small operation wait for a busy core.
    import torch

    torch.set_num_threads(1)
