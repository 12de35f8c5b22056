"""Constitutional AI's supervised part (book ch.12): the critique-revision loop, its seeded principle draws,
its refusals, a real tiny policy revising its own answers, and an endpoint critic on a real HTTP server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scripted_chat_server import ScriptedChatServer, scripted_chat_server

from rlhf_core.errors import UserError
from rlhf_core.judging.constitutional import (
    ConstitutionalInputs,
    RevisionError,
    draw_principles,
    revise_with_constitution,
    run_constitutional_revision,
)
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.spec import SpecError, TinyModelSource, parse_spec
from rlhf_core.spec.stages.constitutional import ConstitutionalRevisionStage, ConstitutionPrinciple
from rlhf_core.stage_environment import StageEnvironment

CONSTITUTION = ("Be honest.", "Be harmless.", "Be concise.", "Be kind.")
PROMPTS = [f"Question {i}: what is {i} + {i}?" for i in range(6)]


def _stage(**fields) -> ConstitutionalRevisionStage:
    return ConstitutionalRevisionStage(
        **{"kind": "constitutional_revision", "policy": "base", "prompts": "data.prompts"}
        | {"constitution": CONSTITUTION}
        | fields
    )


def reviser(prompts: list[str]) -> list[str]:
    """A critic that reads its request: a critique names the principle, a revision appends a mark."""
    answers = []
    for prompt in prompts:
        response = prompt.split("[Response]\n", 1)[1].split("\n\n", 1)[0]
        answers.append(f"Revision: {response} +r" if "[Revision request]" in prompt else "too long")
    return answers


# --- the loop on plain callables -------------------------------------------------------------------------


def test_each_prompt_gets_n_revisions_under_principles_drawn_from_its_seed() -> None:
    stage = _stage(revisions=3)
    args = (PROMPTS, ["y0"] * 6, stage.constitution, 3, reviser)
    chains, problems = revise_with_constitution(*args, seed=7, on_error="fail", stage="cai")
    assert problems == []
    assert [c.answers for c in chains] == [["y0", "y0 +r", "y0 +r +r", "y0 +r +r +r"]] * 6
    assert all(c.critiques == ["too long"] * 3 for c in chains)
    assert [c.principles for c in chains] == [draw_principles(4, 3, 7, i) for i in range(6)]
    again, _ = revise_with_constitution(*args, seed=7, on_error="fail", stage="cai")
    other, _ = revise_with_constitution(*args, seed=8, on_error="fail", stage="cai")
    assert [c.principles for c in again] == [c.principles for c in chains]  # same seed, same chain
    assert [c.principles for c in other] != [c.principles for c in chains]


def test_the_principle_draws_are_uniform_with_replacement() -> None:
    draws = [i for row in range(2000) for i in draw_principles(4, 3, 0, row)]
    counts = [draws.count(i) / len(draws) for i in range(4)]
    assert all(abs(c - 0.25) < 0.02 for c in counts), counts  # 6000 draws: sd of a share ~0.0056
    assert any(len(set(draw_principles(4, 3, 0, row))) < 3 for row in range(50))  # repeats happen


def test_the_critic_sees_the_drawn_principles_requests_and_the_latest_answer() -> None:
    seen: list[str] = []

    def recording(prompts: list[str]) -> list[str]:
        seen.extend(prompts)
        return reviser(prompts)

    stage = _stage(revisions=2)
    chains, _ = revise_with_constitution(
        PROMPTS[:1], ["first"], stage.constitution, 2, recording, seed=3, on_error="fail", stage="cai"
    )
    first, second = (stage.constitution[i] for i in chains[0].principles)
    assert first.critique_request in seen[0] and "[Response]\nfirst\n" in seen[0]
    assert first.revision_request in seen[1] and "[Critique]\ntoo long" in seen[1]
    assert second.critique_request in seen[2] and "[Response]\nfirst +r\n" in seen[2]


def test_an_empty_revision_is_counted_or_stops_naming_the_row() -> None:
    def empty_for_row_two(prompts: list[str]) -> list[str]:
        return ["Revision:  " if "Question 2" in p and "[Revision request]" in p else a
                for p, a in zip(prompts, reviser(prompts), strict=True)]  # fmt: skip

    stage = _stage()
    args = (PROMPTS, ["y0"] * 6, stage.constitution, 2, empty_for_row_two)
    chains, problems = revise_with_constitution(*args, seed=0, on_error="skip", stage="cai")
    assert [c.row for c in chains] == [0, 1, 3, 4, 5]
    assert len(problems) == 1 and "stage 'cai': row 2 (0-based), revision 1 of 2" in problems[0]
    with pytest.raises(RevisionError, match=r"stage 'cai': row 2 \(0-based\), revision 1 of 2.*empty"):
        revise_with_constitution(*args, seed=0, on_error="fail", stage="cai")


# --- the spec --------------------------------------------------------------------------------------------


def test_a_principle_given_as_text_gets_both_requests() -> None:
    principle = _stage().constitution[0]
    assert principle.principle == "Be honest."
    assert "Be honest." in principle.critique_request and "Be honest." in principle.revision_request
    given = ConstitutionPrinciple(critique_request="What is rude?", revision_request="Be polite.")
    assert given.principle is None and given.revision_request == "Be polite."
    # what was filled in validates as written again (plan, reproduce)
    assert _stage().model_validate(_stage().model_dump()) == _stage()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"constitution": []}, r"stage 'cai', field constitution: the constitution is empty"),
        ({"revisions": 0}, r"stage 'cai', field revisions: revisions is 0; give at least 1"),
        (
            {"critic": "base", "critic_endpoint": {"base_url": "http://h/v1", "model": "m"}},
            r"stage 'cai'.*critic \(a policy model\) or critic_endpoint, not both",
        ),
        (
            {"critic_endpoint": {"base_url": "h:80", "model": "m"}},
            r"field critic_endpoint\.base_url: .*not an http\(s\) URL",
        ),
        (
            {"constitution": [{"critique_request": "x"}]},
            r"field constitution\.0\.revision_request: Field required",
        ),
    ],
)
def test_bad_stages_are_refused_naming_the_field(tiny_spec_dict, fields, message) -> None:
    tiny_spec_dict["stages"]["cai"] = {
        "kind": "constitutional_revision", "policy": "base", "prompts": "data.prompts",
        "constitution": list(CONSTITUTION),
    } | fields  # fmt: skip
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec_dict)


def test_a_valid_stage_is_wired_into_the_pipeline(tiny_spec_dict) -> None:
    tiny_spec_dict["stages"]["cai"] = {
        "kind": "constitutional_revision", "policy": "sft", "prompts": "data.prompts",
        "constitution": list(CONSTITUTION), "critic": "base",
    }  # fmt: skip
    spec = parse_spec(tiny_spec_dict)
    assert spec.stages["cai"].input_refs() == {
        "policy": ("sft", spec.stages["cai"].input_refs()["policy"][1]),
        "prompts": ("data.prompts", spec.stages["cai"].input_refs()["prompts"][1]),
        "critic": ("base", spec.stages["cai"].input_refs()["critic"][1]),
    }
    assert set(spec.stages["cai"].output_types()) == {"sft", "preferences"}


# --- a real tiny policy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tiny_policy_revises_its_own_answers_and_the_rows_carry_the_chain(policy_dir, tmp_path) -> None:
    stage = _stage(revisions=2, generation={"max_new_tokens": 6, "temperature": 1.0}, splits={"train": 1.0})
    inputs = ConstitutionalInputs(policy_dir, None, [{"prompt": p} for p in PROMPTS[:4]])
    result = run_constitutional_revision(stage, inputs, StageEnvironment.local("cai", 5, tmp_path))
    rows = result.sft["train"]
    assert len(rows) + len(result.problems) == 4
    labels = {p.principle for p in stage.constitution}
    for row in rows:
        assert len(row["principles"]) == len(row["critiques"]) == len(row["revisions"]) == 2
        assert set(row["principles"]) <= labels
        assert row["completion"] == row["revisions"][-1] and row["completion"]
    pairs = result.preferences["train"]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs} <= {
        (r["prompt"], r["completion"], r["initial_completion"]) for r in rows
    }
    again = run_constitutional_revision(stage, inputs, StageEnvironment.local("cai", 5, tmp_path))
    assert again.sft == result.sft  # the same seed repeats answers, draws, critiques and revisions


# --- an endpoint critic on a real HTTP server ------------------------------------------------------------


@pytest.fixture
def revising_server() -> Iterator[ScriptedChatServer]:
    with scripted_chat_server(lambda turn: reviser([turn])[0]) as server:
        yield server


@pytest.mark.usefixtures("one_torch_thread")
def test_an_endpoint_critic_revises_and_a_rerun_asks_it_nothing(
    policy_dir, revising_server, tmp_path
) -> None:
    endpoint = {"base_url": revising_server.base_url, "model": "critic"}
    stage = _stage(
        revisions=2, critic_endpoint=endpoint, generation={"max_new_tokens": 4}, splits={"train": 1.0}
    )
    inputs = ConstitutionalInputs(policy_dir, None, [{"prompt": p} for p in PROMPTS[:3]])
    env = StageEnvironment.local("cai", 0, tmp_path)
    result = run_constitutional_revision(stage, inputs, env)
    rows = sorted(result.sft["train"], key=lambda r: r["prompt"])
    assert len(revising_server.requests) == 3 * 2 * 2  # prompts x rounds x (critique, revision)
    for row in rows:
        y0 = row["initial_completion"]
        assert row["revisions"] == [f"{y0} +r", f"{y0} +r +r"] and row["critiques"] == ["too long"] * 2
    assert len(result.preferences["train"]) == 3
    run_constitutional_revision(stage, inputs, env)
    assert len(revising_server.requests) == 12  # every answer came from the verdict cache


@pytest.mark.usefixtures("one_torch_thread")
def test_another_policy_can_critique_and_a_conversation_prompt_is_refused(policy_dir, tmp_path) -> None:
    stage = _stage(revisions=1, generation={"max_new_tokens": 4}, splits={"train": 1.0}, critic="critic")
    inputs = ConstitutionalInputs(policy_dir, None, [{"prompt": p} for p in PROMPTS[:2]], policy_dir, None)
    result = run_constitutional_revision(stage, inputs, StageEnvironment.local("cai", 0, tmp_path))
    assert all(len(r["revisions"]) == 1 for r in result.sft["train"])
    chat = [{"prompt": "hi"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(UserError, match=r"stage 'cai': prompt row 1 \(0-based\), column 'prompt': expected"):
        run_constitutional_revision(
            stage, ConstitutionalInputs(policy_dir, None, chat), StageEnvironment.local("cai", 0, tmp_path)
        )
