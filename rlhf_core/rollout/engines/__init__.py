"""Rollout engines: what decodes the completions of every generating stage.

``native`` is the project's KV-cached loop over the model's forward (in-process, the reference);
``vllm`` is a vLLM server in its own Python environment, started and stopped by the stage, fed the
policy's current weights after each update (:mod:`.vllm_engine`). Both answer the same call:
:class:`~rlhf_core.rollout.engines.base.RolloutEngine`.
"""
