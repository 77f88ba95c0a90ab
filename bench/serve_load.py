"""Load on the OpenAI-compatible server: N concurrent streaming clients (the official async `openai` client) for T
seconds. Prints and writes requests/s, output tokens/s, latency and time-to-first-token percentiles, errors, and the
server's peak RSS.

Starts the server itself (a subprocess, so its memory is its own) unless `--url` points at a running one:
`--server ours` (default) runs `open-nemotron serve MODEL`; `--server transformers` runs `transformers serve MODEL`
(a Llama checkpoint; add `--continuous-batching` for its paged continuous-batching path), for the side-by-side:

    .venv/bin/python bench/serve_load.py runs/demo/converted --clients 16 --seconds 60 --max-tokens 64 \\
        --json runs/serve-load/c16.json

Output tokens are counted by tokenizing each reply's streamed text with the model's tokenizer (servers differ in how
many tokens they put in one chunk). Run it alone on the machine: the clients and the server share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from open_nemotron.utils import write_result

PROMPTS = [
    "Explain why the sky is blue in a few sentences.",
    "Write a short poem about a lighthouse.",
    "What are three uses of a paperclip?",
    "Summarise the water cycle.",
    "Give me a recipe idea with rice and beans.",
    "Why do cats purr?",
    "Describe a city at night.",
    "What is a prime number? Give examples.",
]


def conversation(i: int) -> list[dict]:
    """Client request i's messages."""
    return [
        {"role": "system", "content": "detailed thinking off"},
        {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
    ]


def mean_prompt_tokens(tokenizer) -> int:
    """The mean templated prompt length of the load's requests (bench-speed's --prompt-len for the same work)."""
    lengths = [
        len(
            tokenizer.apply_chat_template(conversation(i), add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for i in range(len(PROMPTS))
    ]
    return round(sum(lengths) / len(lengths))


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _client(
    client,
    model: str,
    index: int,
    deadline: float,
    max_tokens: int,
    temperature: float,
    stats: dict,
    count,
    ignore_eos: bool,
) -> None:
    i = index
    while time.monotonic() < deadline:
        start = time.monotonic()
        first = None
        pieces: list[str] = []
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=conversation(i),
                max_tokens=max_tokens,
                temperature=temperature,
                seed=i,
                stream=True,
                stream_options={"include_usage": False},
                **({"extra_body": {"ignore_eos": True}} if ignore_eos else {}),
            )
            async for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                text = (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
                if text:
                    pieces.append(text)
                    if first is None:
                        first = time.monotonic() - start
            stats["latency"].append(time.monotonic() - start)
            stats["ttft"].append(first if first is not None else time.monotonic() - start)
            stats["tokens"] += count("".join(pieces))
            stats["requests"] += 1
        except Exception as err:  # a load test counts failures by kind instead of stopping
            stats["errors"][type(err).__name__] = stats["errors"].get(type(err).__name__, 0) + 1
        i += 1000


async def _load(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, temperature: float, count, ignore_eos: bool
) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    stats: dict = {"latency": [], "ttft": [], "tokens": 0, "requests": 0, "errors": {}}
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(
        *(
            _client(client, model, k, deadline, max_tokens, temperature, stats, count, ignore_eos)
            for k in range(clients)
        )
    )
    stats["wall_s"] = time.monotonic() - start
    await client.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model spec to serve (ignored with --url)")
    parser.add_argument("--url", help="a running server instead of starting one")
    parser.add_argument("--model-name", default="bench")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as bench-speed measures decode")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--server", choices=["ours", "transformers"], default="ours")
    parser.add_argument("--continuous-batching", action="store_true", help="--server transformers: its CB path")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="every reply runs to --max-tokens (vLLM's ignore_eos extra field)"
    )
    parser.add_argument("--tokenizer", help="tokenizer to count output tokens with (default: the model's)")
    parser.add_argument("--json", help="where to write the result (required unless --print-prompt-tokens)")
    parser.add_argument(
        "--print-prompt-tokens", action="store_true", help="print the mean templated prompt length and exit"
    )
    args = parser.parse_args(argv)
    from open_nemotron.model.loading import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.print_prompt_tokens:
        print(mean_prompt_tokens(tokenizer))
        return 0
    if not args.json:
        parser.error("--json is required")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    server = None
    url = args.url
    if url is None and args.server == "transformers":
        model_dir = str(resolve_model_dir(args.model))
        args.model_name = model_dir  # transformers serve answers for the model it preloaded
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", model_dir, "--port", str(args.port)]
        cmd += ["--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        if args.continuous_batching:
            cmd += ["--continuous-batching"]
    elif url is None:
        cmd = [
            sys.executable,
            "-m",
            "open_nemotron.cli",
            "serve",
            args.model,
            "--port",
            str(args.port),
            "--model-name",
            args.model_name,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-length",
            "512",
            "--queue-size",
            str(max(64, 2 * args.clients)),
        ]
    if url is None:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                print(f"error: the server exited: {server.stderr.read()[-2000:]}", file=sys.stderr)
                return 2
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.kill()
                print("error: the server did not start in 300 s", file=sys.stderr)
                return 2
            time.sleep(0.5)
    # One short request first, outside the timed load: some servers set up lazily (transformers serve's continuous
    # batching takes tens of seconds over its first request).
    warm = httpx.post(
        url + "/v1/chat/completions",
        json={"model": args.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=600,
    )
    warm.raise_for_status()
    print(f"load: {args.clients} clients x {args.seconds:.0f} s against {url}", file=sys.stderr)
    stats = asyncio.run(
        _load(
            url,
            args.model_name,
            args.clients,
            args.seconds,
            args.max_tokens,
            args.temperature,
            count,
            args.ignore_eos,
        )
    )
    peak = _peak_rss_mib(server.pid) if server is not None else None
    if server is not None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    wall = stats["wall_s"]
    result = {
        "benchmark": "serve-load",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": vars(args),
        "cpu_count": os.cpu_count(),
        "requests": stats["requests"],
        "errors": stats["errors"],
        "requests_per_s": stats["requests"] / wall,
        "output_tokens": stats["tokens"],
        "output_tokens_per_s": stats["tokens"] / wall,
        "latency_s": {q: _percentile(stats["latency"], p) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "ttft_s": {q: _percentile(stats["ttft"], p) for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "mean_latency_s": statistics.mean(stats["latency"]) if stats["latency"] else None,
        "server_peak_rss_mib": peak,
        "wall_s": wall,
    }
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        f"# serve load — {result['date']}",
        "",
        f"{args.clients} concurrent streaming clients × {args.seconds:.0f} s, max_tokens {args.max_tokens}, "
        f"temperature {args.temperature:g}{', ignore_eos' if args.ignore_eos else ''}, server {args.server}"
        + (" (continuous batching)" if args.continuous_batching else "")
        + (f", {args.max_batch_size} slots." if args.server == "ours" else "."),
        "",
        "| requests | errors | requests/s | output tokens/s | latency p50 / p95 / p99 s | TTFT p50 / p95 / p99 s | server peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['requests']} | {sum(stats['errors'].values())} | {result['requests_per_s']:.2f} | "
        f"{result['output_tokens_per_s']:.1f} | {' / '.join(fmt(v) for v in result['latency_s'].values())} | "
        f"{' / '.join(fmt(v) for v in result['ttft_s'].values())} | "
        f"{'-' if peak is None else f'{peak:.0f} MiB'} |",
        "",
        "Output tokens: each reply's streamed text (reasoning and content) tokenized with the model's tokenizer.",
        "",
    ]
    write_result(args.json, result, "\n".join(lines))
    print("\n".join(lines))
    return 0 if not stats["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
