"""The ``distill`` stage: its spec, the shared-tokenizer check, the trainer (the student's divergence to
the teacher falls on held-out rows; exact resume through the shared loop) and a run through the flow."""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.errors import UserError
from rlhf_core.modeling.models import build_tiny_model, save_model
from rlhf_core.modeling.shared_tokenizer import check_shared_tokenizer, tokenizer_difference
from rlhf_core.spec import SFTTrainSpec, SpecError, TinyModelSource, parse_spec
from rlhf_core.spec.stages.distillation import DistillStage, DistillTrainSpec
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.distillation.trainer import (
    DistillInputs,
    distill_student,
    mean_token_divergence,
    train_distill,
)
from rlhf_core.training.engine.checkpoint import STATE_FILE
from rlhf_core.training.sft.trainer import train_sft

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT = TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320)
TEACHER = TinyModelSource(hidden_size=64, layers=2, heads=2, vocab_size=320)
RECORDS = synthetic_records("arithmetic", "sft", n=48, seed=0)
TRAIN, HELDOUT = RECORDS[:32], RECORDS[32:]
CFG = DistillTrainSpec(max_steps=12, batch_size=8, lr=3e-3, max_length=96, log_every=1, checkpoint_every=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stage(**fields) -> DistillStage:
    options = {"kind": "distill", "student": "base", "teacher": "teacher", "data": "data.sft"}
    return DistillStage.model_validate({**options, "train": CFG.model_dump(), **fields}).resolved()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(student, teacher, tokenizer): the same seed gives the same locally trained tokenizer. The teacher,
    twice as wide and deep, is fine-tuned for 30 steps on other arithmetic rows (~2 s)."""
    student, tokenizer = build_tiny_model(STUDENT, seed=0)
    teacher, teacher_tokenizer = build_tiny_model(TEACHER, seed=0)
    assert tokenizer_difference(teacher_tokenizer, tokenizer) is None
    teacher_rows = synthetic_records("arithmetic", "sft", n=64, seed=1)
    cfg = SFTTrainSpec(max_steps=30, lr=3e-3, batch_size=8, max_length=96)
    teacher, _ = train_sft(
        teacher, tokenizer, teacher_rows, cfg, seed=0, checkpoint_dir=tmp_path_factory.mktemp("t")
    )
    return student, teacher.eval(), tokenizer


def distil(models, tmp_path: Path, settings: DistillStage, **kwargs):
    student, teacher, tokenizer = models
    return train_distill(
        copy.deepcopy(student), teacher, tokenizer, TRAIN, settings, seed=0,
        checkpoint_dir=tmp_path / "ckpt", **kwargs,
    )  # fmt: skip


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the spec -------------------------------------------------------------------------------------


def distill_spec(tiny_spec_dict: dict, **fields) -> dict:
    tiny_spec_dict["models"]["teacher"] = {
        "tiny": {"hidden_size": 64, "layers": 2, "heads": 2, "vocab_size": 320}
    }
    tiny_spec_dict["stages"]["distill"] = {
        "kind": "distill", "student": "base", "teacher": "teacher", "data": "data.sft", **fields,
    }  # fmt: skip
    return tiny_spec_dict


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return info.value.problems


def test_a_spec_with_a_distill_stage_validates_and_resolves_jsd_beta(tiny_spec_dict) -> None:
    spec = parse_spec(distill_spec(tiny_spec_dict, loss="jsd", top_k=20, sft_weight=0.5))
    assert spec.dependencies("distill") == ["base", "teacher", "data"]
    written = spec.stages["distill"]
    assert written.beta is None and written.resolved().beta == 0.5
    assert spec.resolved().stages["distill"].beta == 0.5
    assert stage(loss="jsd", beta=0.0).beta == 0.0  # an endpoint is allowed (forward KL)


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"beta": 0.3}, "beta", "only loss jsd takes beta"),
        ({"loss": "jsd", "beta": 1.5}, "beta", "less than or equal to 1"),
        ({"loss": "kl"}, "loss", "'forward_kl', 'reverse_kl' or 'jsd'"),
        ({"temperature": 0}, "temperature", "greater than 0"),
        ({"top_k": 0}, "top_k", "greater than or equal to 1"),
        ({"sft_weight": -1}, "sft_weight", "greater than or equal to 0"),
        ({"teacher": "base"}, "teacher", "'base' is also the student"),
        ({"teacher": "data.sft"}, "teacher", "'data.sft' is an sft dataset, expected a policy model"),
        ({"train": {"eval_rows": -1}}, "train.eval_rows", "greater than or equal to 0"),
    ],
)
def test_bad_options_are_refused_naming_the_field(tiny_spec_dict, fields, field, expected) -> None:
    problems = problems_of(distill_spec(tiny_spec_dict, **fields))
    assert any(p.startswith("stage 'distill'") and field in p and expected in p for p in problems), problems


# --- the shared tokenizer -------------------------------------------------------------------------


def test_a_student_on_another_tokenizer_is_refused_naming_both_models_and_the_difference(models) -> None:
    _, _, tokenizer = models
    # another seed trains the BPE merges on another corpus: the same tokens get other ids
    _, other = build_tiny_model(STUDENT, seed=1)
    with pytest.raises(UserError) as info:
        check_shared_tokenizer(
            other, tokenizer, stage="distill", field="teacher", student_name="small", teacher_name="big"
        )
    message = str(info.value)
    assert (
        "stage 'distill', field teacher: the teacher 'big' does not share the tokenizer of the student "
        in message
    )
    assert re.search(
        r"\(vocabulary: token id \d+ is '.+' for the student and '.+' for the teacher\)", message
    )

    # the chat template is not compared (both models read the ids the student's template wrote); an EOS is
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|start|>", 1)
    assert tokenizer_difference(tokenizer, templated) is None


def test_the_stage_checks_the_tokenizers_before_training(models, tmp_path) -> None:
    student, teacher, tokenizer = models
    _, other = build_tiny_model(STUDENT, seed=1)
    save_model(student, other, tmp_path / "student")
    save_model(teacher, tokenizer, tmp_path / "teacher")
    inputs = DistillInputs(
        str(tmp_path / "student"), None, str(tmp_path / "teacher"), None, TRAIN,
        student_name="base", teacher_name="sft",
    )  # fmt: skip
    env = StageEnvironment.local("distill", 0, tmp_path / "work")
    with pytest.raises(
        UserError,
        match="stage 'distill', field teacher: the teacher 'sft' does not share the tokenizer of the "
        "student 'base'",
    ):
        distill_student(stage(), inputs, env)
    assert not env.checkpoint_dir.exists()  # refused before any training step


# --- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"loss": "reverse_kl", "top_k": 20}, {"loss": "jsd", "temperature": 2.0, "sft_weight": 0.5}],
    ids=["forward_kl", "reverse_kl_top20", "jsd_t2_sft"],
)
def test_distilling_lowers_the_students_divergence_to_the_teacher_on_heldout_rows(models, tmp_path, options):
    student, teacher, tokenizer = models
    settings = stage(**options)
    forward = stage()  # measured as the full-vocabulary KL(teacher || student), whatever was trained
    losses: list[float] = []
    trained, result = distil(models, tmp_path, settings, log=lambda m, step: losses.append(m["train/loss"]))
    before = mean_token_divergence(student, teacher, tokenizer, HELDOUT, CFG, forward)
    after = mean_token_divergence(trained, teacher, tokenizer, HELDOUT, CFG, forward)
    assert math.isfinite(before) and after < 0.8 * before, (before, after)  # seen: 1.61 -> 1.01..1.13
    assert losses[-1] < losses[0] and result.steps == 12
    assert not any(p.grad is not None for p in teacher.parameters())  # the teacher never trains
    changed = [k for k, v in weights(trained).items() if not torch.equal(v, weights(student)[k])]
    assert len(changed) == len(weights(student))
    if not options:
        # the teacher's whole distributions teach more than its data's labels: SFT on the same rows for
        # as many steps ends further from the teacher (seen: 1.13 vs 1.02)
        sft_cfg = SFTTrainSpec(**CFG.model_dump(exclude={"eval_rows"}))
        sft_student, _ = train_sft(copy.deepcopy(student), tokenizer, TRAIN, sft_cfg, seed=0,
                                   checkpoint_dir=tmp_path / "sft")  # fmt: skip
        assert after < mean_token_divergence(sft_student, teacher, tokenizer, HELDOUT, CFG, forward)


def test_the_stage_entry_point_measures_before_and_after(models, tmp_path) -> None:
    student, teacher, tokenizer = models
    save_model(student, tokenizer, tmp_path / "student")
    save_model(teacher, tokenizer, tmp_path / "teacher")
    inputs = DistillInputs(str(tmp_path / "student"), None, str(tmp_path / "teacher"), None, TRAIN, HELDOUT)
    result = distill_student(stage(), inputs, StageEnvironment.local("distill", 0, tmp_path / "work"))
    heldout = result.heldout
    assert heldout["eval/divergence_after"] < heldout["eval/divergence_before"]
    assert result.summary()["eval_divergence_after"] == heldout["eval/divergence_after"]
    assert result.model is not None and result.tokenizer is not None


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_is_exact(models, tmp_path) -> None:
    settings = stage(loss="jsd", top_k=20, sft_weight=0.5)
    reference_losses: dict[int, float] = {}
    reference, _ = distil(
        models,
        tmp_path / "a",
        settings,
        log=lambda m, step: reference_losses.__setitem__(step, m["train/loss"]),
    )

    def fail_after_checkpoint(metrics: dict[str, float], step: int) -> None:
        if step == CFG.checkpoint_every + 1:  # checkpoint k is written after step k's log
            raise Interrupted

    with pytest.raises(Interrupted):
        distil(models, tmp_path / "b", settings, log=fail_after_checkpoint)
    logged: dict[int, float] = {}
    resumed, result = distil(
        models, tmp_path / "b", settings, log=lambda m, step: logged.__setitem__(step, m.get("train/loss"))
    )
    k = CFG.checkpoint_every
    assert result.resumed_from_step == k
    losses = {s: v for s, v in logged.items() if s > k}
    assert losses == pytest.approx({s: reference_losses[s] for s in range(k + 1, 13)}, abs=1e-6)
    difference = max(
        (resumed.state_dict()[n] - v).abs().max().item() for n, v in reference.state_dict().items()
    )
    assert difference < 1e-5


RESUME_SCRIPT = """
import sys, time
from pathlib import Path

from safetensors.torch import save_file

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.spec.stages.distillation import DistillStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.distillation.trainer import DistillInputs, distill_student

mode, student_dir, teacher_dir, work, out = sys.argv[1:6]
settings = DistillStage.model_validate_json(sys.argv[6])


def block_after_first_checkpoint(metrics, step):
    if step > settings.train.checkpoint_every:  # checkpoint k is on disk once step k+1 is logged
        Path(out).write_text(str(step))
        time.sleep(600)  # wait here to be killed


if mode == "resume":
    print("ready", flush=True)
    sys.stdin.readline()  # train only once the interrupted run is dead
log = block_after_first_checkpoint if mode == "interrupt" else (lambda metrics, step: None)
env = StageEnvironment("distill", 0, Path(work), Path(work) / "cache", Path(work) / "checkpoints", log=log)
rows = synthetic_records("arithmetic", "sft", n=48, seed=0)[:32]
result = distill_student(settings, DistillInputs(student_dir, None, teacher_dir, None, rows), env)
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, out)
print("resumed_from_step", result.resumed_from_step, flush=True)
"""


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training subprocess exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for the training subprocess:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def test_the_stage_resumes_exactly_after_a_sigkill(models, tmp_path) -> None:
    student, teacher, tokenizer = models
    student_dir, teacher_dir = (
        save_model(student, tokenizer, tmp_path / "s"),
        save_model(teacher, tokenizer, tmp_path / "t"),
    )
    settings = stage(loss="jsd", top_k=20, sft_weight=0.5)
    inputs = DistillInputs(str(student_dir), None, str(teacher_dir), None, TRAIN)
    reference = distill_student(
        settings, inputs, StageEnvironment.local("distill", 0, tmp_path / "ref")
    ).model

    script = tmp_path / "distil.py"
    script.write_text(RESUME_SCRIPT)
    work, marker, final = tmp_path / "work", tmp_path / "blocked", tmp_path / "final.safetensors"
    checkpoint = work / "checkpoints" / f"step-{CFG.checkpoint_every}" / STATE_FILE
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(student_dir), str(teacher_dir), str(work)]
    logs = [tmp_path / "interrupted.log", tmp_path / "resumed.log"]
    with open(logs[0], "w") as err0, open(logs[1], "w") as err1:
        victim = subprocess.Popen(
            [sys.executable, str(script), "interrupt", *args, str(marker), settings.model_dump_json()],
            cwd=REPO_ROOT, env=env, stdout=err0, stderr=subprocess.STDOUT,
        )  # fmt: skip
        resumer = subprocess.Popen(  # imports torch while the first one trains
            [sys.executable, str(script), "resume", *args, str(final), settings.model_dump_json()],
            cwd=REPO_ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err1,
        )  # fmt: skip
        try:
            wait_for(lambda: marker.exists() and checkpoint.exists(), victim, logs[0])
            victim.send_signal(signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
            out, _ = resumer.communicate("go\n", timeout=120)
        finally:
            for process in (victim, resumer):
                if process.poll() is None:
                    process.kill()
    assert resumer.returncode == 0, logs[1].read_text()[-3000:]
    assert out.splitlines()[-1] == f"resumed_from_step {CFG.checkpoint_every}"
    resumed = load_file(final)
    assert max((resumed[k] - v).abs().max().item() for k, v in reference.state_dict().items()) < 1e-5


# --- through the flow -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_pipeline_distils_its_sft_model_into_the_base_model(
    tmp_path, tiny_spec_dict, prefect_api_url
) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    tiny_spec_dict["name"] = "kd"
    stages = tiny_spec_dict["stages"]
    del stages["rm"], stages["eval"]
    stages["distill"] = {
        "kind": "distill", "student": "base", "teacher": "sft", "data": "data.sft",
        "loss": "jsd", "top_k": 20,
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "max_length": 64, "eval_rows": 16},
    }  # fmt: skip
    home = tmp_path / "home"
    outcomes = {o.stage: o for o in run_pipeline(parse_spec(tiny_spec_dict), home=str(home))}

    distilled = outcomes["distill"]
    assert distilled.status == "ran" and distilled.registered == "kd-distill v1"
    assert distilled.outputs["model"].role == "policy"
    assert distilled.metrics["eval_divergence_after"] < distilled.metrics["eval_divergence_before"]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("kd-distill", "1")
    assert version.tags["rlhf.role"] == "policy"
    assert version.tags["rlhf.upstream_models"] == "kd-base:1"  # the student it was trained from
    assert version.tags["rlhf.teacher_model"] == "kd-sft:1"
    assert version.tags["rlhf.dataset_digests"] == f"data.sft={outcomes['data'].outputs['sft'].digest}"
