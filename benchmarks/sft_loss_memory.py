"""Peak memory and time of one SFT forward + backward with a large vocabulary: chunked vs full logits.

``rlhf_core.losses.language_model.next_token_nll_sum`` keeps only trained positions and runs the LM
head in checkpointed chunks; the plain path builds the (batch, sequence, vocabulary) logits. Each
contender runs in its own fresh subprocess (peak RSS = ``ru_maxrss``), on the same randomly
initialised Llama (hidden 256, 2 layers, vocabulary 128,256 like Llama 3) and the same random batch
(4 rows x 1,024 tokens, the first half of each row masked as prompt). The plain contender is the same
function with the chunked path switched off.

    .venv/bin/python benchmarks/sft_loss_memory.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import workers
from machine_load import wait_for_quiet
from report import write_report
from sft_throughput import VERSION_PACKAGES

CONTENDERS = ("chunked", "full_logits")


@dataclass
class RunResult:
    contender: str
    loss: float
    seconds: float
    peak_rss_mib: float
    rss_before_mib: float
    added_mib: float


def worker(contender: str, vocab: int, rows: int, length: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import rlhf_core.losses.language_model as lm

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, vocab, (rows, length))
    labels = input_ids.clone()
    labels[:, : length // 2] = lm.IGNORE_INDEX
    if contender == "full_logits":
        lm.supports_chunked_loss = lambda model: False  # the same function, plain path
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    loss = lm.next_token_nll_sum(model, input_ids, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "contender": contender,
        "loss": loss.item(),
        "seconds": seconds,
        "peak_rss_mib": peak,
        "rss_before_mib": before,
        "added_mib": peak - before,
    }


def run(contender: str, args: argparse.Namespace) -> dict:
    flags = {
        "--worker": contender,
        "--vocab": str(args.vocab),
        "--rows": str(args.rows),
        "--length": str(args.length),
    }
    return workers.run_worker(__file__, contender, flags)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sft_loss_memory.json")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        workers.emit_result(worker(args.worker, args.vocab, args.rows, args.length))
        return
    runs = []
    for i in range(args.repeats):
        for contender in CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]:
            wait_for_quiet(15.0, 300.0)
            r = run(contender, args)
            runs.append(r)
            print(
                f"[{i + 1}/{args.repeats}] {contender:11} loss {r['loss']:.6f}  {r['seconds']:6.2f} s  "
                f"peak {r['peak_rss_mib']:6.0f} MiB (+{r['added_mib']:.0f} in forward/backward)",
                flush=True,
            )
    summary = {
        c: {
            f"median_{k}": statistics.median(r[k] for r in runs if r["contender"] == c)
            for k in ("seconds", "peak_rss_mib", "added_mib", "loss")
        }
        for c in CONTENDERS
    }
    summary["peak_rss_ratio_chunked_over_full"] = (
        summary["chunked"]["median_peak_rss_mib"] / summary["full_logits"]["median_peak_rss_mib"]
    )
    summary["added_ratio_chunked_over_full"] = (
        summary["chunked"]["median_added_mib"] / summary["full_logits"]["median_added_mib"]
    )
    summary["time_ratio_chunked_over_full"] = (
        summary["chunked"]["median_seconds"] / summary["full_logits"]["median_seconds"]
    )
    print(json.dumps(summary, indent=1))
    settings = {"vocab": args.vocab, "rows": args.rows, "length": args.length, "hidden": 256, "layers": 2}
    write_report(
        args.out, {"settings": settings}, VERSION_PACKAGES, summary, [RunResult(**r) for r in runs], []
    )


if __name__ == "__main__":
    main()
