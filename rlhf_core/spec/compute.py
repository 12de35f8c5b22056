"""Where a stage runs: its ``compute`` block, and named compute profiles that set it for a whole spec.

A stage runs in the pipeline's own process unless its ``compute`` names a Prefect work pool; then the
pipeline submits it to the stage-runner deployment of that pool (``flows.dispatch``) with the job
variables below. ``processes`` > 1 launches the stage's training through accelerate.

Nothing here is part of a stage's fingerprint: the same stage trained on a laptop or on a GPU pool is
the same result (``rlhf_core.fingerprint`` leaves ``compute`` out of the config digest), so a cluster
run reuses what a laptop run cached and the other way round.

A profile file (``profiles.yaml``) names compute settings for a whole spec, chosen with ``--profile``::

    profiles:
      gpu:
        all: {pool: cpu}                       # every stage
        kinds:                                 # stages of a kind
          sft: {pool: gpu, gpus: 1}
          policy_gradient: {pool: gpu, gpus: 1}
        stages:                                # one stage by name
          ppo: {processes: 2}

Precedence, field by field (later wins): the stage's own ``compute`` block, ``all``, ``kinds``,
``stages``. The built-in profile ``local`` runs every stage in the pipeline's process. Reading a profile
file and choosing a profile by name: :mod:`rlhf_core.spec.loading`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

POOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MEMORY_PATTERN = r"^\d+(\.\d+)?\s*([KMGT]i?|[kmgt]|[KMGT]B)?$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOCAL_PROFILE = "local"
PROFILE_FILE = "profiles.yaml"
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # NAME_PATTERN of rlhf_core.spec.base


class Strict(BaseModel):  # as rlhf_core.spec.base.Strict, which imports this module
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComputeSpec(Strict):
    """Where and how one stage runs. Every field is optional; unset fields take the profile's value."""

    pool: str | None = Field(
        default=None,
        pattern=POOL_PATTERN,
        description="Prefect work pool that runs the stage (a stage-runner deployment must exist there: "
        "rlhf deploy). Unset: the stage runs in the pipeline's own process.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Training processes of the stage, launched by accelerate (DDP; FSDP2 "
        "through accelerate_config). One GPU each on a GPU machine; gloo on CPU.",
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file (e.g. FSDP with fsdp_version 2) for processes > 1, as seen "
        "by the machine that runs the stage.",
    )
    gpus: int | None = Field(
        default=None,
        ge=0,
        description="GPUs the job asks its pool for (docker: device_requests; kubernetes: nvidia.com/gpu).",
    )
    memory: str | None = Field(
        default=None,
        pattern=MEMORY_PATTERN,
        description="Memory the job asks its pool for, e.g. '32Gi' (kubernetes) or '32g' (docker).",
    )
    image: str | None = Field(default=None, description="Container image (docker and kubernetes pools).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the job (e.g. CUDA_VISIBLE_DEVICES). Not for secrets: they would be "
        "stored with the deployment's runs; give secrets to the worker instead (scaling guide).",
    )
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Further job variables of the pool's base job template, passed as they are (they "
        "win over the fields above).",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="How often a job that crashed (killed worker, lost node) is submitted again; it "
        "resumes from its last checkpoint. A stage that raised an error is not retried.",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)}")
        return env

    def merged(self, override: ComputeSpec) -> ComputeSpec:
        """This block with every field that ``override`` sets explicitly taken from it (env merged)."""
        update = {name: getattr(override, name) for name in override.model_fields_set}
        if "env" in update:
            update["env"] = {**self.env, **override.env}
        if "job_variables" in update:
            update["job_variables"] = {**self.job_variables, **override.job_variables}
        fields_set = self.model_fields_set | override.model_fields_set
        merged = self.model_validate({**self.model_dump(), **update})
        object.__setattr__(merged, "__pydantic_fields_set__", set(fields_set))
        return merged

    @property
    def dispatched(self) -> bool:
        return self.pool is not None


class ComputeProfile(Strict):
    """One named profile: compute settings for every stage, per stage kind and per stage name."""

    description: str = ""
    all: ComputeSpec | None = Field(default=None, description="Applies to every stage.")
    kinds: dict[str, ComputeSpec] = Field(default_factory=dict, description="Stage kind -> settings.")
    stages: dict[str, ComputeSpec] = Field(default_factory=dict, description="Stage name -> settings.")
    pipeline_pool: str | None = Field(
        default=None,
        pattern=POOL_PATTERN,
        description="Work pool of the pipeline's own flow when it is deployed (rlhf deploy).",
    )

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, ComputeSpec]) -> dict[str, ComputeSpec]:
        bad = [name for name in stages if not STAGE_NAME.match(name)]
        if bad:
            raise ValueError(f"not stage names: {', '.join(bad)}")
        return stages


class ComputeProfiles(Strict):
    profiles: dict[str, ComputeProfile] = Field(default_factory=dict)


BUILTIN_PROFILES = {
    LOCAL_PROFILE: ComputeProfile(
        description="every stage in the pipeline's own process",
        all=ComputeSpec(pool=None, processes=1),
    )
}


def stage_compute(own: ComputeSpec | None, profile: ComputeProfile, stage: str, kind: str) -> ComputeSpec:
    """A stage's compute settings under ``profile`` (see the module docstring for the precedence)."""
    merged = own or ComputeSpec()
    for layer in (profile.all, profile.kinds.get(kind), profile.stages.get(stage)):
        if layer is not None:
            merged = merged.merged(layer)
    return merged
