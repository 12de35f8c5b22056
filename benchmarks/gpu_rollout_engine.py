"""Rollout engines on a GPU: vLLM colocated vs the native loop vs ``model.generate``, on a ~0.5B model.

A prepared script for a lent GPU machine (H100 / H200) with no hub and no internet access, so the
model is random-init with a real architecture: a Llama-shaped decoder of ~0.50B parameters (hidden
1024, 24 layers, 16 heads of 64, 8 KV heads, MLP 4864, vocabulary 32,000 from a byte-level BPE
tokenizer trained here in ~1 s on a synthetic corpus). Random weights sample near-uniform tokens, so
completions rarely stop at EOS: the workload is close to its nominal size. It measures

1. sampling new tokens/s, bf16, P prompts x n samples x max_new_tokens (default 512 x 8 x 512):
   ``vllm`` (a server on the same GPU, ``gpu_memory_utilization`` capped so the trainer fits beside
   it; start-up timed apart) vs ``native`` vs ``transformers`` (``model.generate``), temperature 1;
2. GRPO steps (``rollout_loop.grpo_step``; fp32 master weights, bf16 autocast, AdamW) with the time
   split: generation, release (the engine's sleep), reward, scoring (no-grad log-probs), update,
   weight sync; with the vLLM engine and with the native loop. The first step is a warm-up.

Each part is guarded: a failing part is recorded in the JSON with its error and the rest still runs.

    benchmarks/gpu_rollout_engine.sh                 # sets up both environments, then runs this
    python benchmarks/gpu_rollout_engine.py --smoke  # CPU, tiny shapes: checks the script end to end

Writes the JSON to ``--out`` (default ``$OUT/gpu_rollout_engine.json``, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout_loop import StepSettings, grpo_step, sample_with  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# hidden, layers, heads, kv heads, MLP, vocabulary; the smoke shape keeps head size 32 for vLLM on CPU
FULL_SHAPE = (1024, 24, 16, 8, 4864, 32000)
SMOKE_SHAPE = (128, 2, 4, 2, 256, 1024)
TASK = {"max_operand": 20, "operations": ("+", "-")}


def build_policy(shape: tuple[int, ...], seed: int = 0):
    """A random-init Llama-shaped policy (fp32, on DEVICE) and its locally trained tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_core.data.synthetic import arithmetic_corpus
    from rlhf_core.modeling.tokenizer import train_bpe_tokenizer

    hidden, layers, heads, kv_heads, mlp, vocab = shape
    rng = random.Random(seed)  # random letter words give BPE enough distinct merges to fill the vocabulary
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(60000)
    ]
    corpus = arithmetic_corpus(n=2000, seed=seed) + [
        " ".join(words[i : i + 20]) for i in range(0, len(words), 20)
    ]
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with DEVICE:
        model = LlamaForCausalLM(config)
    for holder in (model.generation_config, model.config):
        holder.eos_token_id, holder.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model.eval(), tokenizer


def prompt_texts(count: int, seed: int) -> list[str]:
    from rlhf_core.data.synthetic import synthetic_records

    return [r["prompt"] for r in synthetic_records("arithmetic", "prompts", n=count, seed=seed, **TASK)]


def weights_root(model: torch.nn.Module) -> Path | None:
    """/dev/shm when it has room for three copies of the fp32 weights (containers often give it 64 MB),
    else the default temporary directory (disk)."""
    need = 3 * sum(p.numel() * 4 for p in model.parameters())
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and shutil.disk_usage(shm).free > need else None


def start_engine(policy, tokenizer, args, log_dir: Path):
    """The vLLM engine on the policy's weights (started; its start-up seconds)."""
    from rlhf_core.rollout.engines.vllm_engine import VLLMEngine
    from rlhf_core.rollout.engines.vllm_environment import require_vllm_python
    from rlhf_core.rollout.engines.vllm_server import ServerSettings

    sleeps = args.sleep and CUDA  # vLLM's sleep mode frees nothing on CPU
    settings = ServerSettings(
        dtype="bfloat16" if CUDA else "float32", max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager or not CUDA,
        gpu_memory_utilization=args.gpu_memory_utilization if CUDA else None,
        enable_sleep_mode=sleeps, cpu_threads=None if CUDA else 1, startup_timeout_s=600,
    )  # fmt: skip
    engine = VLLMEngine(
        policy, tokenizer, require_vllm_python("gpu benchmark"), settings, what="gpu benchmark, engine vllm",
        log_path=log_dir / "vllm.log", sleeps=sleeps,
        weights_root=weights_root(policy) if CUDA else log_dir,  # a CPU host's /dev/shm may be shared
    )  # fmt: skip
    started = time.perf_counter()
    engine.__enter__()
    return engine, time.perf_counter() - started


