"""One RL training micro-batch on CPU: TRL's fused, chunked LM head vs our plain one (`train.rl.plain_lm_head`).

A GRPO micro-batch is one prompt's group: `--rows` sequences of `--length` tokens, loss = the mean log-prob of the
completion tokens (the part every GRPO loss differentiates). Forward + backward, `--repeats` times each, the two
heads interleaved on two copies of the same model, median seconds.
    python bench/rl_lm_head.py MODEL [--rows 8] [--length 320] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from trl.trainer.utils import add_fused_lm_head

    from open_nemotron.model.loading import load_model
    from open_nemotron.train.rl import plain_lm_head

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    fused, plain = load_model(args.model, device="cpu"), load_model(args.model, device="cpu")
    add_fused_lm_head(fused, temperature=1.0, outputs=("log_probs", "entropy"))
    plain_lm_head(plain, temperature=1.0)
    ids = torch.randint(3, fused.config.vocab_size, (args.rows, args.length))
    labels = ids.clone()
    labels[:, : args.length // 4] = -100  # the prompt part
    times: dict[str, list[float]] = {"TRL fused head": [], "plain head": []}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, model in (("TRL fused head", fused), ("plain head", plain)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(ids, labels=labels, fused_lm_head=True).loss.backward()
            times[name].append(time.perf_counter() - start)
    print(f"{args.model}: {args.rows} x {args.length} tokens, forward + backward, median of {args.repeats}")
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"  {name}: {seconds:.2f} s")
    print(f"  fused / plain: {medians['TRL fused head'] / medians['plain head']:.2f}x")


if __name__ == "__main__":
    main()
