"""DPO over trajectories (book ch.13 with ch.8): preference pairs of tool-use conversations are validated,
tokenized with a mask on the model's own tokens, and direct alignment sums log-probs over those tokens
only (tool results are context), for the policy and the cached reference alike."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf_core.data.preference_trajectories import preference_trajectories
from rlhf_core.data.schemas import DataValidationError, preference_parts, validate_records
from rlhf_core.environments.tool_arithmetic import tool_arithmetic_records, tool_use_corpus
from rlhf_core.errors import UserError
from rlhf_core.losses.direct_alignment import DIRECT_ALIGNMENT_LOSSES
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.preference_tokens import (
    ChatTemplateError,
    PairTokens,
    group_pairs,
    tokenize_preference_rows,
)
from rlhf_core.modeling.tokenizer import CHATML_TEMPLATE, IM_END, tool_call_text
from rlhf_core.spec import TinyModelSource
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.direct_alignment.reference import (
    as_unpaired,
    compute_reference_logprobs,
    example_logprobs,
)
from rlhf_core.training.direct_alignment.trainer import (
    DirectAlignmentInputs,
    evaluate_direct_alignment,
    optimize_on_preferences,
    step_losses,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=512)
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}
SYSTEM = {"role": "system", "content": "Use the calculator for arithmetic."}
QUESTION = {"role": "user", "content": "What is 17 * 23?"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": "17 * 23"}},
        }
    ],
}
ANSWER, GUESS = "The answer is 391.", "The answer is 401."


def _result(content: str = "391") -> dict:
    return {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": content}


def _pair(result: str = "391") -> dict:
    """Chosen: call the calculator, read its result, answer; rejected: answer at once, wrongly."""
    return {
        "chosen": [SYSTEM, QUESTION, CALL, _result(result), {"role": "assistant", "content": ANSWER}],
        "rejected": [SYSTEM, QUESTION, {"role": "assistant", "content": GUESS}],
        "tools": [CALCULATOR],
    }


@pytest.fixture(scope="module")
def tiny():
    """A tiny policy whose tokenizer knows tool-use text (so calls are a few tokens each)."""
    return build_tiny_model(SHAPE, seed=0, extra_corpus=tool_use_corpus())


def _runs(tokenizer, ids: list[int], mask: list[int], value: int) -> list[str]:
    """Decoded text of each maximal run of tokens whose mask is ``value``."""
    runs: list[list[int]] = []
    for k, (token, m) in enumerate(zip(ids, mask, strict=True)):
        if m == value:
            if k == 0 or mask[k - 1] != value:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


# --- (a) tokens and masks ------------------------------------------------------------------------


def test_the_mask_covers_exactly_the_assistant_turns(tiny) -> None:
    _, tokenizer = tiny
    (pair,), _ = tokenize_preference_rows([_pair()], tokenizer, max_length=1024)
    x = tokenizer.decode(pair.prompt)
    assert '"name": "calculator"' in x  # the tools reach the template
    assert x.endswith("<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n")
    call = tool_call_text("calculator", {"expression": "17 * 23"})
    assert _runs(tokenizer, pair.chosen, pair.chosen_mask, 1) == [call + IM_END, ANSWER + IM_END]
    # the tool's result and the headers around it are context, never the model's tokens
    tool_turn = "\n<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n"
    assert _runs(tokenizer, pair.chosen, pair.chosen_mask, 0) == [tool_turn]
    assert tokenizer.decode(pair.chosen) == call + IM_END + tool_turn + ANSWER + IM_END  # y ends at EOS
    # a direct answer is one model turn: all ones, stored as None
    assert tokenizer.decode(pair.rejected) == GUESS + IM_END and pair.rejected_mask is None


def test_turns_both_sides_share_after_the_question_stay_in_y(tiny) -> None:
    _, tokenizer = tiny
    row = _pair()
    row["rejected"] = [*row["chosen"][:-1], {"role": "assistant", "content": GUESS}]  # same call, wrong copy
    x, y_c, y_r, tools = preference_trajectories(row)
    assert x == [
        {"role": r, "content": c} for r, c in (("system", SYSTEM["content"]), ("user", QUESTION["content"]))
    ]
    assert [m["role"] for m in y_c] == [m["role"] for m in y_r] == ["assistant", "tool", "assistant"]
    assert tools == [CALCULATOR]
    (pair,), _ = tokenize_preference_rows([row], tokenizer, max_length=1024)
    assert _runs(tokenizer, pair.rejected, pair.rejected_mask, 1)[-1] == GUESS + IM_END


# --- (b) the loss sums the model's tokens only ---------------------------------------------------


def _token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every completion token, by a plain forward pass and log-softmax."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _masked_sum(model, prompt, completion, mask) -> tuple[float, float]:
    """(sum of log-probs where mask is 1, sum where it is 0)."""
    logps = _token_logprobs(model, prompt, completion)
    mask = torch.tensor(mask or [1] * len(completion), dtype=torch.bool)
    return float(logps[mask].sum()), float(logps[~mask].sum())


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("result", ["391", "9999 (cached)"])
def test_dpo_on_a_trajectory_pair_sums_only_the_model_tokens(tiny, shared_prefix: bool, result: str) -> None:
    policy, tokenizer = tiny
    reference = build_tiny_model(SHAPE, seed=1, extra_corpus=tool_use_corpus())[0]  # other weights
    policy.eval()
    reference.eval()
    pairs, _ = tokenize_preference_rows([_pair(result)], tokenizer, max_length=1024)
    p = pairs[0]
    with torch.no_grad():
        logps, lengths = example_logprobs(policy, pairs, [0], tokenizer.pad_token_id, shared_prefix)
        ref = compute_reference_logprobs(reference, pairs, tokenizer.pad_token_id, shared_prefix)
        # by hand: policy and reference, chosen summed over its mask, rejected over every token
        pc, pc_env = _masked_sum(policy, p.prompt, p.chosen, p.chosen_mask)
        pr, _ = _masked_sum(policy, p.prompt, p.rejected, p.rejected_mask)
        rc, rc_env = _masked_sum(reference, p.prompt, p.chosen, p.chosen_mask)
        rr, _ = _masked_sum(reference, p.prompt, p.rejected, p.rejected_mask)
    assert logps[:, 0].tolist() == pytest.approx([pc, pr], abs=1e-4)
    assert ref[0].tolist() == pytest.approx([rc, rr], abs=1e-4)
    # the tool result's tokens carry real log-probability mass, which the sums leave out
    assert pc_env < -1.0 and rc_env < -1.0
    assert lengths[:, 0].tolist() == [sum(p.chosen_mask), len(p.rejected)]
    assert sum(p.chosen_mask) < len(p.chosen)

    spec, beta = DIRECT_ALIGNMENT_LOSSES["dpo"], 0.1
    losses, logged = step_losses(spec, {"beta": beta}, logps, lengths, ref)
    h = (pc - rc) - (pr - rr)  # DPO's log-ratio difference over the model's tokens
    assert float(losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), abs=1e-4)
    assert float(logged["chosen_reward"]) == pytest.approx(beta * (pc - rc), abs=1e-4)


def test_a_length_normalised_loss_divides_by_the_model_tokens(tiny) -> None:
    policy, tokenizer = tiny
    pairs, _ = tokenize_preference_rows([_pair()], tokenizer, max_length=1024)
    with torch.no_grad():
        logps, lengths = example_logprobs(policy.eval(), pairs, [0], tokenizer.pad_token_id)
    spec = DIRECT_ALIGNMENT_LOSSES["simpo"]
    _, logged = step_losses(spec, {"beta": 2.0}, logps, lengths, None)
    n_model = sum(pairs[0].chosen_mask)
    assert float(logged["chosen_reward"]) == pytest.approx(2.0 * float(logps[0, 0]) / n_model, rel=1e-5)


def test_kto_from_trajectory_pairs_keeps_the_masks(tiny) -> None:
    _, tokenizer = tiny
    pairs, _ = tokenize_preference_rows([_pair()], tokenizer, max_length=1024)
    desirable, undesirable = as_unpaired(pairs)
    assert desirable.mask == pairs[0].chosen_mask and desirable.label
    assert undesirable.mask is None and not undesirable.label


# --- (c) training ------------------------------------------------------------------------------


def test_direct_alignment_learns_to_prefer_calling_the_tool(tiny, tmp_path) -> None:
    model, tokenizer = tiny
    policy_dir = str(save_model(model, tokenizer, tmp_path / "policy"))
    rows = tool_arithmetic_records("preference", 16, seed=0)
    stage = DirectAlignmentStage(
        kind="direct_alignment", policy="p", data="d.preferences", loss="dpo", beta=0.5,
        train={"max_steps": 8, "batch_size": 8, "lr": 5e-3, "warmup_ratio": 0.0, "max_length": 512,
               "log_every": 1},
    )  # fmt: skip
    logged: list[dict] = []
    env = StageEnvironment(
        "dpo", 0, tmp_path / "run", tmp_path / "cache", tmp_path / "run" / "ckpt",
        log=lambda metrics, step: logged.append(metrics),
    )  # fmt: skip
    inputs = DirectAlignmentInputs(
        policy_dir, None, rows, rows, reference_digest="policy", data_digest="tools"
    )
    result = optimize_on_preferences(stage, inputs, env)
    # at the first step the policy is the reference: every implicit reward is 0, no pair is ordered
    assert logged[0]["train/accuracy"] == 0.0 and logged[0]["train/loss"] == pytest.approx(
        math.log(2), abs=1e-3
    )
    assert result.heldout["eval/accuracy"] >= 0.9 and result.heldout["eval/margin"] > 0
    assert result.heldout["eval/loss"] < math.log(2)


# --- (d) single-turn rows are unchanged ----------------------------------------------------------


def test_single_turn_rows_tokenize_as_one_turn_without_masks(tiny) -> None:
    _, tokenizer = tiny
    row = {"prompt": [SYSTEM, QUESTION], "chosen": ANSWER, "rejected": GUESS}
    (pair,), _ = tokenize_preference_rows([row], tokenizer, max_length=1024)
    prompt_text = tokenizer.apply_chat_template(
        [SYSTEM, QUESTION], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [SYSTEM, QUESTION, {"role": "assistant", "content": ANSWER}], tokenize=False
    )
    assert pair.prompt == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert pair.chosen == tokenizer(full[len(prompt_text) :].rstrip(), add_special_tokens=False)["input_ids"]
    assert pair.chosen_mask is None and pair.rejected_mask is None


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_an_all_ones_mask_scores_as_no_mask(tiny, shared_prefix: bool) -> None:
    policy, tokenizer = tiny
    row = {"prompt": [QUESTION], "chosen": ANSWER, "rejected": GUESS}
    (pair,), _ = tokenize_preference_rows([row], tokenizer, max_length=1024)
    ones = PairTokens(
        pair.prompt, pair.chosen, pair.rejected, 0, [1] * len(pair.chosen), [1] * len(pair.rejected)
    )
    with torch.no_grad():
        plain = example_logprobs(policy.eval(), [pair], [0], tokenizer.pad_token_id, shared_prefix)
        masked = example_logprobs(policy, [ones], [0], tokenizer.pad_token_id, shared_prefix)
    assert torch.equal(plain[0], masked[0]) and torch.equal(plain[1], masked[1])


# --- (e) errors -----------------------------------------------------------------------------------


def _with(**changes) -> dict:
    row = copy.deepcopy(_pair())
    row.update(changes)
    return row


_C = _pair()["chosen"]
_R = _pair()["rejected"]
_LATER = {"role": "user", "content": "And 18 * 23?"}


@pytest.mark.parametrize(
    ("bad", "field", "expected"),
    [
        (_with(rejected=[SYSTEM, {**QUESTION, "content": "What is 2 + 2?"}, _R[-1]]), "rejected[1]",
         "the turn chosen[1]: the two conversations must start with the same turns up to a 'user' turn"),
        (_with(chosen=[*_C, _LATER, {"role": "assistant", "content": "414."}]), "chosen[5].role",
         "only 'assistant' and 'tool' messages after the prompt"),
        (_with(chosen=[*_C[:3], _C[-1]]), "chosen[3].role",
         "tool results ('tool' messages) before another assistant turn"),
        (_with(chosen=[*_C[:3], _result(), _result(), _C[-1]]), None, None),  # two results: valid
        (_with(chosen=[*_C[:2], {"role": "assistant", "content": "x"}, _result(), _C[-1]]), "chosen[3].role",
         "a 'tool' message right after an assistant turn with 'tool_calls'"),
        (_with(chosen=_C[:4]), "chosen[3].role", "the last message to be from 'assistant', got 'tool'"),
        (_with(rejected=copy.deepcopy(_C)), "rejected", "a trajectory different from 'chosen'"),
        (_with(prompt="What is 2 + 2?"), "prompt", "the same turns as 'chosen' up to its last 'user' turn"),
        (_with(tools=[{"type": "function"}]), "tools[0]", "a function declaration"),
        (_with(chosen=[*_C[:3], {**_result(), "tool_call_id": None}, _C[-1]]), "chosen[3].tool_call_id",
         "the id of the call it answers"),
    ],
)  # fmt: skip
def test_bad_trajectory_rows_name_the_row_and_field(
    bad: dict, field: str | None, expected: str | None
) -> None:
    good = _pair()
    if field is None:
        assert validate_records([good, bad], "preference", source="prefs.jsonl")[1] == []
        return
    with pytest.raises(DataValidationError) as info:
        validate_records([good, bad], "preference", source="prefs.jsonl")
    assert str(info.value).startswith(f"in prefs.jsonl, row 1 (0-based), field {field!r}: expected ")
    assert expected in str(info.value)


def test_the_tool_arithmetic_pairs_are_valid_trajectories() -> None:
    rows = tool_arithmetic_records("preference", 8, seed=0)
    assert validate_records(rows, "preference", source="tools")[1] == []


def test_text_only_readers_refuse_trajectories(tiny) -> None:
    _, tokenizer = tiny
    with pytest.raises(UserError, match="pair of tool-use trajectories"):
        preference_parts(_pair())
    with pytest.raises(
        UserError, match=r"^in prefs, row 0 \(0-based\): .*reward models on trajectories are not"
    ):
        group_pairs([_pair()], tokenizer, max_length=1024, source="prefs")


def test_a_template_without_tools_refuses_a_tools_column(tiny) -> None:
    _, tokenizer = tiny
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="ignores the tools"):
        tokenize_preference_rows([_pair()], plain, max_length=1024, source="prefs")


def test_evaluation_reads_trajectory_pairs(tiny) -> None:
    """Held-out evaluation goes through the same masked sums: policy = reference gives DPO's ln 2."""
    policy, tokenizer = tiny
    pairs, _ = tokenize_preference_rows(
        tool_arithmetic_records("preference", 4, seed=1), tokenizer, max_length=512
    )
    reference = compute_reference_logprobs(policy, pairs, tokenizer.pad_token_id)
    stage = DirectAlignmentStage(kind="direct_alignment", policy="p", data="d.preferences", loss="dpo")
    metrics = evaluate_direct_alignment(policy, tokenizer, pairs, reference, stage)
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_row(tiny) -> None:
    # a generation header the rendered turn lacks: the model's tokens would not follow the prompt's ids
    _, tokenizer = tiny
    thinking = copy.deepcopy(tokenizer)
    header = "{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert header in CHATML_TEMPLATE
    thinking.chat_template = CHATML_TEMPLATE.replace(
        header, "{{ '<|im_start|>assistant\n<think>' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"^in prefs, row 0 \(0-based\): the chat template does not"):
        tokenize_preference_rows([_pair()], thinking, max_length=1024, source="prefs")
