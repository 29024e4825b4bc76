"""`gptoss bench serve`: a load generator against an OpenAI-compatible server (ours or any other).

    gptoss bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --input-len 512 --output-len 128 \\
        --concurrency 1,4,16 --result-json bench.json --plot bench.png
    gptoss bench serve --model CKPT ...      # starts `server.app` on CKPT itself (no --model: a tiny checkpoint)

Requests stream (`stream: true`, `stream_options.include_usage`) from `/v1/completions` (default; token-id
prompts, so input lengths are exact) or `/v1/chat/completions` (text prompts). Input and output lengths are
fixed, or uniform in `[len * (1 - r), len * (1 + r)]` with `--random-range-ratio r`. Requests arrive as a
Poisson process at `--request-rate` per second (default inf: all at once), at most `--concurrency` in
flight; `--concurrency 1,4,16` runs one benchmark per value (the sweep), after `--num-warmups` requests that
are not measured.

Metrics, defined as vLLM's benchmarks/benchmark_serving.py defines them so numbers compare:
- TTFT: request sent -> first chunk carrying text (content, reasoning or completion text);
- ITL: the gaps between consecutive text-carrying chunks of a request (one per chunk, all requests pooled);
- TPOT: per request `(E2EL - TTFT) / (output_tokens - 1)` (requests with more than one output token);
- E2EL: request sent -> stream finished;
each as mean, median, std, p50, p90, p99 in milliseconds; request throughput (completed / duration),
output-token throughput, total-token throughput. Output tokens are the server's `usage.completion_tokens`
(counted chunks when the server sends no usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # httpx is imported where it is used: `gptoss --help` must not need it
    import httpx

PERCENTILES = (50, 90, 99)
WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
)


@dataclass
class RequestInput:
    """One benchmark request: a prompt (token ids for completions, text for chat) and its lengths."""

    prompt: list[int] | str
    input_len: int  # intended prompt tokens (the server's usage says how many it really counted)
    output_len: int  # max_tokens


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds)."""

    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


# ---- prompts ---------------------------------------------------------------------------------------------


def sample_lengths(mean: int, ratio: float, count: int, rng: random.Random) -> list[int]:
    """`count` lengths, all `mean`, or uniform integers in [mean * (1 - ratio), mean * (1 + ratio)] (at least 1)."""
    if ratio <= 0:
        return [max(1, mean)] * count
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def ordinary_token_ids(tokenizer: Any | None) -> range | list[int]:
    """Token ids a random prompt may use: the tokenizer's non-special ones, or the 256 byte tokens."""
    if tokenizer is None:
        return range(256)  # every byte-level vocabulary has these
    added = set(tokenizer.get_added_tokens_decoder())
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return [i for i in range(size) if i not in added]


def make_requests(
    num: int,
    input_len: int,
    output_len: int,
    ratio: float,
    seed: int,
    chat: bool,
    tokenizer: Any | None = None,
) -> list[RequestInput]:
    """Random prompts (as vLLM's random dataset makes them): token ids, or text for the chat endpoint."""
    rng = random.Random(seed)
    input_lens = sample_lengths(input_len, ratio, num, rng)
    output_lens = sample_lengths(output_len, ratio, num, rng)
    vocab = ordinary_token_ids(tokenizer)
    requests = []
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        if chat:
            if tokenizer is not None:
                prompt: list[int] | str = tokenizer.decode([rng.choice(vocab) for _ in range(n_in)])
            else:
                prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
        else:
            prompt = [rng.choice(vocab) for _ in range(n_in)]
        requests.append(RequestInput(prompt, n_in, n_out))
    return requests


# ---- one streamed request --------------------------------------------------------------------------------


