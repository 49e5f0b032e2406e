"""The suite's own rule against timing-dependent verdicts: no Hypothesis test runs under a deadline.

A deadline that a loaded CI machine exceeds on the first run of an example but not on its replay makes
Hypothesis fail the test as flaky (seen: test_part_files' compaction property, 595 ms against the default
200 ms on one shared core, 3 ms on replay). The profiles in tests/conftest.py set none; this keeps a test
from bringing one back.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parents[1]
#: ``deadline=`` as a keyword argument (settings(...), register_profile(...)) with any value but None; a local
#: ``deadline = time.monotonic() + ...`` of a polling loop is formatted with spaces and does not match.
DEADLINE = re.compile(r"(?:^|[(,])\s*deadline=(?!None\b)")


def test_the_loaded_hypothesis_profile_has_no_deadline_and_no_too_slow_check():
    assert settings.default.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check


def test_no_test_sets_a_hypothesis_deadline():
    found = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if DEADLINE.search(line)
    ]
    assert found == [], "a Hypothesis deadline makes the verdict depend on the machine's load:\n" + "\n".join(found)
