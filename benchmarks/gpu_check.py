"""GPU check of the CUDA paths: SFT (fp32 and bf16 autocast), reward-model shared-prefix scoring and
training, and the native decoding loop against ``model.generate``.

Not a test (CI has no GPU) and not a tuned benchmark: one short script for a lent GPU machine that
shows the code runs on CUDA, gives the same numbers as the reference paths there, and how fast the
alternatives are relative to each other on that device. It needs only torch, transformers,
accelerate, tokenizers, pyyaml and pydantic (no Prefect or MLflow), so it runs on a bare GPU image.

    python3 benchmarks/gpu_check.py --out gpu_check.json

On a machine without the project's environment, pydantic (and its three small dependencies) can be
carried as wheels; everything else it imports is in a standard torch image. Results and a reading
of them: docs/benchmarks.md, section 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_core.data.synthetic import synthetic_records  # noqa: E402
from rlhf_core.evaluation.reward_model import evaluate_reward_model  # noqa: E402
from rlhf_core.modeling.models import build_tiny_model, save_model  # noqa: E402
from rlhf_core.modeling.preference_tokens import encode_completion, pad_batch  # noqa: E402
from rlhf_core.modeling.reward_model import build_reward_model  # noqa: E402
from rlhf_core.modeling.shared_prefix import pack_shared_prefix, score_shared_prefix  # noqa: E402
from rlhf_core.rewards.reward_model_scoring import score_sequences  # noqa: E402
from rlhf_core.rollout.generation import generate  # noqa: E402
from rlhf_core.spec import RewardTrainSpec, SFTTrainSpec, TinyModelSource  # noqa: E402
from rlhf_core.training.reward_model.trainer import train_reward_model  # noqa: E402
from rlhf_core.training.sft.trainer import train_sft  # noqa: E402

TASK = {"max_operand": 20, "operations": ("+", "-")}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to smoke-test this script


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize()
    return out, time.perf_counter() - start


def check_sft(source: TinyModelSource, work: Path, steps: int) -> tuple[dict, Path]:
    records = synthetic_records("arithmetic", "sft", n=4000, seed=0, **TASK)
    report, policy_dir = {}, None
    for precision in ("fp32", "bf16"):
        model, tokenizer = build_tiny_model(source, seed=0)
        losses: list[float] = []
        cfg = SFTTrainSpec(
            max_steps=steps, lr=1e-3, batch_size=32, max_length=128, log_every=1,
            checkpoint_every=steps, precision=precision,
        )  # fmt: skip
        (model, result), seconds = timed(
            train_sft, model, tokenizer, records, cfg, seed=0, checkpoint_dir=work / f"ckpt-{precision}",
            log=lambda m, s, losses=losses: losses.append(m["train/loss"]),
        )  # fmt: skip
        report[precision] = {
            "device": str(next(model.parameters()).device),
            "weight_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "tokens_per_second": result.tokens_per_second,
            "seconds": seconds,
        }
        if precision == "fp32":
            policy_dir = save_model(model.cpu(), tokenizer, work / "policy")
    report["bf16_minus_fp32_last_loss"] = report["bf16"]["last_loss"] - report["fp32"]["last_loss"]
    return report, policy_dir


def check_reward_model(policy_dir: Path, work: Path, steps: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rows = list(
        {
            r["prompt"]: r for r in synthetic_records("arithmetic", "preference", n=3000, seed=0, **TASK)
        }.values()
    )
    train, test = rows[:-200], rows[-200:]
    report: dict = {}

    model = build_reward_model(str(policy_dir)).to(DEVICE)
    torch.nn.init.normal_(model.score.weight, std=0.1)
    groups = [
        [encode_completion(tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected")] for r in test[:32]
    ]
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                rows = pack_shared_prefix(groups, tokenizer.pad_token_id).to(torch.device(DEVICE))
                shared = score_shared_prefix(model, rows).float()
                flat = {
                    k: v.to(DEVICE)
                    for k, v in pad_batch([s for g in groups for s in g], tokenizer.pad_token_id).items()
                }
                separate = score_sequences(model, flat).float()
            report[f"shared_vs_separate_max_abs_diff_{str(dtype).split('.')[-1]}"] = (
                (shared - separate).abs().max().item()
            )
            report[f"reward_scale_{str(dtype).split('.')[-1]}"] = separate.abs().max().item()

    for shared_prefix in (True, False):
        cfg = RewardTrainSpec(
            max_steps=steps, lr=1e-4, batch_size=32, max_length=128, warmup_ratio=0.1,
            checkpoint_every=steps, log_every=steps, shared_prefix=shared_prefix,
        )  # fmt: skip
        model = build_reward_model(str(policy_dir))
        (model, result), seconds = timed(
            train_reward_model,
            model,
            tokenizer,
            train,
            cfg,
            seed=0,
            checkpoint_dir=work / f"rm-{shared_prefix}",
        )
        metrics = evaluate_reward_model(model, tokenizer, test, cfg)
        report["shared_prefix" if shared_prefix else "padded"] = {
            "device": str(next(model.parameters()).device),
            "pair_tokens_per_second": result.tokens_per_second,
            "seconds": seconds,
            "final_loss": result.final_loss,
            "held_out_accuracy": metrics["eval/accuracy"],
        }
    report["shared_over_padded_speed"] = (
        report["shared_prefix"]["pair_tokens_per_second"] / report["padded"]["pair_tokens_per_second"]
    )
    return report


def check_generation(policy_dir: Path, prompts: int, n: int, batch_size: int) -> dict:
    from rlhf_core.modeling.models import load_model

    model, tokenizer = load_model(policy_dir)
    model = model.to(DEVICE).eval()
    texts = [r["prompt"] for r in synthetic_records("arithmetic", "prompts", n=prompts, seed=1, **TASK)]
    report: dict = {}
    greedy = {
        engine: generate(model, tokenizer, texts[:64], max_new_tokens=32, batch_size=64, engine=engine)
        for engine in ("native", "transformers")
    }
    report["greedy_texts_equal"] = greedy["native"].texts == greedy["transformers"].texts
    report["greedy_rows_differing"] = sum(
        a != b for a, b in zip(greedy["native"].texts, greedy["transformers"].texts, strict=True)
    )
    for repeat in range(2):
        for engine in ("native", "transformers"):
            out, seconds = timed(
                lambda engine=engine, repeat=repeat: generate(
                    model, tokenizer, texts, samples_per_prompt=n, max_new_tokens=32, temperature=1.0,
                    top_p=0.95, batch_size=batch_size, seed=repeat, engine=engine,
                )
            )  # fmt: skip
            report.setdefault(engine, []).append(
                {
                    "new_tokens": sum(out.new_tokens),
                    "seconds": seconds,
                    "new_tokens_per_second": sum(out.new_tokens) / seconds,
                }
            )
    best = {e: max(r["new_tokens_per_second"] for r in report[e]) for e in ("native", "transformers")}
    report["native_over_transformers_best_of_2"] = best["native"] / best["transformers"]
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--rm-steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    import transformers

    report: dict = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": vars(args) | {"out": str(args.out)},
    }
    source = TinyModelSource(hidden_size=args.hidden_size, layers=args.layers, heads=8, vocab_size=512)
    report["model"] = source.model_dump()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report["sft"], policy_dir = check_sft(source, work, args.sft_steps)
        print("sft", json.dumps(report["sft"], indent=1), flush=True)
        report["reward_model"] = check_reward_model(policy_dir, work, args.rm_steps)
        print("reward_model", json.dumps(report["reward_model"], indent=1), flush=True)
        report["generation"] = check_generation(policy_dir, args.prompts, args.n, args.batch_size)
        print("generation", json.dumps(report["generation"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
