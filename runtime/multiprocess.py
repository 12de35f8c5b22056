"""A stage's training in ``compute.processes`` processes, launched by ``accelerate launch``.

The stage's task runs as usual up to its body (check, cache, lock, the MLflow stage run:
``execute_stage``). There, instead of calling the body, :func:`run_in_processes`:

1. downloads the stage's inputs once (the ranks then find them in the home's cache);
2. writes a job file: the run context, the stage call (inputs as refs), the body's name
   (``module:function``) and the MLflow run to write to;
3. launches ``python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m runtime.multiprocess
   <job>``: NCCL on a GPU machine, gloo on CPU (``ACCELERATE_USE_CPU=true``; accelerate's ``--cpu`` would
   start one process only), or the user's ``compute.accelerate_config``;
4. forwards the ranks' output to the stage's log and, when the launch fails, raises an error naming
   the stage with the last lines of that output;
5. reads the outputs (refs) that the main rank wrote.

Each rank (:func:`main`) calls the stage's body (named in the job as ``module:function``) directly with
a ``StageRun`` built from the job, on the job's MLflow run. The trainers share each step
between the ranks (``rlhf_core.training.engine.data_parallel``); once training is done the other ranks stop
(``OtherRankFinished``) and the main rank alone evaluates, saves, registers and logs, so a stage
registers exactly one model version however many processes trained it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import BaseModel, Field, TypeAdapter

from rlhf_core.child_processes import free_port, parent_death_signal
from rlhf_core.errors import UserError
from rlhf_core.refs import DatasetRef, ModelRef, StageOutput
from rlhf_core.spec import STAGE_CLASSES
from rlhf_core.spec.compute import ComputeSpec
from runtime.stage_contract import (
    STEP_LOG_MARK,
    RunContext,
    StageBody,
    StageCall,
    StageOutcome,
    StageRun,
    stage_logger,
)

SUPPORTED_KINDS = tuple(kind for kind, spec in STAGE_CLASSES.items() if spec.trains_in_processes)
"""Kinds whose trainers share steps across ranks, as their spec classes declare (``trains_in_processes``)."""
# see training/engine/data_parallel.py; FSDP with fsdp_version 2 is supported (training/engine/loop.py)
UNSUPPORTED_DISTRIBUTED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")
JOB_FILE = "job.json"
OUTPUT_FILE = "outputs.json"
LOG_TAIL = 40  # lines of the ranks' output quoted in a launch failure
REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = TypeAdapter(dict[str, StageOutput])


class MultiProcessLaunchError(RuntimeError):
    """The accelerate launch of a stage's training processes failed."""


class RankJob(BaseModel):
    """What every rank needs to run one stage's body: written by the parent, read by each rank."""

    context: RunContext
    name: str
    kind: str
    stage: dict = Field(description="The stage's spec as JSON (rebuilt from its kind).")
    seed: int
    fingerprint: str
    inputs: dict[str, StageOutput] = Field(default_factory=dict)
    fingerprint_parts: dict[str, str] = Field(default_factory=dict)
    body: str = Field(description="The stage kind's body, 'module:function' (a top-level function).")
    run_id: str = Field(description="The stage's MLflow run, opened by the parent.")
    work_dir: str
    resumed: bool
    output_file: str

    @classmethod
    def of(
        cls, ctx: RunContext, call: StageCall, run: StageRun, body: StageBody, output_file: Path
    ) -> RankJob:
        if "<locals>" in body.__qualname__:
            raise TypeError(f"stage '{call.name}': a rank cannot import the body {body.__qualname__}")
        return cls(
            context=ctx, name=call.name, kind=call.kind, stage=call.stage.model_dump(mode="json"),
            seed=call.seed, fingerprint=call.fingerprint, inputs=call.inputs,
            fingerprint_parts=call.fingerprint_parts, body=f"{body.__module__}:{body.__qualname__}",
            run_id=run.run_id, work_dir=str(run.work_dir), resumed=run.resumed, output_file=str(output_file),
        )  # fmt: skip

    def stage_body(self) -> StageBody:
        """The stage kind's body, imported by its name."""
        import importlib

        module, _, name = self.body.partition(":")
        return getattr(importlib.import_module(module), name)

    def call(self) -> StageCall:
        from rlhf_core.spec import STAGE_CLASSES

        return StageCall(
            name=self.name, kind=self.kind, stage=STAGE_CLASSES[self.kind].model_validate(self.stage),
            seed=self.seed, fingerprint=self.fingerprint, inputs=self.inputs,
            fingerprint_parts=self.fingerprint_parts,
        )  # fmt: skip

    def run_body(self, call: StageCall, body: StageBody) -> StageOutcome:
        """In a rank: the body on the job's MLflow run; the main rank writes the outputs for the parent."""
        if call.fingerprint != self.fingerprint:
            raise RuntimeError(f"rank job is for {self.name} {self.fingerprint[:12]}, not {call.name}")
        run = StageRun(
            call.name, self.run_id, call.fingerprint, Path(self.work_dir), self.resumed,
            self.context.settings(), self.context, kind=call.kind,
        )  # fmt: skip
        outputs = body(call, run)  # the other ranks leave with OtherRankFinished after training
        record = {
            "outputs": {name: ref.model_dump(mode="json") for name, ref in outputs.items()},
            "key_metrics": run.key_metrics,
            "registered": run.registered,
        }
        tmp = Path(self.output_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.output_file)
        return StageOutcome(
            stage=call.name, kind=call.kind, status="resumed" if self.resumed else "ran",
            fingerprint=call.fingerprint, run_id=self.run_id, outputs=outputs, metrics=run.key_metrics,
            registered=run.registered,
        )  # fmt: skip


