"""Training in several processes (``compute.processes``), launched by accelerate with gloo on CPU.

1. Sharding: every micro-batch of a step goes to exactly one rank, counts differ by at most one.
2. Same curve: SFT, reward model and DPO trained by 2 processes on the same global batches and seed log
   the loss curve of 1 process, and end at the same weights, within the tolerance below.
3. Resume: a 2-process run killed after a checkpoint and run again ends where an uninterrupted
   2-process run does (1e-5).
4. End to end: ``rlhf run`` with ``compute: {processes: 2}`` on the sft stage registers exactly one model
   version, logs one loss curve, re-runs from cache, and after a SIGKILL resumes to the uninterrupted
   weights; kinds that train in one process refuse ``compute.processes`` > 1.

This file is also the script the ranks of tests 2 and 3 run (``accelerate launch <this file> ...``).
Each rank uses one torch thread: two processes share the machine's two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_core.data.synthetic import synthetic_records
from rlhf_core.spec import RewardModelStage, RewardTrainSpec, SFTStage, SFTTrainSpec
from rlhf_core.spec.stages.direct_alignment import DirectAlignmentStage
from rlhf_core.stage_environment import StageEnvironment
from rlhf_core.training.engine.data_parallel import OtherRankFinished, shard

REPO_ROOT = Path(__file__).resolve().parents[1]
# Measured on a 2-core CPU (fp32, gloo): loss curves within 1.7e-7 relative, weights within 3.6e-7
# (only the float summation order differs: the ranks' gradients are all-reduced). Asserted with room:
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5

# 3 micro-batches per step, so the 2 ranks get unequal shares (2 and 1) and the step's normaliser
# (tokens, prompts, pairs of the whole step) is what makes the shares add up.
SFT_CFG = SFTTrainSpec(max_steps=4, batch_size=2, grad_accum=3, lr=3e-3, warmup_ratio=0.0, max_length=64,
                       log_every=1, checkpoint_every=2)  # fmt: skip
RM_CFG = RewardTrainSpec(max_steps=3, batch_size=2, grad_accum=3, lr=1e-2, warmup_ratio=0.0, max_length=64,
                         log_every=1)  # fmt: skip
SFT_STAGE = SFTStage(kind="sft", model="p", data="d.sft", train=SFT_CFG)
RM_STAGE = RewardModelStage(kind="reward_model", model="p", data="d.preferences", train=RM_CFG)
DPO_STAGE = DirectAlignmentStage(
    kind="direct_alignment", policy="p", data="d.preferences", loss="dpo",
    train={"max_steps": 3, "batch_size": 2, "grad_accum": 3, "lr": 5e-3, "warmup_ratio": 0.0,
           "max_length": 64, "log_every": 1},
)  # fmt: skip


# --- what both the test process and the ranks run ----------------------------------------------------


def _train(kind: str, policy_dir: str, work: Path, stop_after: int | None = None):
    """One trainer on fixed data; returns (loss per step, trained model). ``stop_after``: the main
    process dies right after logging that step (the checkpoint before it is on disk)."""
    curve: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            curve.append(metrics["train/loss"])
        if step == stop_after:
            os._exit(17)

    env = StageEnvironment(kind, 0, work, work / "cache", work / "ckpt", log=log)
    if kind == "sft":
        from rlhf_core.training.sft.trainer import SFTInputs, supervised_fine_tune

        records = synthetic_records("arithmetic", "sft", n=24, seed=0)
        model = supervised_fine_tune(SFT_STAGE, SFTInputs(policy_dir, None, records), env).model
    elif kind == "reward_model":
        from rlhf_core.training.reward_model.trainer import RewardModelInputs, fit_reward_model

        pairs = synthetic_records("arithmetic", "preference", n=24, seed=0, max_operand=9)
        model = fit_reward_model(RM_STAGE, RewardModelInputs(policy_dir, None, pairs), env).model
    else:
        from rlhf_core.training.direct_alignment.trainer import DirectAlignmentInputs, optimize_on_preferences

        pairs = synthetic_records("arithmetic", "preference", n=24, seed=1, max_operand=9)
        inputs = DirectAlignmentInputs(
            policy_dir, None, pairs, None, reference_digest="policy", data_digest="prefs"
        )
        model = optimize_on_preferences(DPO_STAGE, inputs, env).model
    return curve, model


def _save(out: Path, kind: str, curve: list[float], model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(curve))
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / f"{kind}.safetensors")


def _load(out: Path, kind: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((out / f"{kind}.json").read_text()), load_file(out / f"{kind}.safetensors")


def _rank_main(out: str, policy_dir: str, kinds: str, stop_after: str, train=None) -> None:
    """A rank of ``accelerate launch``: train each kind (with ``train``, default ``_train``); the main
    rank saves curves and weights."""
    from accelerate import PartialState

    from runtime.multiprocess import exit_rank

    train = train or _train
    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    for kind in kinds.split(","):
        try:
            curve, model = train(kind, policy_dir, Path(out) / "work" / kind, int(stop_after) or None)
        except OtherRankFinished:
            continue
        assert state.is_main_process
        _save(Path(out), kind, curve, model)
    exit_rank()  # what runtime.multiprocess's ranks do: no interpreter teardown, so no SIGABRT in it


DDP_SETTINGS = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(out: Path, policy_dir: str, kinds: str, stop_after: int = 0) -> subprocess.CompletedProcess:
    return launch_ranks(__file__, DDP_SETTINGS, out, policy_dir, kinds, stop_after)


def launch_ranks(
    script: str, settings: list[str], out: Path, policy_dir: str, kinds: str, stop_after: int = 0
) -> subprocess.CompletedProcess:
    """``accelerate launch <settings>`` of 2 CPU ranks running ``script`` (whose main is ``_rank_main``)."""
    from runtime.multiprocess import free_port

    command = [
        sys.executable, "-m", "accelerate.commands.launch", *settings, "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
        script, str(out), policy_dir, kinds, str(stop_after),
    ]  # fmt: skip
    # the ranks import this checkout's code, not whatever copy of it is installed
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(7, 2), (3, 2), (1, 2), (10, 4), (2, 3), (0, 2)])
def test_shards_cover_every_micro_batch_once_with_balanced_counts(n, world):
    items = list(range(n))
    shares = [shard(items, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == items  # each exactly once
    counts = [len(share) for share in shares]
    assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError):
        shard(items, world, world)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=1, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, policy_dir) -> Path:
    """SFT, reward model and DPO trained by 2 gloo ranks (one launch: each rank starts up once)."""
    kinds = "sft,reward_model,direct_alignment"
    return launched(lambda: tmp_path_factory.mktemp("two"), _launch, policy_dir, kinds)


def launched(new_dir, launch, policy_dir: str, kinds: str) -> Path:
    """``launch(new_dir(), policy_dir, kinds)`` that must succeed; its output directory."""
    out = new_dir()
    done = launch(out, policy_dir, kinds)
    assert done.returncode == 0, _rank_errors(done) + done.stderr[-3000:]
    return out


def _rank_errors(done: subprocess.CompletedProcess) -> str:
    """The lines of a launch's output that say why a rank failed (the tail alone is the launcher's
    summary), at most 60."""
    markers = ("error", "exception", "terminate", "what()", "abort", "enforce", "traceback", "signal")
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    return "\n".join([line for line in lines if any(m in line.lower() for m in markers)][:60]) + "\n"


@pytest.mark.parametrize("kind", ["sft", "reward_model", "direct_alignment"])
def test_two_processes_give_the_loss_curve_and_weights_of_one(kind, policy_dir, two_process_run, tmp_path):
    torch.set_num_threads(1)
    one_curve, one_model = _train(kind, policy_dir, tmp_path / kind)
    one_weights = {k: v.detach() for k, v in one_model.state_dict().items()}
    two_curve, two_weights = _load(two_process_run, kind)
    assert len(two_curve) == len(one_curve) > 1
    worst_loss = max(abs(a - b) / abs(a) for a, b in zip(one_curve, two_curve, strict=True))
    worst_weight = _max_diff(one_weights, two_weights)
    print(f"{kind}: loss curves within {worst_loss:.2e} relative, weights within {worst_weight:.2e}")
    assert worst_loss <= LOSS_RTOL
    assert worst_weight <= WEIGHT_ATOL
    assert _max_diff(one_weights, _initial_weights(policy_dir, kind, one_weights)) > 1e-3  # it trained


def _initial_weights(policy_dir: str, kind: str, like: dict) -> dict[str, torch.Tensor]:
    if kind == "reward_model":
        from rlhf_core.modeling.reward_model import build_reward_model

        model = build_reward_model(policy_dir)
    else:
        from rlhf_core.modeling.models import load_model

        model, _ = load_model(policy_dir)
    return {k: v for k, v in model.state_dict().items() if k in like}


def test_two_processes_killed_after_a_checkpoint_resume_to_the_uninterrupted_weights(
    tmp_path, policy_dir, two_process_run
):
    out = tmp_path / "killed"
    killed = _launch(out, policy_dir, "sft", stop_after=3)  # step-2 checkpoint written, then rank 0 dies
    assert killed.returncode != 0
    work = out / "work" / "sft" / "ckpt"
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("step-")) == ["step-2"]
    state = json.loads((work / "step-2" / "trainer_state.json").read_text())
    assert state["processes"] == 2
    assert {p.name for p in (work / "step-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"
    }  # fmt: skip
    assert not (out / "sft.json").exists()

    resumed = _launch(out, policy_dir, "sft")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    curve, weights = _load(out, "sft")
    reference_curve, reference = _load(two_process_run, "sft")
    assert len(curve) == SFT_CFG.max_steps - 2  # steps 3 and 4 ("resumed_from_step" carries no loss)
    assert _max_diff(weights, reference) <= 1e-5
    assert curve[-1] == pytest.approx(reference_curve[-1], rel=1e-6)


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(tmp_path, policy_dir, two_process_run):
    """Each rank restores its own RNG state: another process count must start over, and says so."""
    import shutil

    source = two_process_run / "work" / "sft" / "ckpt"
    if not any(source.glob("step-*")):  # the finished run kept its checkpoints
        pytest.skip("no checkpoint left by the two-process run")
    shutil.copytree(source, tmp_path / "sft" / "ckpt")
    with pytest.raises(ValueError, match="written by 2 training process"):
        _train("sft", policy_dir, tmp_path / "sft")


def _run_in_own_group(command: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run ``command`` in its own session; on a timeout its whole process group (the launcher and the
    ranks included) is killed, never left behind."""
    import signal

    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _check_one_version_and_one_curve(home: Path, name: str, steps: int, every: int) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry too: not the last test's
    (version,) = client.search_model_versions(f"name='{name}-sft'")  # exactly one, from the main rank
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(every, steps + 1, every))  # only the main rank logs
    assert run.data.metrics["summary/steps"] == steps
    (model_dir,) = (home / "work").glob("sft-*/model")
    assert (model_dir / "model.safetensors").exists()
    assert not list((home / "work").glob("sft-*/checkpoints"))  # removed once the stage finished


