"""Sharded training (accelerate FSDP2: ``fsdp_version: 2``, full shard, one unit per decoder layer) on CPU.

1. Same curve: SFT, reward model and DPO run by 2 gloo ranks under an FSDP2 accelerate config log the
   loss curve of 1 process and end at the same weights (the tolerances of the data-parallel test),
   returned as a plain, unsharded model on the main rank. 3 micro-batches per step: one rank runs a
   zero-weighted repeat so both run as many passes. SFT in bf16 autocast too (2 micro-batches on one
   rank: the case where a weight cast autocast cached across micro-batches lost gradient under FSDP).
2. Resume: a sharded run killed after a checkpoint and run again ends where an uninterrupted sharded
   run does.
3. Equal passes: under sharding every rank gets ceil(n / world) micro-batches, its own share plus
   zero-weighted repeats; each real micro-batch goes to exactly one rank.
4. End to end: ``rlhf run`` with the FSDP2 config in the sft stage's ``compute`` trains sharded and
   registers one version.

The ranks run this file (``accelerate launch --config_file <the FSDP2 config below> <this file> ...``),
with the trainers, data and settings of ``tests/test_multiprocess_training.py``. Each rank uses one torch
thread.
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
from rlhf_core.stage_environment import StageEnvironment
from tests.test_multiprocess_training import (
    LOSS_RTOL,
    SFT_CFG,
    SFT_STAGE,
    WEIGHT_ATOL,
    _initial_weights,
    _load,
    _max_diff,
    _rank_errors,
    _rank_main,
    _train,
    launch_ranks,
    launched,
)

BF16_SFT_CFG = SFT_CFG.model_copy(update={"precision": "bf16"})
BF16_SFT_STAGE = SFT_STAGE.model_copy(update={"train": BF16_SFT_CFG})
KINDS = "sft,reward_model,direct_alignment,sft_bf16"
FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""


def _train_kind(kind: str, policy_dir: str, work: Path, stop_after: int | None = None):
    """``_train`` of the data-parallel test, plus ``sft_bf16``: its SFT in bf16 autocast."""
    if kind != "sft_bf16":
        return _train(kind, policy_dir, work, stop_after)
    from rlhf_core.training.sft.trainer import SFTInputs, supervised_fine_tune

    curve: list[float] = []

    def log(metrics: dict[str, float], step: int) -> None:
        if "train/loss" in metrics:
            curve.append(metrics["train/loss"])

    records = synthetic_records("arithmetic", "sft", n=24, seed=0)
    env = StageEnvironment(kind, 0, work, work / "cache", work / "ckpt", log=log)
    model = supervised_fine_tune(BF16_SFT_STAGE, SFTInputs(policy_dir, None, records), env).model
    return curve, model


def _launch(out: Path, policy_dir: str, kinds: str, stop_after: int = 0) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    return launch_ranks(__file__, ["--config_file", str(config)], out, policy_dir, kinds, stop_after)


@pytest.mark.parametrize("n, world", [(3, 2), (1, 2), (2, 3), (7, 4), (4, 2)])
def test_balanced_share_gives_every_rank_as_many_passes_each_real_micro_batch_once(n, world, monkeypatch):
    from rlhf_core.training.engine import data_parallel

    items = list(range(n))
    shares = []
    for rank in range(world):
        monkeypatch.setattr(data_parallel, "rank_and_world", lambda rank=rank: (rank, world))
        shares.append(data_parallel.balanced_share(items, equal_passes=True))
    assert {len(share) for share in shares} == {-(-n // world)}  # the same number of passes everywhere
    assert sorted(item for share in shares for item, counts in share if counts) == items  # each once
    assert all(item == items[0] for share in shares for item, counts in share if not counts)
    # not sharded: the plain share (here of rank world - 1)
    last = [item for item, counts in data_parallel.balanced_share(items) if counts]
    assert last == items[world - 1 :: world]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    """Two decoder layers: two layer units plus the root's (embeddings, final norm, head)."""
    from rlhf_core.modeling.models import build_tiny_model, save_model
    from rlhf_core.spec import TinyModelSource

    model, tokenizer = build_tiny_model(TinyModelSource(hidden_size=32, layers=2, heads=2, vocab_size=320), 0)
    return str(save_model(model, tokenizer, tmp_path_factory.mktemp("policy") / "model"))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, policy_dir) -> Path:
    return launched(lambda: tmp_path_factory.mktemp("fsdp"), _launch, policy_dir, KINDS)


