"""``rlhf`` with its training held once the first checkpoint is written: for a test that SIGKILLs a run
mid-stage and must never see the stage finish first.

The training thread waits (until the process is killed) right after ``save_checkpoint`` returns; the
checkpoint uploader keeps running in its own thread, so the checkpoint still reaches the tracking
server. Without the hold, a loaded machine could finish the whole stage between the upload being
recorded and the test's kill (seen in a suite run). Usage: ``python tests/hold_after_first_checkpoint.py
run SPEC --home HOME``.
"""

from __future__ import annotations

import sys
import threading

from rlhf_core.training.engine import loop

_save_checkpoint = loop.save_checkpoint


def _save_then_hold(*args, **kwargs):
    path = _save_checkpoint(*args, **kwargs)
    threading.Event().wait()  # never set: the test kills this process
    return path


if __name__ == "__main__":
    loop.save_checkpoint = _save_then_hold
    from cli.app import main

    sys.argv[0] = "rlhf"
    main()