@pytest.mark.e2e
def test_rlhf_run_with_two_processes_registers_once_and_resumes_after_a_sigkill(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    """``rlhf run`` with ``compute: {processes: 2}`` on the sft stage: exactly one model version and one
    loss curve (the main rank's), checkpoints removed once done, a re-run served from cache. Then a
    SIGKILL of another pipeline's process group after a 2-process checkpoint (its ranks held there): the
    ranks (each in a session of its own) die with their launcher, the re-run resumes, registers one
    version and ends at the uninterrupted run's weights."""
    import signal
    import time

    import yaml
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    tiny_spec_dict["name"] = "mpr"
    stages = tiny_spec_dict["stages"]
    del stages["eval"], stages["rm"]
    stages["data"]["source"]["synthetic"]["n"] = 40
    long_run = {"max_steps": 20, "log_every": 5, "checkpoint_every": 10}
    stages["sft"]["train"].update(batch_size=4, grad_accum=2, **long_run)
    stages["sft"]["compute"] = {"processes": 2}
    spec = tmp_path / "mpr.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def command(home: Path) -> list[str]:
        return [sys.executable, "-m", "cli.app", "run", str(spec), "--home", str(home)]

    returncode, output = _run_in_own_group(command(tmp_path / "a"), env)
    assert returncode == 0, output[-6000:]
    _check_one_version_and_one_curve(tmp_path / "a", "mpr", steps=long_run["max_steps"], every=5)
    returncode, output = _run_in_own_group(command(tmp_path / "a"), env)
    assert returncode == 0 and "cached" in output, output[-6000:]
    _check_one_version_and_one_curve(tmp_path / "a", "mpr", steps=long_run["max_steps"], every=5)

    home = tmp_path / "b"
    # the ranks hold after the first checkpoint (tests/hold_after_first_checkpoint.py): the kill lands
    # before the stage's end however loaded the machine is
    from tests.hold_after_first_checkpoint import STAGE_VARIABLE, write_sitecustomize

    hooks = write_sitecustomize(tmp_path / "hold")
    held = {**env, STAGE_VARIABLE: "sft", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(hooks), str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    process = subprocess.Popen(command(home), env=held, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not list((home / "work").glob("sft-*/checkpoints/step-*/trainer_state.json")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the end"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    job = next((home / "work").glob("sft-*/multiprocess/job.json"))
    deadline = time.monotonic() + 10  # the ranks die with their launcher: within a moment
    while ranks := subprocess.run(["pgrep", "-f", str(job)], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, f"ranks outlived the killed pipeline: {ranks}"
        time.sleep(0.1)
    assert not list((home / "work").glob("sft-*/model"))

    returncode, output = _run_in_own_group(command(home), env)
    assert returncode == 0, output[-6000:]
    assert "resumed_from_step" in output
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry too: not the last test's
    assert len(client.search_model_versions("name='mpr-sft'")) == 1
    a, b = (next((h / "work").glob("sft-*/model")) / "model.safetensors" for h in (tmp_path / "a", home))
    assert _max_diff(load_file(a), load_file(b)) <= 1e-5


def test_kinds_that_train_in_one_process_refuse_several(tmp_path):
    from rlhf_core.errors import UserError
    from rlhf_core.spec import STAGE_CLASSES
    from runtime.multiprocess import check_multiprocess_stage
    from runtime.stage_contract import StageCall

    def call(kind: str, **fields) -> StageCall:
        stage = STAGE_CLASSES[kind].model_validate({"kind": kind, **fields})
        return StageCall(name="s", kind=kind, stage=stage, seed=0, fingerprint="f")

    two = {"processes": 2}
    sampling = call("sample", policy="p", prompts="d.prompts", rewards=[{"function": "arithmetic_exact"}],
                    compute=two)  # fmt: skip
    with pytest.raises(UserError, match=r"stage .s., compute.processes: 2: a sample stage runs in"):
        check_multiprocess_stage(sampling)
    check_multiprocess_stage(call("sft", model="m", data="d.sft", compute=two))
    grpo = call("policy_gradient", algorithm="grpo", policy="p", prompts="d.prompts",
                rewards=[{"function": "arithmetic_exact"}], compute=two)  # fmt: skip
    check_multiprocess_stage(grpo)  # on-policy RL trains data-parallel too
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 2\n")
    sft = call("sft", model="m", data="d.sft", compute={**two, "accelerate_config": str(fsdp)})
    with pytest.raises(UserError, match="selects FSDP version 1; the trainers support data parallelism"):
        check_multiprocess_stage(sft)
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n")
    check_multiprocess_stage(sft)  # FSDP2 trains


def test_launch_command_is_accelerates_multi_process_launch_with_explicit_settings(tmp_path):
    from rlhf_core.spec.compute import ComputeSpec
    from runtime.multiprocess import launch_command

    job = tmp_path / "job.json"
    cpu = launch_command(ComputeSpec(processes=2), job, 40001, gpu=False)
    assert cpu[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cpu and "--cpu" not in cpu  # --cpu would start one process
    assert cpu[cpu.index("--num_processes") + 1] == "2"
    assert cpu[cpu.index("--main_process_port") + 1] == "40001"
    assert cpu[-3:] == ["-m", "runtime.multiprocess", str(job)]
    assert "--num_cpu_threads_per_process" not in launch_command(ComputeSpec(processes=4), job, 1, gpu=True)
    config = launch_command(ComputeSpec(processes=4, accelerate_config="ddp.yaml"), job, 1, gpu=True)
    assert config[3:5] == ["--config_file", "ddp.yaml"] and "--multi_gpu" not in config
    assert config[config.index("--num_processes") + 1] == "4"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals are Linux's")
def test_a_rank_dies_with_its_launcher(tmp_path):
    """The launcher starts each rank in its own session, out of reach of a kill of the stage's process
    group; a rank whose launcher is SIGKILLed must not train on next to a resumed run."""
    import signal
    import time

    pid_file = tmp_path / "rank.pid"
    rank = f"import os, time; from runtime.multiprocess import _die_with_launcher as d; d(); " \
           f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"  # fmt: skip
    launcher = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}], "
                "start_new_session=True); time.sleep(120)")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the rank did not start"
            time.sleep(0.1)
        rank_pid = int(pid_file.read_text())
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while _alive(rank_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(rank_pid), "the rank outlived its launcher"
    finally:
        if process.poll() is None:
            process.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])


def test_a_rank_leaves_its_process_group_before_exiting():
    """A rank destroys its gloo group on the way out (no other rank needed): one left up at exit could
    abort the process during interpreter teardown (runtime.multiprocess.exit_rank)."""
    import torch.distributed as dist

    from runtime.multiprocess import leave_process_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        leave_process_group()
        assert not dist.is_initialized()
        leave_process_group()  # nothing to leave: a no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_finished_rank_flushes_its_output_and_exits_without_teardown():
    """``exit_rank``: the group is left, what the rank printed or logged reaches its stream, the exit
    status is the one given, and no exit handler runs (interpreter teardown, where a native thread still
    joinable aborts the process, is skipped)."""
    script = """
import atexit, logging, sys
import torch.distributed as dist
from runtime.multiprocess import exit_rank
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
atexit.register(lambda: print("teardown ran", flush=True))
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
logging.info("a logged line")
print("unflushed tail", end="")
exit_rank(3)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "a logged line\nunflushed tail", done.stdout