def measure_sampling(policy, tokenizer, engine, args) -> dict:
    """new tokens/s per engine; native and transformers decode a bf16 copy of the policy (GPU)."""
    prompts = prompt_texts(args.prompts, seed=1)
    model = _inference_copy(policy)
    out: dict = {}
    for name in args.engines:
        kwargs = dict(
            n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.batch_size,
            vllm_engine=engine,
        )  # fmt: skip
        try:
            sample_with(name, model, tokenizer, prompts[: args.warmup_prompts], seed=10_000, **kwargs)
            runs = []
            for repeat in range(args.repeats):
                s = sample_with(name, model, tokenizer, prompts, seed=repeat, **kwargs)
                runs.append({"new_tokens": s.new_tokens, "sequences": s.sequences, "seconds": s.seconds,
                             "new_tokens_per_second": s.new_tokens / s.seconds})  # fmt: skip
                print(f"sampling {name:12} {runs[-1]['new_tokens_per_second']:10.0f} new tok/s "
                      f"({s.new_tokens} tokens in {s.seconds:.1f} s)", flush=True)  # fmt: skip
            out[name] = {
                "runs": runs,
                "best_new_tokens_per_second": max(r["new_tokens_per_second"] for r in runs),
            }
        except Exception as error:  # noqa: BLE001 - one failing engine must not lose the others' numbers
            out[name] = failure(error)
        if CUDA:
            torch.cuda.empty_cache()
    best = {k: v.get("best_new_tokens_per_second") for k, v in out.items()}
    for name in ("vllm", "transformers"):
        if best.get(name) and best.get("native"):
            out[f"{name}_over_native"] = best[name] / best["native"]
    del model
    return out


def _inference_copy(policy):
    """The policy's weights in bf16 on the GPU (fp32 on CPU), for the in-process sampling contenders."""
    import copy

    model = copy.deepcopy(policy)
    return model.to(torch.bfloat16).eval() if CUDA else model.eval()


