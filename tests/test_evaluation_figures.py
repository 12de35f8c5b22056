"""The evaluate stage's figures against hand computations: pass@k, KL to the reference, lengths, NLL."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.evaluation.evaluate import Reference, evaluate_model
from rlhf_core.evaluation.kl import kl_to_reference, sample_token_ids, sequence_log_ratios
from rlhf_core.evaluation.metrics import heldout_nll, length_metrics
from rlhf_core.evaluation.pass_at_k import pass_at_k_metrics
from rlhf_core.modeling.models import build_tiny_model, load_model, save_model
from rlhf_core.rollout.sampling import sample_completions
from rlhf_core.spec import EvaluateStage, TinyModelSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = synthetic_records("arithmetic", "prompts", n=6, seed=1, max_operand=9)
SFT = synthetic_records("arithmetic", "sft", n=5, seed=2, max_operand=9)
TINY = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny policy and a perturbed copy of it (same tokenizer, other weights), saved."""
    model, tokenizer = build_tiny_model(TINY, 0)
    root = tmp_path_factory.mktemp("models")
    policy = str(save_model(model, tokenizer, root / "policy"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy, str(save_model(model, tokenizer, root / "perturbed"))


def test_pass_at_k_averages_the_closed_form_over_prompts():
    """Prompt 1: n = 4, c = 2 -> pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1;
    prompt 2: c = 0 -> 0; prompt 3: c = 4 -> 1. Means: 1/2, 11/18, 2/3."""
    correct = [[True, False, False, True], [False] * 4, [True] * 4]
    metrics = pass_at_k_metrics(correct, [4, 1, 2], seed=0)
    assert metrics["eval/pass_at_1"] == pytest.approx(0.5)
    assert metrics["eval/pass_at_2"] == pytest.approx(11 / 18)
    assert metrics["eval/pass_at_4"] == pytest.approx(2 / 3)
    assert metrics["eval/pass_at_2_n"] == 3  # the interval resamples prompts
    assert metrics["eval/pass_at_2_ci_low"] <= 11 / 18 <= metrics["eval/pass_at_2_ci_high"]


def test_pass_at_k_in_the_report_is_the_closed_form_of_the_stages_own_samples(models, tmp_path):
    """The report's pass@k equals mean_i [1 - C(n - c_i, k) / C(n, k)] over the same seeded samples.

    The random model is never right, so a stand-in verifier accepts completions of even length: some
    prompts then have a few correct samples out of n = 6."""
    (tmp_path / "verifiers.py").write_text(  # a verifier of the user's own, named by reference
        "def even(completion, row):\n    return float(len(completion) % 2 == 0)\n"
    )
    stage = EvaluateStage(
        kind="evaluate", models=["m"], prompts="data.prompts", generation={"max_new_tokens": 4},
        pass_at_k={"n": 6, "k": [1, 3, 6], "generation": {"max_new_tokens": 4}},
        verifier=f"{tmp_path / 'verifiers.py'}:even",
    )  # fmt: skip
    metrics = evaluate_model(models[0], None, [], PROMPTS, stage, {}, seed=5, stage_name="ev").metrics
    model, tokenizer = load_model(models[0])
    rows, _, _ = sample_completions(model, tokenizer, PROMPTS, 6, stage.pass_at_k.generation, 5)
    counts = [sum(len(r["completion"]) % 2 == 0 for r in rows if r["prompt_index"] == i)
              for i in range(len(PROMPTS))]  # fmt: skip
    assert len(set(counts)) > 1 and 0 < sum(counts) < 36  # not a trivial case
    for k in (1, 3, 6):
        expected = sum(1 - math.comb(6 - c, k) / math.comb(6, k) for c in counts) / len(PROMPTS)
        assert metrics[f"eval/pass_at_{k}"] == pytest.approx(expected)
        assert metrics[f"eval/pass_at_{k}_n"] == len(PROMPTS)
    assert metrics["eval/pass_at_1"] < metrics["eval/pass_at_3"] <= metrics["eval/pass_at_6"]


def _explicit_log_ratio(policy, reference, prompt: list[int], completion: list[int]) -> float:
    """sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), one full forward pass per model."""
    ids = torch.tensor([prompt + completion])
    total = 0.0
    for model, sign in ((policy, 1.0), (reference, -1.0)):
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        total += sign * sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(completion))
    return total


def test_kl_log_ratios_equal_an_explicit_per_token_computation_and_zero_for_the_model_itself(models):
    policy, tokenizer = load_model(models[1])
    reference, _ = load_model(models[0])
    prompts = [p["prompt"] for p in PROMPTS[:3]]
    prompt_ids, completion_ids = sample_token_ids(
        policy, tokenizer, prompts, 2, max_new_tokens=5, batch_size=4, seed=0
    )
    groups = [i // 2 for i in range(6)]
    ratios = sequence_log_ratios(
        policy, reference, prompt_ids, completion_ids, groups, pad_token_id=tokenizer.pad_token_id,
        batch_size=4,
    )  # fmt: skip
    with torch.no_grad():
        pairs = zip(prompt_ids, completion_ids, strict=True)
        expected = [_explicit_log_ratio(policy, reference, p, c) for p, c in pairs]
    assert ratios == pytest.approx(expected, abs=1e-4)
    assert any(abs(r) > 0.01 for r in ratios)  # the perturbed model really differs
    itself = sequence_log_ratios(
        policy, policy, prompt_ids, completion_ids, groups, pad_token_id=tokenizer.pad_token_id
    )
    assert itself == pytest.approx([0.0] * 6, abs=1e-6)
    same = kl_to_reference(
        policy, policy, tokenizer, prompts, samples_per_prompt=2, max_new_tokens=5, batch_size=4, seed=0
    )
    assert (
        same["eval/kl_to_reference"] == pytest.approx(0.0, abs=1e-6) and same["eval/kl_to_reference_n"] == 3
    )


def test_kl_estimate_is_unbiased_on_samples_from_the_policy(models):
    """One generated token: the exact KL is sum_v pi(v) (log pi(v) - log pi_ref(v)) at the prompt's last
    position; the k1 mean over 1500 samples from pi lands within 4 standard errors of it."""
    policy, tokenizer = load_model(models[1])
    reference, _ = load_model(models[0])
    prompt = PROMPTS[0]["prompt"]
    prompt_ids, completion_ids = sample_token_ids(
        policy, tokenizer, [prompt], 1500, max_new_tokens=1, batch_size=1500, seed=0
    )
    ratios = sequence_log_ratios(
        policy, reference, prompt_ids, completion_ids, [0] * 1500, pad_token_id=tokenizer.pad_token_id,
        batch_size=1500,
    )  # fmt: skip
    with torch.no_grad():
        ids = torch.tensor([prompt_ids[0]])
        logp = torch.log_softmax(policy(input_ids=ids).logits[0, -1].double(), -1)
        logq = torch.log_softmax(reference(input_ids=ids).logits[0, -1].double(), -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    values = torch.tensor(ratios, dtype=torch.float64)
    assert exact > 0.05
    assert abs(float(values.mean()) - exact) < 4 * float(values.std()) / math.sqrt(1500)


def test_kl_in_the_report_and_a_reference_with_another_tokenizer_is_refused(models, tmp_path):
    stage = EvaluateStage(
        kind="evaluate", models=["m", "ref"], prompts="data.prompts", generation={"max_new_tokens": 3},
        baseline="ref", kl={"samples_per_prompt": 2, "max_new_tokens": 4},
    )  # fmt: skip
    reference = Reference("ref", *load_model(models[0]))
    metrics = evaluate_model(
        models[1], None, [], PROMPTS, stage, {}, seed=0, stage_name="ev", reference=reference
    ).metrics
    assert metrics["eval/kl_to_reference_n"] == len(PROMPTS)
    assert metrics["eval/kl_to_reference_ci_low"] <= metrics["eval/kl_to_reference"]
    assert metrics["eval/kl_to_reference"] <= metrics["eval/kl_to_reference_ci_high"]
    other_model, other_tokenizer = build_tiny_model(TINY, 7)  # a tiny tokenizer is trained per seed
    other = Reference("other", other_model, other_tokenizer)
    with pytest.raises(Exception, match="stage 'ev', field reference: 'other' has another tokenizer"):
        evaluate_model(models[1], None, [], PROMPTS, stage, {}, seed=0, stage_name="ev", reference=other)


def test_length_statistics_in_tokens():
    """[1, 2, 3, 4, 10]: mean 4, median 3, p90 at rank 0.9 x 4 = 3.6 -> 4 + 0.6 x (10 - 4) = 7.6."""
    metrics = length_metrics([3, 1, 10, 2, 4], seed=0)
    assert metrics["eval/length/mean"] == pytest.approx(4.0)
    assert metrics["eval/length/p50"] == pytest.approx(3.0)
    assert metrics["eval/length/p90"] == pytest.approx(7.6)
    assert metrics["eval/length/mean_n"] == 5
    assert metrics["eval/length/mean_ci_low"] <= 4.0 <= metrics["eval/length/mean_ci_high"]


def test_lengths_and_nll_in_the_report(models):
    """Lengths are the answers' generated tokens; eval/nll is eval/loss: summed NLL over summed tokens."""
    stage = EvaluateStage(
        kind="evaluate", models=["m"], data="data.sft", prompts="data.prompts",
        generation={"max_new_tokens": 6}, samples_in_table=6,
    )  # fmt: skip
    result = evaluate_model(models[0], None, SFT, PROMPTS, stage, {}, seed=0, stage_name="ev")
    lengths = [row["new_tokens"] for row in result.rows]
    assert result.metrics["eval/length/mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert all(1 <= n <= 6 for n in lengths) and result.metrics["eval/length/mean_n"] == len(PROMPTS)
    model, tokenizer = load_model(models[0])
    sums, counts = heldout_nll(model, tokenizer, SFT, max_length=stage.max_length)
    assert len(sums) == len(SFT) and result.metrics["eval/tokens"] == sum(counts)
    assert result.metrics["eval/nll"] == result.metrics["eval/loss"] == pytest.approx(sum(sums) / sum(counts))
    # the per-example sums add up to the batch loss the trainer computes
    from rlhf_core.modeling.sft_tokens import collate, tokenize_sft_row, unpacked_rows
    from rlhf_core.training.sft.trainer import token_loss_sum

    batch = collate(unpacked_rows([tokenize_sft_row(r, tokenizer, 512) for r in SFT]), tokenizer.pad_token_id)
    with torch.no_grad():
        assert float(token_loss_sum(model, batch, packed=False)) == pytest.approx(sum(sums), rel=1e-5)
    assert (
        result.metrics["eval/nll_ci_low"] <= result.metrics["eval/nll"] <= result.metrics["eval/nll_ci_high"]
    )
    assert result.metrics["eval/nll_n"] == len(SFT)