def check_multiprocess_stage(call: StageCall) -> None:
    """UserError naming the stage and ``compute.processes`` when its kind or settings cannot train in
    several processes."""
    compute = call.stage.compute
    where = f"stage '{call.name}', compute.processes: {compute.processes}"
    if call.kind not in SUPPORTED_KINDS:
        raise UserError(
            f"{where}: a {call.kind} stage runs in one process; several training processes are supported "
            f"for {', '.join(SUPPORTED_KINDS)}. Set compute.processes to 1."
        )
    if getattr(call.stage, "monitor", None) is not None:
        raise UserError(f"{where}: the over-optimization monitor runs in one process; remove one of them")
    if compute.accelerate_config is not None:
        config = Path(compute.accelerate_config)
        if not config.is_file():
            raise UserError(f"{where}: compute.accelerate_config {config} is not a file")
        import yaml

        try:
            settings = yaml.safe_load(config.read_text()) or {}
            kind = str(settings.get("distributed_type", ""))
            fsdp_version = str((settings.get("fsdp_config") or {}).get("fsdp_version", 1))
        except (yaml.YAMLError, AttributeError) as exc:
            raise UserError(f"{where}: {config} is not an accelerate config file: {exc}") from None
        if kind.upper() == "FSDP" and fsdp_version == "2":
            return  # FSDP2: the loop runs each loss inside the FSDP root's forward (training/engine/loop.py)
        if kind.upper() in UNSUPPORTED_DISTRIBUTED_TYPES:
            raise UserError(
                f"{where}: compute.accelerate_config {config} selects {kind}"
                f"{' version ' + fsdp_version if kind.upper() == 'FSDP' else ''}; the trainers support data "
                "parallelism (distributed_type MULTI_GPU or MULTI_CPU) and FSDP2 (distributed_type FSDP "
                "with fsdp_config.fsdp_version: 2): their losses call the backbone and LM head directly, "
                "which FSDP1 and DeepSpeed wrappers do not see"
            )


def run_in_processes(
    ctx: RunContext, call: StageCall, run: StageRun, body: StageBody
) -> dict[str, StageOutput]:
    """Run the stage's ``body`` in ``compute.processes`` processes (see the module docstring)."""
    check_multiprocess_stage(call)
    _materialize_inputs(run, call.inputs)
    job_dir = run.work_dir / "multiprocess"
    job_dir.mkdir(parents=True, exist_ok=True)
    output_file = job_dir / OUTPUT_FILE
    output_file.unlink(missing_ok=True)  # never read a previous attempt's outputs
    job_file = job_dir / JOB_FILE
    job_file.write_text(RankJob.of(ctx, call, run, body, output_file).model_dump_json())

    import torch  # the stage trains anyway; only asked whether there is a GPU

    gpu = torch.cuda.is_available()
    command = launch_command(call.stage.compute, job_file, free_port(), gpu=gpu)
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # compute.env reaches the ranks (e.g. CUDA_VISIBLE_DEVICES for the GPUs they may use)
    env = {**os.environ, **call.stage.compute.env, "PYTHONPATH": path}
    if not gpu:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo ranks on CPU
    processes = call.stage.compute.processes
    launch = " ".join(command)
    stage_logger().info("stage %s: launching %d training processes: %s", call.name, processes, launch)
    returncode, tail = _run_streaming(command, env, call.name)
    if returncode != 0:
        raise MultiProcessLaunchError(
            f"stage '{call.name}': its {call.stage.compute.processes} training processes (accelerate "
            f"launch) failed with exit status {returncode}; the last lines of their output:\n"
            + "\n".join(tail)
        )
    if not output_file.exists():
        raise MultiProcessLaunchError(f"stage '{call.name}': the training processes wrote no outputs")
    record = json.loads(output_file.read_text())
    run.key_metrics = record["key_metrics"]
    run.registered = record["registered"]
    return OUTPUTS.validate_python(record["outputs"])


