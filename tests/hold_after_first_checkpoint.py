"""``rlhf`` with its training held once the first checkpoint is written: for a test that SIGKILLs a run
mid-stage and must never see the stage finish first.

The training thread waits (until the process is killed) right after ``save_checkpoint`` returns; the
checkpoint uploader keeps running in its own thread, so the checkpoint still reaches the tracking
server. Without the hold, a loaded machine could finish the whole stage between the upload being
recorded and the test's kill (seen in a suite run). Usage: ``python tests/hold_after_first_checkpoint.py
run SPEC --home HOME``.

``HOLD_AFTER_FIRST_CHECKPOINT_OF=<stage>`` holds only that stage (its checkpoint directory is
``work/<stage>-<fingerprint>/checkpoints``); the stages before it run through. For training that runs in
other processes (the ranks of ``compute.processes``), ``write_sitecustomize(folder)`` writes a
``sitecustomize.py`` that installs the hold in every Python process started with ``folder`` on its
``PYTHONPATH`` and the variable set: each rank holds after its own ``save_checkpoint`` returned.

``HOLD_AFTER_FIRST_CHECKPOINT_ARM=<file>`` holds only the first process to save a checkpoint while
``file`` exists: it takes the file (a rename, which only one process can win) before it saves, so a
test that sees the checkpoint also sees the file gone, and a later attempt of the same stage (the
resumed run) trains through. Either variable installs the hold through ``write_sitecustomize``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
from pathlib import Path

LOOP = "rlhf_core.training.engine.loop"
STAGE_VARIABLE = "HOLD_AFTER_FIRST_CHECKPOINT_OF"
ARM_VARIABLE = "HOLD_AFTER_FIRST_CHECKPOINT_ARM"


def _held_stage(directory) -> bool:
    stage = os.environ.get(STAGE_VARIABLE)
    return not stage or Path(directory).parent.name.startswith(f"{stage}-")


def _took_the_arm() -> bool:
    """True without an arm file named; else whether this process took it (renamed it away) first."""
    arm = os.environ.get(ARM_VARIABLE)
    if not arm:
        return True
    try:
        os.rename(arm, arm + ".taken")
    except FileNotFoundError:
        return False
    return True


def install(loop) -> None:
    """Replace ``loop.save_checkpoint`` by one that never returns after a checkpoint of the held stage."""
    save_checkpoint = loop.save_checkpoint

    def save_then_hold(accelerator, directory, *args, **kwargs):
        hold = _held_stage(directory) and _took_the_arm()
        path = save_checkpoint(accelerator, directory, *args, **kwargs)
        if hold:
            threading.Event().wait()  # never set: the test kills this process
        return path

    loop.save_checkpoint = save_then_hold


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Installs the hold once the training loop's module is imported (not before: most processes that
    start with the variable set, the launcher and the CLI, never train)."""

    def find_spec(self, name, path, target=None):
        if name != LOOP:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            install(module)

        spec.loader.exec_module = exec_module
        return spec


def install_on_import() -> None:
    sys.meta_path.insert(0, _InstallOnImport())


def write_sitecustomize(folder: Path) -> Path:
    """A ``sitecustomize.py`` in ``folder`` that installs the hold on import of the training loop in a
    process with ``STAGE_VARIABLE`` or ``ARM_VARIABLE`` set; put ``folder`` first on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({STAGE_VARIABLE!r}) or os.environ.get({ARM_VARIABLE!r}):\n"
        f"    sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "    import hold_after_first_checkpoint\n"
        "    sys.path.pop(0)\n"
        "    hold_after_first_checkpoint.install_on_import()\n"
    )
    return folder


if __name__ == "__main__":
    from rlhf_core.training.engine import loop

    install(loop)
    from cli.app import main

    sys.argv[0] = "rlhf"
    main()
