"""The worker advice ``rlhf pools create`` prints follows the pool's purpose, as docs/scaling.md says:
GPU pools (a concurrency limit) get one worker per GPU with ``--limit 1``; a shared pool (no limit,
where the pipeline's own flow may wait for its stages) gets workers without ``--limit``."""

from __future__ import annotations

from cli.pool_commands import worker_hint


def test_a_shared_pool_gets_no_limit_advice():
    for pool_type in ("process", "docker"):
        hint = worker_hint(pool_type, "cpu", None)
        assert "--limit" not in hint.split("#")[0], hint
        assert "prefect worker start --pool cpu" in hint


def test_a_gpu_pool_gets_one_worker_per_gpu_with_limit_1():
    hint = worker_hint("process", "gpu", 2)
    assert hint.startswith("CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --limit 1")
    assert "2 in all" in hint
    docker = worker_hint("docker", "gpu0", 1)
    assert "pip install 'prefect-docker>=0.7'" in docker
    assert "prefect worker start --pool gpu0 --type docker --limit 1" in docker


def test_kubernetes_workers_need_no_limit():
    hint = worker_hint("kubernetes", "k8s-gpu", None)
    assert "prefect worker start --pool k8s-gpu --type kubernetes" in hint and "--limit" not in hint