def request_body(request: RequestInput, model: str, chat: bool, ignore_eos: bool, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; servers without it ignore the field
    if chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text a streamed chunk carries: completion text, or a chat delta's content and reasoning."""
    pieces = []
    for choice in chunk.get("choices") or []:
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                pieces.append(delta[key])
        for call in delta.get("tool_calls") or []:
            arguments = (call.get("function") or {}).get("arguments")
            if isinstance(arguments, str):
                pieces.append(arguments)
    return "".join(pieces)


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    """Stream one request; TTFT, ITL and E2EL as vLLM's benchmark measures them."""
    import httpx

    result = RequestResult()
    num_chunks = 0
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = json.dumps(chunk["error"])[:300]
                    return result
                now = time.perf_counter()
                if chunk_text(chunk):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    num_chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.latency = time.perf_counter() - start
        if not result.output_tokens:
            result.output_tokens = num_chunks
        if num_chunks == 0 and result.output_tokens:
            result.ttft = result.latency  # tokens that produced no text (special tokens): first byte at the end
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---- one benchmark ---------------------------------------------------------------------------------------


def distribution(values_s: list[float], name: str) -> dict[str, float]:
    """mean / median / std / p50 / p90 / p99 of `values_s` (seconds) in milliseconds, vLLM's key names; None
    (JSON null, printed n/a) for each when there is no value (e.g. TPOT and ITL when no text arrived)."""
    ms = [v * 1e3 for v in values_s]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else None,
        f"median_{name}_ms": statistics.median(ms) if ms else None,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else None,
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(results: list[RequestResult], duration: float, inputs: list[RequestInput]) -> dict[str, Any]:
    """The benchmark's metrics from its requests' results (see the module docstring)."""
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens or i.input_len for r, i in zip(results, inputs, strict=True) if r.success)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    metrics: dict[str, Any] = {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    metrics.update(distribution([r.ttft for r in done], "ttft"))
    metrics.update(distribution(tpots, "tpot"))
    metrics.update(distribution([gap for r in done for gap in r.itl], "itl"))
    metrics.update(distribution([r.latency for r in done], "e2el"))
    errors = [r.error for r in results if not r.success]
    metrics["errors"] = errors[:5]
    return metrics


async def run_benchmark(
    client: httpx.AsyncClient,
    url: str,
    inputs: list[RequestInput],
    *,
    model: str,
    chat: bool,
    request_rate: float,
    concurrency: int | None,
    ignore_eos: bool,
    temperature: float,
    headers: dict[str, str],
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Send `inputs` (Poisson arrivals at `request_rate`, at most `concurrency` in flight); the metrics.
    `progress`: a tqdm bar of finished requests on stderr, removed when done."""
    from tqdm import tqdm

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(
        total=len(inputs),
        unit="req",
        desc=f"concurrency {concurrency or 'unlimited'}",
        leave=False,
        disable=not progress,
    )

    async def one(request: RequestInput) -> RequestResult:
        body = request_body(request, model, chat, ignore_eos, temperature)
        try:
            if limit is None:
                return await send_request(client, url, body, headers)
            async with limit:
                return await send_request(client, url, body, headers)
        finally:
            bar.update(1)

    start = time.perf_counter()
    tasks = []
    for i, request in enumerate(inputs):
        tasks.append(asyncio.create_task(one(request)))
        if math.isfinite(request_rate) and i + 1 < len(inputs):
            await asyncio.sleep(rng.expovariate(request_rate))
    try:
        results = await asyncio.gather(*tasks)
    finally:
        bar.close()
    duration = time.perf_counter() - start
    metrics = summarize(list(results), duration, inputs)
    metrics["concurrency"] = concurrency
    metrics["request_rate"] = request_rate if math.isfinite(request_rate) else "inf"
    return metrics


async def served_model_name(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> str:
    """The first model /v1/models lists."""
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def sweep(args: argparse.Namespace, base_url: str, tokenizer: Any | None) -> dict[str, Any]:
    """Warm-up, then one benchmark per concurrency value; the whole JSON report."""
    import httpx
    from gptoss.scripts.engine_flags import progress_enabled

    chat = args.endpoint.endswith("chat/completions")
    url = base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = args.served_model_name or await served_model_name(client, base_url.rstrip("/"), headers)
        if args.num_warmups:
            warmups = make_requests(
                args.num_warmups, args.input_len, args.output_len, 0.0, args.seed + 1, chat, tokenizer
            )
            await run_benchmark(
                client,
                url,
                warmups,
                model=model,
                chat=chat,
                request_rate=math.inf,
                concurrency=None,
                ignore_eos=args.ignore_eos,
                temperature=args.temperature,
                headers=headers,
            )
        runs = []
        for concurrency in args.concurrency or [None]:
            inputs = make_requests(
                args.num_prompts, args.input_len, args.output_len, args.random_range_ratio, args.seed, chat, tokenizer
            )
            metrics = await run_benchmark(
                client,
                url,
                inputs,
                model=model,
                chat=chat,
                request_rate=args.request_rate,
                concurrency=concurrency,
                ignore_eos=args.ignore_eos,
                temperature=args.temperature,
                headers=headers,
                seed=args.seed,
                progress=progress_enabled(args),
            )
            runs.append(metrics)
            if not args.quiet:
                print(format_run(metrics), file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("handler", "api_key") and not callable(v)}
    config["base_url"] = base_url
    config["model"] = model
    return {"config": json.loads(json.dumps(config, default=str)), "runs": runs}


def format_run(metrics: dict[str, Any]) -> str:
    """A vLLM-style block of the headline numbers."""
    lines = [
        f"---- concurrency {metrics['concurrency'] or 'unlimited'}, request rate {metrics['request_rate']} ----",
        f"completed / failed           {metrics['completed']} / {metrics['failed']}",
        f"duration (s)                 {metrics['duration_s']:.2f}",
        f"request throughput (req/s)   {metrics['request_throughput']:.2f}",
        f"output throughput (tok/s)    {metrics['output_throughput']:.2f}",
        f"total throughput (tok/s)     {metrics['total_token_throughput']:.2f}",
    ]

    def ms(value: float | None) -> str:
        return f"{value:9.2f}" if value is not None else f"{'n/a':>9s}"

    for name in ("ttft", "tpot", "itl", "e2el"):
        lines.append(
            f"{name.upper():5s} ms  mean {ms(metrics[f'mean_{name}_ms'])}  p50 {ms(metrics[f'p50_{name}_ms'])}  "
            f"p90 {ms(metrics[f'p90_{name}_ms'])}  p99 {ms(metrics[f'p99_{name}_ms'])}"
        )
    if metrics["errors"]:
        lines.append(f"first error: {metrics['errors'][0]}")
    return "\n".join(lines)


def plot_sweep(path: str | Path, runs: list[dict[str, Any]], title: str) -> Path:
    """Output throughput against median end-to-end latency, one point per run, labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in (
        (axes[0], "median_e2el_ms", "median end-to-end latency (ms)"),
        (axes[1], "median_tpot_ms", "median time per output token (ms)"),
    ):
        measured = [run for run in runs if run[key] is not None]  # a level where no text arrived has no TPOT
        xs = [run[key] for run in measured]
        ys = [run["output_throughput"] for run in measured]
        ax.plot(xs, ys, marker="o")
        for x, y, run in zip(xs, ys, measured, strict=True):
            ax.annotate(f"c={run['concurrency'] or 'inf'}", (x, y), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(label)
        ax.set_ylabel("output throughput (tokens/s)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- a server of our own ---------------------------------------------------------------------------------

_SERVE_CODE = """
import argparse, json, sys
from gptoss.server.app import run_server
run_server(argparse.Namespace(**json.loads(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """`server.app` on a checkpoint, in a child process (so it does not share the load generator's GIL)."""

    def __init__(
        self,
        model: str | Path,
        *,
        port: int | None = None,
        engine_args: dict[str, Any] | None = None,
        startup_timeout: float = 180.0,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        options = {
            "model": str(model),
            "host": "127.0.0.1",
            "port": self.port,
            "log_level": "warning",
            "served_model_name": "gpt-oss-120b",
            **(engine_args or {}),
        }
        repo_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self._log = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE_CODE, json.dumps(options)],
            cwd=repo_root,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.close()
        raise TimeoutError(f"the server was not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, num_bytes: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-num_bytes:].decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the command -----------------------------------------------------------------------------------------


def parse_concurrency(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def run_bench_serve(args: argparse.Namespace) -> int:
    from gptoss.engine.tokenizer import load_tokenizer

    server: LocalServer | None = None
    base_url = args.base_url
    tokenizer_path = args.tokenizer
    try:
        if base_url is None:
            from gptoss.engine.model.random_checkpoint import ensure_default_checkpoint
            from gptoss.scripts.engine_flags import check_model_dir

            model = check_model_dir(args.model) if args.model else ensure_default_checkpoint()
            engine_args = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
            print(f"starting a server on {model} ...", file=sys.stderr)
            server = LocalServer(model, engine_args=engine_args)
            base_url = server.base_url
            tokenizer_path = tokenizer_path or model
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        report = asyncio.run(sweep(args, base_url, tokenizer))
    finally:
        if server is not None:
            server.close()
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        plot_sweep(
            args.plot,
            report["runs"],
            f"{report['config']['model']} {args.endpoint}, in {args.input_len} / out {args.output_len} tokens",
        )
        print(f"wrote {args.plot}", file=sys.stderr)
    failed = sum(run["failed"] for run in report["runs"])
    return 1 if failed and not any(run["completed"] for run in report["runs"]) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--model",
        default=None,
        help="without --base-url: start our server on this checkpoint (default: a tiny random one)",
    )
    target.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size of the started server")
    target.add_argument(
        "--endpoint",
        default="/v1/completions",
        choices=("/v1/completions", "/v1/chat/completions"),
        help="route the requests stream from (completions: token-id prompts of exact lengths)",
    )
    target.add_argument("--served-model-name", default=None, help="the body's model (default: from /v1/models)")
    target.add_argument(
        "--api-key", default=os.environ.get("GPTOSS_API_KEY"), help="sent as a Bearer token (default: $GPTOSS_API_KEY)"
    )
    target.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json for random prompts (default: the started server's; else byte tokens)",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100, help="requests per concurrency level")
    load.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    load.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    load.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * (1 - r), len * (1 + r)]"
    )
    load.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    load.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=None,
        help="most requests in flight; a list (1,4,16) runs a sweep",
    )
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests before the first level")
    load.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (vLLM extension)")
    load.add_argument("--temperature", type=float, default=0.0, help="of every request")
    load.add_argument("--seed", type=int, default=0, help="of the random prompts and arrival times")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    out = parser.add_argument_group("output")
    out.add_argument("--result-json", default=None, help="write every level's metrics to this file")
    out.add_argument("--plot", default=None, help="PNG of throughput against latency across the sweep")
    out.add_argument("--quiet", action="store_true", help="no per-level report on stderr")
    out.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `serve` under `gptoss bench` (pass the `bench` command's subparsers)."""
    parser = bench_subparsers.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server: TTFT, TPOT, ITL, E2EL, throughput",
        description=__doc__,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_bench_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss bench")
    register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


__all__ = ["LocalServer", "RequestResult", "register", "run_benchmark", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
