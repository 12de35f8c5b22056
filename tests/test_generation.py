"""The native decoding loop against ``model.generate``, and the nucleus-sampling rule."""

from __future__ import annotations

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.modeling.models import build_tiny_model
from rlhf_core.rollout.generation import chat_prompt, decode_batch, generate, pick_tokens
from rlhf_core.spec import TinyModelSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return build_tiny_model(TinyModelSource(hidden_size=64, layers=2, heads=4, vocab_size=512), seed=3)


def _prompts(k: int) -> list[str]:
    # different lengths, so batches are left-padded and rows are retired at different steps
    rows = synthetic_records("arithmetic", "prompts", n=k, seed=5)
    return [r["prompt"] + " Explain." * (i % 3) for i, r in enumerate(rows)]


def test_greedy_native_equals_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(10)
    kwargs = {"max_new_tokens": 12, "temperature": 0.0, "batch_size": 4}
    native = generate(model, tokenizer, prompts, engine="native", **kwargs)
    reference = generate(model, tokenizer, prompts, engine="transformers", **kwargs)
    assert native.texts == reference.texts
    assert native.new_tokens == reference.new_tokens


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(model_and_tokenizer):
    """Pick as "EOS" the token whose first appearance varies most across rows, so rows stop at
    different steps and the batch is compacted; every row must still decode exactly as it does alone."""
    model, tokenizer = model_and_tokenizer
    encoded = [
        tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in _prompts(12)
    ]
    greedy = decode_batch(model, encoded, 1, 16, 0.0, 1.0, -1, tokenizer.pad_token_id, torch.Generator())

    def stop_steps(token: int) -> set[int]:
        return {row.index(token) if token in row else 16 for row in greedy}

    stop = max({t for row in greedy for t in row}, key=lambda t: len(stop_steps(t)))
    together = decode_batch(model, encoded, 1, 16, 0.0, 1.0, stop, tokenizer.pad_token_id, torch.Generator())
    lengths = sorted({len(row) for row in together})
    assert len(lengths) > 2 and lengths[0] < 16  # rows really did stop at different steps
    for prompt, row in zip(encoded, together, strict=True):
        alone = decode_batch(
            model, [prompt], 1, 16, 0.0, 1.0, stop, tokenizer.pad_token_id, torch.Generator()
        )
        assert row == alone[0]
        assert stop not in row[:-1]  # nothing is kept after the stop token
        assert len(row) == 16 or row[-1] == stop


def test_samples_share_the_prefill_and_come_out_prompt_major(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(3)
    greedy = generate(model, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, batch_size=8)
    single = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert greedy.texts == [t for t in single.texts for _ in range(4)]

    sampled = generate(
        model, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, temperature=1.0, seed=7
    )
    again = generate(
        model, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, temperature=1.0, seed=7
    )
    assert sampled.texts == again.texts  # seeded
    assert len(set(sampled.texts[:4])) > 1  # the samples of one prompt differ


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20_000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = pick_tokens(logits, temperature=1.0, top_p=0.7, generator=generator)
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    # {0.5, 0.3} is the smallest set with mass >= 0.7, renormalised to 0.625 / 0.375
    assert counts[2:].sum() == 0
    assert counts[0].item() == pytest.approx(0.625, abs=0.015)
    full = torch.bincount(pick_tokens(logits, 1.0, 1.0, generator), minlength=4).float() / len(drawn)
    assert full.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.015)
    assert pick_tokens(logits[:2], 0.0, 1.0, generator).tolist() == [0, 0]


def test_native_engine_names_the_generation_config_settings_it_does_not_apply(model_and_tokenizer, caplog):
    import copy
    import logging

    model, tokenizer = model_and_tokenizer
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.2
    with caplog.at_level(logging.WARNING, logger="rlhf_core.rollout.generation"):
        generate(penalised, tokenizer, ["What is 1 + 1?"], max_new_tokens=2)
    assert "repetition_penalty=1.2" in caplog.text and "engine: transformers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_core.rollout.generation"):
        generate(model, tokenizer, ["What is 1 + 1?"], max_new_tokens=2)
    assert caplog.text == ""


@pytest.mark.parametrize("training", [True, False])
def test_generate_hands_the_model_back_in_the_mode_it_found_it_in(model_and_tokenizer, training):
    """An on-policy loop generates between optimizer steps: decoding must not switch dropout off for good."""
    model, tokenizer = model_and_tokenizer
    model.train(training)
    try:
        for engine in ("native", "transformers"):
            generate(model, tokenizer, ["What is 1 + 1?"], max_new_tokens=2, engine=engine)
            assert model.training is training
            assert all(module.training is training for module in model.modules())
    finally:
        model.eval()