def launch_command(compute: ComputeSpec, job_file: Path, port: int, *, gpu: bool) -> list[str]:
    """The ``accelerate launch`` command line of a stage's processes.

    Every setting is explicit (or comes from ``compute.accelerate_config``), so a user's default
    accelerate config never applies by surprise; the port is a free one (29500 may be taken).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if compute.accelerate_config is not None:
        command += ["--config_file", str(compute.accelerate_config)]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not gpu:  # the machine's cores shared between the ranks
            threads = max(1, (os.cpu_count() or 1) // compute.processes)
            command += ["--num_cpu_threads_per_process", str(threads)]
    command += ["--num_processes", str(compute.processes), "--main_process_port", str(port)]
    return [*command, "-m", "runtime.multiprocess", str(job_file)]


def _materialize_inputs(run: StageRun, inputs: dict[str, StageOutput]) -> None:
    """Download the stage's models and datasets into the home's cache once, before the ranks start
    (the download is not safe for several processes at once)."""
    from registry.datasets import materialize_dataset

    for ref in inputs.values():
        if isinstance(ref, ModelRef):
            run.model_dir(ref)
        elif isinstance(ref, DatasetRef):
            materialize_dataset(ref, run.settings.resolved_home() / "cache" / "datasets")


def _run_streaming(command: list[str], env: dict[str, str], stage: str) -> tuple[int, list[str]]:
    """Run the launcher, forwarding its output line by line to the stage's log; (exit status, tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
    logger = stage_logger()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
        # SIGTERM when the stage's process dies (even by SIGKILL); the launcher passes it on to its ranks,
        # so no orphaned training keeps writing to the stage's run
        preexec_fn=parent_death_signal(),
    )  # fmt: skip
    try:
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            # marked like step lines: in the Prefect log, kept off a terminal's live view
            logger.info("%s | %s", stage, line, extra={STEP_LOG_MARK: True})
        return process.wait(), list(tail)
    finally:
        if process.poll() is None:  # the parent was interrupted: the launcher stops its ranks on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_launcher() -> None:
    """The launcher starts each rank in a session of its own, which a kill of the stage's process group
    does not reach: a rank asks for SIGKILL when the launcher dies, so no orphaned rank trains on
    (and writes checkpoints and MLflow metrics) next to a resumed run."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the request took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> NoReturn:
    """A rank: run the stage kind's body on the job's MLflow run (the parent opened it, and records it).

    A rank that finished ends with :func:`exit_rank`, not by returning: see there why."""
    _die_with_launcher()
    import faulthandler
    import logging

    import torch
    from accelerate import PartialState

    from rlhf_core.training.engine.data_parallel import OtherRankFinished

    faulthandler.enable()  # a rank killed by a fatal signal prints every thread's Python stack first
    (job_path,) = argv if argv is not None else sys.argv[1:]
    job = RankJob.model_validate_json(Path(job_path).read_text())
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group (gloo or NCCL)
    # force: importing Prefect configured the root logger; the stage's step lines must reach the parent
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {state.process_index}] %(levelname)s %(message)s", force=True
    )
    with contextlib.suppress(OtherRankFinished):  # the other ranks leave once training is done
        job.run_body(job.call(), job.stage_body())
    exit_rank()


def leave_process_group() -> None:
    """Shut this rank's process group down (no other rank needed: it is not a collective)."""
    import gc

    import torch.distributed as dist

    gc.collect()  # the wrapped model and its reducer hold the group: let them go first
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(status: int = 0) -> NoReturn:
    """End a rank that has done its part: leave the process group, flush, and exit without interpreter
    teardown.

    A rank that exits while another rank still has the gloo group up (the other ranks leave as soon as
    training is done, while the main one evaluates, saves and registers) can die at exit with SIGABRT,
    "terminate called without an active exception" and no traceback: a native thread (of the group,
    of a thread pool) is still joinable when teardown destroys it, and the launcher then kills the main
    rank too. Measured with 2 gloo ranks, one leaving 2 s before the other: the first to leave aborted
    in 2 launches of 18; with the group destroyed first, in none of 19 -- but a 2-process ``rlhf run``
    still aborted once in a full test run. Nothing a rank owns needs teardown (the parent owns the MLflow
    run and reads the outputs file, written and closed before this), so the rank skips it: its streams
    and log handlers are flushed, then ``os._exit``.
    """
    import logging

    leave_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
