"""Serving a model behind an OpenAI-compatible HTTP API (``rlhf serve``).

``openai_server`` is the native server: the project's own decoding loop over a transformers model
loaded in-process, so a chat client or an LLM judge can talk to any registered version. Where the vLLM
engine environment is installed, ``rlhf serve`` starts vLLM's own OpenAI server instead
(``rlhf_core.rollout.engines.vllm_server``); both answer the same routes.
"""