@pytest.mark.parametrize("kind", KINDS.split(","))
def test_fsdp2_gives_the_loss_curve_and_weights_of_one_process(kind, policy_dir, sharded_run, tmp_path):
    torch.set_num_threads(1)
    one_curve, one_model = _train_kind(kind, policy_dir, tmp_path / kind)
    one_weights = {k: v.detach() for k, v in one_model.state_dict().items()}
    two_curve, two_weights = _load(sharded_run, kind)
    assert len(two_curve) == len(one_curve) > 1
    worst_loss = max(abs(a - b) / abs(a) for a, b in zip(one_curve, two_curve, strict=True))
    worst_weight = _max_diff(one_weights, two_weights)
    print(f"{kind} (FSDP2): loss curves within {worst_loss:.2e} relative, weights within {worst_weight:.2e}")
    assert worst_loss <= LOSS_RTOL
    assert worst_weight <= WEIGHT_ATOL
    initial = _initial_weights(policy_dir, kind.removesuffix("_bf16"), one_weights)
    assert _max_diff(one_weights, initial) > 1e-3  # it trained


def test_fsdp2_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
    tmp_path, policy_dir, sharded_run
):
    out = tmp_path / "killed"
    killed = _launch(out, policy_dir, "sft", stop_after=3)  # step-2 checkpoint written, then rank 0 dies
    assert killed.returncode != 0
    work = out / "work" / "sft" / "ckpt"
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("step-")) == ["step-2"]
    state = json.loads((work / "step-2" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["sharded"] is True
    # FSDP's sharded layout (torch.distributed.checkpoint, one file per rank), not one model file
    assert sorted(p.name for p in (work / "step-2" / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    assert not (out / "sft.json").exists()

    resumed = _launch(out, policy_dir, "sft")
    assert resumed.returncode == 0, _rank_errors(resumed) + resumed.stderr[-3000:]
    curve, weights = _load(out, "sft")
    reference_curve, reference = _load(sharded_run, "sft")
    assert len(curve) == SFT_CFG.max_steps - 2
    assert _max_diff(weights, reference) <= 1e-5
    assert curve[-1] == pytest.approx(reference_curve[-1], rel=1e-6)


@pytest.mark.e2e
def test_rlhf_run_with_an_fsdp2_config_trains_sharded_and_registers_once(
    tmp_path, tiny_spec_dict, prefect_api_url
):
    """The user's path: ``compute: {processes: 2, accelerate_config: <FSDP2 config>}`` on the sft stage of
    a spec, through ``rlhf run``: the ranks write sharded checkpoints, one version is registered, the
    stage run is FINISHED with its whole curve."""
    import yaml
    from mlflow import MlflowClient

    from tests.test_multiprocess_training import _run_in_own_group

    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    tiny_spec_dict["name"] = "fsdp"
    stages = tiny_spec_dict["stages"]
    del stages["eval"], stages["rm"]
    stages["data"]["source"]["synthetic"]["n"] = 40
    stages["sft"]["train"].update(max_steps=4, batch_size=4, grad_accum=3, log_every=1, checkpoint_every=2)
    stages["sft"]["compute"] = {"processes": 2, "accelerate_config": str(config)}
    spec = tmp_path / "fsdp.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict))
    home = tmp_path / "home"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    returncode, output = _run_in_own_group([sys.executable, "-m", "cli.app", "run", str(spec), "--home",
                                            str(home)], env)  # fmt: skip
    assert returncode == 0, output[-6000:]
    assert "--config_file" in output and "pytorch_model_fsdp_0" in output  # accelerate's sharded checkpoint

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry too: not the last test's
    (version,) = client.search_model_versions("name='fsdp-sft'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]
    (model_dir,) = (home / "work").glob("sft-*/model")
    assert (model_dir / "model.safetensors").exists()  # a whole model, gathered from the shards


if __name__ == "__main__":
    _rank_main(*sys.argv[1:], train=_train_kind)