def measure_grpo(policy, tokenizer, engine, args) -> dict:
    from rlhf_core.rollout.token_scoring import encode_prompts

    prompts = encode_prompts(tokenizer, prompt_texts(args.grpo_prompts * args.grpo_steps, seed=2))
    settings = StepSettings(
        group_size=args.group_size, max_new_tokens=args.grpo_max_new_tokens, temperature=1.0,
        batch_size=args.batch_size, micro_batch=args.micro_batch, score=True, autocast_bf16=CUDA,
    )  # fmt: skip
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    out: dict = {}
    for name in [e for e in ("vllm", "native") if e in args.engines]:
        try:
            policy.load_state_dict(initial)
            if name == "vllm":
                engine.sync_weights()
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
            steps = []
            for step in range(args.grpo_steps):
                batch = prompts[step * args.grpo_prompts : (step + 1) * args.grpo_prompts]
                times, new_tokens = grpo_step(
                    policy, optimizer, tokenizer, batch, settings, seed=step,
                    engine=engine if name == "vllm" else None,
                )  # fmt: skip
                total = sum(times.values())
                steps.append({"step": step, "seconds": total, "new_tokens": new_tokens, "split_s": times,
                              "completions_per_second": len(batch) * args.group_size / total})  # fmt: skip
                print(f"grpo {name:6} step {step}: {total:.1f} s "
                      + " ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)  # fmt: skip
            timed = steps[1:] or steps
            last = timed[-1]
            out[name] = {"steps": steps, "timed_step": last,
                         "shares": {k: v / last["seconds"] for k, v in last["split_s"].items()}}  # fmt: skip
            del optimizer
        except Exception as error:  # noqa: BLE001
            out[name] = failure(error)
        if CUDA:
            torch.cuda.empty_cache()
    return out


def failure(error: BaseException) -> dict:
    print(f"FAILED: {error!r}", flush=True)
    return {"error": repr(error)[:4000], "traceback": traceback.format_exc()[-4000:]}


def versions(engine_python: str | None) -> dict:
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if engine_python:
        probe = (
            "import vllm, torch, transformers as t; print(vllm.__version__, torch.__version__, t.__version__)"
        )
        result = subprocess.run([engine_python, "-c", probe], capture_output=True, text=True)
        parts = result.stdout.split()
        found["engine"] = (
            dict(zip(("vllm", "torch", "transformers"), parts, strict=False)) or result.stderr[-500:]
        )
    return found


def smoke_settings(args: argparse.Namespace) -> None:
    """Tiny shapes that exercise every path on a CPU in about a minute."""
    args.prompts, args.n, args.max_new_tokens, args.batch_size, args.warmup_prompts = 4, 2, 16, 8, 2
    args.grpo_prompts, args.group_size, args.grpo_max_new_tokens, args.grpo_steps = 2, 4, 16, 2
    args.max_model_len, args.repeats = 128, 1


def main(args: argparse.Namespace) -> dict:
    if args.smoke:
        smoke_settings(args)
        torch.set_num_threads(1)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": versions(os.environ.get("RLHF_VLLM_PYTHON") if "vllm" in args.engines else None),
    }
    started = time.perf_counter()
    policy, tokenizer = build_policy(SMOKE_SHAPE if args.smoke else FULL_SHAPE)
    report["model"] = {
        "parameters": sum(p.numel() for p in policy.parameters()), "vocab": len(tokenizer),
        "config": policy.config.to_diff_dict(), "build_s": time.perf_counter() - started,
    }  # fmt: skip
    print(f"model: {report['model']['parameters'] / 1e9:.3f}B parameters, vocab {len(tokenizer)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-rollout-") as tmp:
        engine = None
        if "vllm" in args.engines:
            try:
                engine, report["vllm_startup_s"] = start_engine(policy, tokenizer, args, Path(tmp))
                print(f"vllm started in {report['vllm_startup_s']:.1f} s", flush=True)
            except Exception as error:  # noqa: BLE001
                report["vllm_startup"] = failure(error)
                args.engines = [e for e in args.engines if e != "vllm"]
        try:
            report["sampling"] = measure_sampling(policy, tokenizer, engine, args)
            report["grpo"] = measure_grpo(policy, tokenizer, engine, args)
        finally:
            if engine is not None:
                engine.close()
    if CUDA:
        report["peak_gpu_memory_gib_trainer"] = torch.cuda.max_memory_allocated() / 2**30
    report["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return report


def default_out() -> Path:
    folder = os.environ.get("OUT")
    return (Path(folder) if folder else Path(__file__).parent / "results") / "gpu_rollout_engine.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="Tiny shapes on CPU: checks the script runs.")
    p.add_argument("--out", type=Path, default=default_out())
    p.add_argument("--engines", nargs="+", default=["vllm", "native", "transformers"],
                   choices=["vllm", "native", "transformers"])  # fmt: skip
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--n", type=int, default=8, help="Samples per prompt.")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument(
        "--batch-size", type=int, default=1024, help="Sequences decoded together (native, generate)."
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="Timed sampling runs per engine (best is reported)."
    )
    p.add_argument("--warmup-prompts", type=int, default=16, help="Prompts of the untimed first call.")
    p.add_argument("--grpo-prompts", type=int, default=64, help="Prompts per GRPO step (P).")
    p.add_argument("--group-size", type=int, default=8, help="Completions per prompt (G).")
    p.add_argument("--grpo-max-new-tokens", type=int, default=512)
    p.add_argument("--grpo-steps", type=int, default=2, help="Steps per engine; the first is a warm-up.")
    p.add_argument("--micro-batch", type=int, default=2, help="Prompt groups per update forward/backward.")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share of the GPU.")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs / torch.compile.")
    p.add_argument("--no-sleep", dest="sleep", action="store_false",
                   help="Keep the engine awake during the update (default: sleep, level 2).")  # fmt: skip
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
