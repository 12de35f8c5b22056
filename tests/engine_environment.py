"""The vLLM engine environment for the tests that need it.

``make test`` installs it (``rlhf engine install vllm``); where it is missing the engine tests are skipped
with the reason, unless ``RLHF_REQUIRE_VLLM=1`` (set by CI), where a missing engine fails them: a CI run
must never pass by skipping the engine.
"""

from __future__ import annotations

import os

import pytest

from rlhf_core.rollout.engines.vllm_environment import vllm_python


def require_vllm() -> None:
    """Skip (or, with RLHF_REQUIRE_VLLM=1, fail) the calling test when no engine environment exists."""
    if vllm_python() is not None:
        return
    reason = "the vLLM engine environment is not installed (`rlhf engine install vllm`, or RLHF_VLLM_PYTHON)"
    if os.environ.get("RLHF_REQUIRE_VLLM") == "1":
        pytest.fail(reason + " and RLHF_REQUIRE_VLLM=1")
    pytest.skip(reason)


# the engine's settings in tests: fp32 (equality with the native loop), no compilation (starts in ~20 s
# instead of ~45 s), one compute thread (the CI machine has two cores)
TEST_VLLM = {"dtype": "float32", "enforce_eager": True, "cpu_threads": 1, "max_model_len": 256}
