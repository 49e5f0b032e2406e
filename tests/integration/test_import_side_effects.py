"""Importing gradnorm changes nothing in the process; the recorder's exit handling lives only while a run is open.

Each check runs in a fresh interpreter: a module imported once in the test process stays imported, so an
in-process check would see nothing the second time. The third-party libraries are imported before the
baseline is taken, because they register exit handlers of their own (torch, numpy, pyarrow) that are not
ours to judge; what is measured is what importing and touching ``gradnorm`` adds on top.

``atexit._ncallbacks()`` counts the interpreter's slots for exit handlers: importing must not take one. It
does not go down when a handler is unregistered (CPython empties the slot and keeps it), so the handlers
still registered after a run closes are counted by wrapping ``atexit.register`` and ``atexit.unregister``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BASELINE = """
import atexit, json, sys, threading
import numpy, pyarrow, pyarrow.parquet, torch

live_handlers = []
_register, _unregister = atexit.register, atexit.unregister

def register(func, *args, **kwargs):
    live_handlers.append(func)
    return _register(func, *args, **kwargs)

def unregister(func):
    live_handlers[:] = [f for f in live_handlers if f != func]
    return _unregister(func)

atexit.register, atexit.unregister = register, unregister

def state():
    return {"excepthook": sys.excepthook, "atexit": len(live_handlers), "atexit_slots": atexit._ncallbacks(), "threads": threading.active_count()}

def changes(before, after, ignore=("atexit_slots",)):
    return {key: [repr(before[key]), repr(after[key])] for key in before if key not in ignore and before[key] is not after[key] and before[key] != after[key]}
"""


def _run(body: str, *args: str) -> dict:
    code = BASELINE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_and_touching_the_public_api_installs_nothing():
    result = _run(
        """
        before = state()
        loaded_before = {name.split(".")[0] for name in sys.modules}
        import gradnorm
        import gradnorm.toolkit.schema
        import gradnorm.toolkit.recorder
        import gradnorm.hooks
        import gradnorm.hooks.session
        gradnorm.attach, gradnorm.Session, gradnorm.GradNorm
        after = state()
        new_packages = sorted({name.split(".")[0] for name in sys.modules} - loaded_before)
        print(json.dumps({"changes": changes(before, after, ignore=()), "new_packages": new_packages}))
        """
    )
    assert result["changes"] == {}
    # Nothing outside gradnorm was imported after the baseline, so no third-party handler could hide in it.
    assert result["new_packages"] == ["gradnorm"]


def test_the_command_line_parser_does_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, gradnorm.cli; gradnorm.cli.build_parser(); print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_schema_the_app_reads_does_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, gradnorm, gradnorm.toolkit.schema; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_session_installs_the_exit_handling_while_its_run_is_open_and_removes_it_at_close(tmp_path):
    result = _run(
        """
        from torch import nn
        import gradnorm
        from gradnorm.toolkit import runs
        before = state()
        torch.manual_seed(0)
        trunk, heads = nn.Linear(4, 6), nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
        session = gradnorm.attach(trunk, gradnorm.GradNorm(alpha=0.5), runs_root=sys.argv[1], run_name="r", heads=list(heads))
        attached = changes(before, state(), ignore=())  # no run is open before the first step
        for _ in range(3):
            h = trunk(torch.randn(8, 4))
            session.loss({"a": heads[0](h).pow(2).mean() + 1, "b": heads[1](h).pow(2).mean() + 1}).backward()
        during = state()
        session.close()
        after = state()
        print(json.dumps({
            "attached": attached,
            "hook_replaced_during": during["excepthook"] is not before["excepthook"],
            "atexit_added_during": during["atexit"] - before["atexit"],
            "threads_added_during": during["threads"] - before["threads"],
            "after": changes(before, after),
            "status": runs.read_run_json(sys.argv[1] + "/r")["status"],
        }))
        """,
        str(tmp_path),
    )
    assert result["attached"] == {}
    assert result["hook_replaced_during"] and result["atexit_added_during"] == 1 and result["threads_added_during"] == 1
    assert result["after"] == {}
    assert result["status"] == "finished"


def test_the_exit_handling_stays_until_the_last_of_several_runs_closes_and_keeps_a_hook_set_after_it(tmp_path):
    result = _run(
        """
        from gradnorm.toolkit import runs
        from gradnorm.toolkit.recorder import Recorder
        before = state()
        first = Recorder(runs.create_run(sys.argv[1], "one", {"tasks": ["a", "b"]}), ["a", "b"])
        ours = sys.excepthook
        second = Recorder(runs.create_run(sys.argv[1], "two", {"tasks": ["a", "b"]}), ["a", "b"])
        two_open = state()
        first.close()
        one_open = state()
        second.close()
        none_open = changes(before, state())

        # A hook set by someone else while a run is open is theirs: closing the run leaves it in place.
        third = Recorder(runs.create_run(sys.argv[1], "three", {"tasks": ["a", "b"]}), ["a", "b"])
        def users_hook(kind, value, traceback):
            pass
        sys.excepthook = users_hook
        third.close()
        kept = sys.excepthook is users_hook
        print(json.dumps({
            "one_handler_for_two_runs": two_open["atexit"] - before["atexit"],
            "hook_wrapped_once": two_open["excepthook"] is ours,
            "still_installed_with_one_open": one_open["atexit"] - before["atexit"] == 1 and one_open["excepthook"] is ours,
            "none_open": none_open,
            "users_hook_kept": kept,
            "atexit_after_third": len(live_handlers) - before["atexit"],
        }))
        """,
        str(tmp_path),
    )
    assert result["one_handler_for_two_runs"] == 1 and result["hook_wrapped_once"]
    assert result["still_installed_with_one_open"]
    assert result["none_open"] == {}
    assert result["users_hook_kept"] and result["atexit_after_third"] == 0


UNCAUGHT_AFTER_REOPEN = r"""
import sys
from gradnorm.toolkit import runs
from gradnorm.toolkit.recorder import Recorder
# A run opened and closed before: the exit handling was installed and removed once already.
Recorder(runs.create_run(sys.argv[1], "earlier", {"tasks": ["a", "b"]}), ["a", "b"]).close()
left_open = Recorder(runs.create_run(sys.argv[1], "left-open", {"tasks": ["a", "b"]}), ["a", "b"])
raise KeyError("dies with the run open")
"""


def test_a_run_left_open_is_still_marked_failed_by_an_uncaught_exception_after_an_earlier_run_closed(tmp_path):
    from gradnorm.toolkit import runs

    done = subprocess.run([sys.executable, "-c", UNCAUGHT_AFTER_REOPEN, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "KeyError" in done.stderr
    assert done.stderr.count("Traceback") == 1  # the previous hook still prints it, once
    assert runs.read_run_json(tmp_path / "earlier")["status"] == runs.FINISHED
    assert runs.read_run_json(tmp_path / "left-open")["status"] == runs.FAILED
