"""`gptoss generate`: offline batch generation from a JSONL file, in-process, with continuous batching.

    gptoss generate requests.jsonl results.jsonl --model CKPT [--max-num-seqs 64] [--seed 1] [--temperature 1]

Each input line is one JSON object with exactly one of
- `messages`: OpenAI Chat messages, rendered with harmony (plus `tools`, `tool_choice`, `reasoning_effort`,
  `response_format`);
- `input`: an OpenAI Responses input (string or items), rendered with harmony (plus `instructions`,
  `tools`, `tool_choice`, `reasoning: {effort}`, `text: {format}`);
- `prompt`: text. It is one user turn rendered with harmony, unless `"raw": true`, when the text is
  tokenized as it is (special tokens such as `<|start|>` written in it are recognised) and the model simply
  continues it;
and optionally an `id` (string or integer; default: the line number), `metadata` (echoed back) and sampling
parameters: `max_tokens` (alias `max_completion_tokens`, `max_output_tokens`), `temperature`, `top_p`,
`top_k`, `min_p`, `seed`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `stop`,
`stop_token_ids`, `ignore_eos` (also drops the harmony stop tokens `<|return|>` and `<|call|>`, which
otherwise end every completion), `logprobs` (true or a count of alternatives) and `top_logprobs`.
`tool_choice` is "auto" (the default), "none" (the tools are not shown to the model), "required" or a named
function (`{"type": "function", "name": ...}` or `{"type": "function", "function": {"name": ...}}`): these two
are enforced while sampling (a grammar, llguidance), so the completion is a call to one of the tools.
Unknown fields, invalid JSON, duplicate ids and out-of-range values are reported on stderr with their line
number and the line is skipped; the run goes on.

Each output line: `{"id", "text", "reasoning", "tool_calls": [{"name", "arguments"}], "finish_reason",
"usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "fingerprint"}`, plus `logprobs` when asked,
`token_ids` and `raw_text` (special tokens spelled out) with `--include-raw`, `metadata` when given and `error` when the
engine failed the request. `text` is the final-channel answer (the whole completion for a raw prompt; then
`reasoning` is null), `reasoning` the analysis channel; `finish_reason` is "stop", "length", "tool_calls" or
"error".

Resuming and order: every result is appended and flushed as it finishes (one `write` per line), so a crash or
Ctrl-C loses nothing finished; re-running with the same output file first drops a partial last line (if the
process died while writing it), then skips every request already there. Each result carries a `fingerprint`
of its input line's content and the run's flags (the defaults below, `--seed`, `--include-raw`): a resume
refuses, with one line and before touching the file, an output whose finished lines do not all match the
input and flags (another input, a changed line, another `--max-tokens`...); `--overwrite` starts over. When
all requests are done the file is rewritten (atomically, through a temporary file) in input order. A file
that cannot be written (read-only folder, full disk) stops the run with one line naming it, leaving what was
finished and no temporary file.

Determinism: a request without its own `seed` gets one derived from the run's `--seed` (default 0) and its id,
so its tokens depend only on its prompt and parameters: with the engine's batch-invariant mode (the default)
two runs on the same machine and device (the same GPU, or the CPU with `--num-threads 1`) give identical
files, tokens and logprobs bit for bit, whatever `--max-num-seqs` and `--max-num-batched-tokens` are, and a
resumed run continues exactly (tested on the tiny model on one CPU thread). With several CPU threads only
`--max-num-seqs` may change: other prefill chunks can move a few logprobs in their last bits. A different
`--seed` gives different samples.
"""

# For developers: the continuous-batching driver (`run_engine`) and the output file (`ResultsFile`) below are
# shared with `gptoss score`.

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The engine and harmony are imported inside functions, so `--help` and input validation stay fast.

PROMPT_KEYS = ("messages", "input", "prompt")
MAX_TOKENS_ALIASES = ("max_tokens", "max_completion_tokens", "max_output_tokens")
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)
REQUEST_KEYS = frozenset(
    {
        "id",
        "raw",
        "metadata",
        "tools",
        "reasoning_effort",
        "reasoning",
        "response_format",
        "tool_choice",
        "instructions",
        "text",
        "logprobs",
        "top_logprobs",
        *PROMPT_KEYS,
        *MAX_TOKENS_ALIASES,
        *SAMPLING_KEYS,
    }
)


class GenerateError(Exception):
    """A run that cannot start or go on (an output file from another input...): reported as one line."""


class BadLine(ValueError):
    """An input line that cannot be run; reported as `line N: message` and skipped."""

    def __init__(self, line_no: int, message: str) -> None:
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no
        self.message = message


@dataclass
class Job:
    """One request ready for the engine: `index` is its place among the valid input lines."""

    index: int
    line_no: int
    id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    harmony: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # echoed into the result (metadata), or kept for it
    fingerprint: str = ""  # of the input line and the run's flags (`request_fingerprint`)


# ---- reading JSONL ---------------------------------------------------------------------------------------


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, object) for each non-blank line; a `BadLine` in place of an object that does not parse."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, BadLine(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield line_no, BadLine(line_no, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line_no, obj


def normalize_id(raw: Any, line_no: int) -> str:
    """Ids are kept as strings (an integer id 7 and "7" are the same request); default: the line number."""
    if raw is None:
        return str(line_no)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise BadLine(line_no, f"id must be a string or an integer, got {raw!r}")
    if isinstance(raw, str) and not raw:
        raise BadLine(line_no, "id must not be empty")
    return str(raw)


def request_fingerprint(obj: dict[str, Any], run_flags: dict[str, Any]) -> str:
    """What a result was made from: its input line's content (as parsed JSON: key order and spacing do not
    count) and the run's flags that shape results. Stored with each result; a resume checks it."""
    canonical = json.dumps({"request": obj, "flags": run_flags}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def derived_seed(run_seed: int, request_id: str) -> int:
    """A per-request seed from the run's seed and the request id: stable across runs, batches and resumes."""
    return (run_seed * 1_000_003 + zlib.crc32(request_id.encode("utf-8"))) % (1 << 31) + 1


def read_jobs(
    path: str | Path,
    build: Callable[[dict[str, Any], int, str], Job],
    report: Callable[[BadLine], None],
) -> list[Job]:
    """Every valid line as a `Job` (in input order); bad lines and repeated ids go to `report`."""
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for line_no, obj in iter_json_lines(path):
        try:
            if isinstance(obj, BadLine):
                raise obj
            request_id = normalize_id(obj.get("id"), line_no)
            if request_id in seen:
                raise BadLine(line_no, f"duplicate id {request_id!r} (first on line {seen[request_id]})")
            try:
                job = build(obj, line_no, request_id)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # BadLine is a ValueError
                if isinstance(exc, BadLine):
                    raise
                raise BadLine(line_no, f"{type(exc).__name__}: {exc}") from None
        except BadLine as bad:
            report(bad)
            continue
        seen[request_id] = line_no
        job.index = len(jobs)
        jobs.append(job)
    return jobs


# ---- one generate request --------------------------------------------------------------------------------


@dataclass
class GenerateDefaults:
    """Command-line defaults for fields a line leaves out."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    reasoning_effort: str = "medium"
    current_date: str | None = None


def _sampling_params(
    obj: dict[str, Any], line_no: int, request_id: str, defaults: GenerateDefaults, stop_token_ids: Iterable[int]
) -> Any:
    from gptoss.engine.sampling_params import SamplingParams, SamplingParamsError

    kwargs: dict[str, Any] = {
        "max_tokens": defaults.max_tokens,
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
    }
    given_max = [k for k in MAX_TOKENS_ALIASES if obj.get(k) is not None]
    if len(given_max) > 1:
        raise BadLine(line_no, f"give only one of {', '.join(given_max)}")
    if given_max:
        kwargs["max_tokens"] = obj[given_max[0]]
    for key in SAMPLING_KEYS:
        if obj.get(key) is not None:
            kwargs[key] = obj[key]
    if kwargs.get("seed") is None and defaults.seed is not None:
        kwargs["seed"] = derived_seed(defaults.seed, request_id)
    logprobs, top = obj.get("logprobs"), obj.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise BadLine(line_no, f"top_logprobs: must be an integer, got {top!r}")
    if logprobs is True:
        kwargs["logprobs"] = top or 0
    elif logprobs not in (None, False):
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise BadLine(line_no, f"logprobs: must be true, false or an integer, got {logprobs!r}")
        kwargs["logprobs"] = logprobs
    elif top:
        raise BadLine(line_no, "top_logprobs: needs logprobs: true")
    # The harmony stop tokens (<|return|>, <|call|>) end every completion, as the server's do, unless the
    # line asks to ignore EOS (fixed-length outputs).
    user_stops = kwargs.get("stop_token_ids", [])
    if isinstance(user_stops, list) and not kwargs.get("ignore_eos"):
        kwargs["stop_token_ids"] = user_stops + [t for t in stop_token_ids if t not in user_stops]
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as exc:
        raise BadLine(line_no, str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise BadLine(line_no, str(exc)) from None


def build_generate_job(
    obj: dict[str, Any], line_no: int, request_id: str, encoding: Any, defaults: GenerateDefaults
) -> Job:
    """Validate one input object and render its prompt (see the module docstring for the fields)."""
    from gptoss.engine.harmony import HarmonyInputError, conversation_from_chat, conversation_from_responses

    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        raise BadLine(line_no, f"unknown field(s) {', '.join(unknown)}")
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise BadLine(line_no, f"give exactly one of messages, input, prompt (got {', '.join(given) or 'none'})")
    kind = given[0]
    raw = obj.get("raw", False)
    if not isinstance(raw, bool):
        raise BadLine(line_no, f"raw: must be a boolean, got {raw!r}")
    if raw and kind != "prompt":
        raise BadLine(line_no, "raw: only applies to prompt")
    if kind == "prompt" and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise BadLine(line_no, "prompt: must be a non-empty string")
    tool_choice = obj.get("tool_choice")
    if tool_choice is not None and raw:
        raise BadLine(line_no, "tool_choice: not with raw")
    tools = obj.get("tools") if tool_choice != "none" else None  # "none": the model is not shown them
    try:
        if raw:
            prompt_ids = encoding.tokenizer.encode(obj["prompt"], add_special_tokens=False).ids
        elif kind in ("prompt", "messages"):
            messages = [{"role": "user", "content": obj["prompt"]}] if kind == "prompt" else obj["messages"]
            conversation = conversation_from_chat(
                messages,
                tools=tools,
                reasoning_effort=obj.get("reasoning_effort", defaults.reasoning_effort),
                response_format=obj.get("response_format"),
                current_date=defaults.current_date,
            )
            prompt_ids = encoding.render_chat_prompt(conversation)
        else:
            reasoning = obj.get("reasoning")
            if reasoning is None and obj.get("reasoning_effort") is not None:
                reasoning = {"effort": obj["reasoning_effort"]}
            conversation = conversation_from_responses(
                obj["input"],
                instructions=obj.get("instructions"),
                tools=tools,
                reasoning=reasoning if reasoning is not None else {"effort": defaults.reasoning_effort},
                text=obj.get("text"),
                current_date=defaults.current_date,
            )
            prompt_ids = encoding.render_chat_prompt(conversation)
    except HarmonyInputError as exc:
        param = f" ({exc.param})" if exc.param and exc.param not in str(exc) else ""
        raise BadLine(line_no, f"{exc}{param}") from None
    if not prompt_ids:
        raise BadLine(line_no, "the prompt renders to no tokens")
    params = _sampling_params(obj, line_no, request_id, defaults, encoding.stop_token_ids)
    if tool_choice not in (None, "auto", "none"):
        params = dataclasses.replace(params, structured_output=_tool_choice_spec(tools, tool_choice, line_no))
    extra = {"metadata": obj["metadata"]} if "metadata" in obj else {}
    return Job(0, line_no, request_id, prompt_ids, params, harmony=not raw, extra=extra)


def _tool_choice_spec(tools: Any, tool_choice: Any, line_no: int) -> Any:
    """The grammar spec forcing a call ("required" or a named function), which the engine samples under."""
    from gptoss.engine.structured_output.spec import StructuredOutputError, StructuredOutputSpec

    try:
        return StructuredOutputSpec.from_request(tools=tools, tool_choice=tool_choice)
    except StructuredOutputError as exc:
        raise BadLine(line_no, str(exc)) from None


def logprobs_json(encoding: Any, entries: Iterable[Any]) -> list[dict[str, Any]]:
    """`TokenLogprob`s as `[{token, token_id, logprob, top_logprobs: [{token, token_id, logprob}]}]`."""
    from gptoss.server.logprobs import logprob_entries

    return logprob_entries(encoding, entries, None, token_ids=True, with_bytes=False)


def generate_result(job: Job, output: Any, encoding: Any, include_raw: bool = False) -> dict[str, Any]:
    """The output line of a finished request (a `RequestOutput`)."""
    finish_reason = output.finish_reason
    tool_calls: list[dict[str, str]] = []
    if job.harmony:
        parsed = encoding.parse_completion(list(output.token_ids))
        text, reasoning = parsed.final_text, parsed.reasoning_text
        tool_calls = [{"name": call.name, "arguments": call.arguments} for call in parsed.tool_calls]
        if tool_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    else:
        text, reasoning = output.text, None
    completion_tokens = len(output.token_ids)
    record: dict[str, Any] = {
        "id": job.id,
        "text": text,
        "reasoning": reasoning,
        "tool_calls": tool_calls,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": len(job.prompt_token_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_token_ids) + completion_tokens,
        },
    }
    if job.fingerprint:
        record["fingerprint"] = job.fingerprint
    if output.logprobs is not None:
        record["logprobs"] = logprobs_json(encoding, output.logprobs)
    if include_raw:
        record["token_ids"] = list(output.token_ids)
        record["raw_text"] = encoding.decode(list(output.token_ids))
    if output.error:
        record["error"] = output.error
    record.update(job.extra)
    return record


# ---- the output file -------------------------------------------------------------------------------------


class ResultsFile:
    """A JSONL results file that can be resumed: `done_ids` after `open`, `append` per result, `finalize`.

    Each result is one `os.write` of a whole line to a file opened with O_APPEND, so a process killed at any
    moment leaves whole lines, except in the rare case of a huge line cut by a full disk or a crash inside
    the write; `open` drops such a partial last line before resuming.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done_ids: set[str] = set()
        self.done_fingerprints: dict[str, str | None] = {}  # id -> the line's `fingerprint` (None: none)
        self._fd: int | None = None

    def open(
        self, check: Callable[[dict[str, str | None]], None] | None = None, overwrite: bool = False
    ) -> ResultsFile:
        """Read the finished lines, let `check(done_fingerprints)` refuse them (it raises) before anything is
        changed, drop a partial last line, and open for appending. `overwrite`: start from an empty file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not overwrite:
            data = self.path.read_bytes()
            keep = len(data)
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1  # the partial last line (0 when it is the only one)
            good = 0
            for line in data[:keep].splitlines(keepends=True):
                try:
                    record = json.loads(line)
                    request_id = str(record["id"])
                    fingerprint = record.get("fingerprint")
                except (ValueError, KeyError, TypeError, AttributeError):
                    break  # a damaged line: keep what precedes it and redo the rest
                self.done_ids.add(request_id)
                self.done_fingerprints[request_id] = fingerprint if isinstance(fingerprint, str) else None
                good += len(line)
            if check is not None:
                check(self.done_fingerprints)
            if good < len(data):
                print(f"{self.path}: dropping {len(data) - good} bytes of an unfinished line", file=sys.stderr)
                with open(self.path, "r+b") as f:
                    f.truncate(good)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if overwrite else 0)
        self._fd = os.open(self.path, flags, 0o644)
        return self

    def append(self, record: dict[str, Any]) -> None:
        assert self._fd is not None, "open() first"
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.done_ids.add(str(record["id"]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finalize(self, order: list[str]) -> None:
        """Rewrite the file with its records in the order of `order` (ids not in it last, in file order)."""
        self.close()
        rank = {request_id: i for i, request_id in enumerate(order)}
        lines = self.path.read_bytes().splitlines(keepends=True)
        keyed = []
        seen: set[str] = set()
        for position, line in enumerate(lines):
            request_id = str(json.loads(line)["id"])
            if request_id in seen:
                continue
            seen.add(request_id)
            keyed.append((rank.get(request_id, len(order) + position), line))
        keyed.sort(key=lambda item: item[0])
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.writelines(line for _, line in keyed)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            # A full disk (or a kill) while rewriting: the appended file is whole and resumable; no stale copy.
            tmp.unlink(missing_ok=True)
            raise


# ---- the continuous-batching driver ---------------------------------------------------------------------


def run_engine(
    engine: Any,
    jobs: list[Job],
    on_finished: Callable[[Job, Any], None],
    *,
    max_in_flight: int,
    progress: Any = None,
    count_tokens: Callable[[Any], int] = lambda out: len(out.new_token_ids),
) -> None:
    """Feed `jobs` to an `LLMEngine` (at most `max_in_flight` queued or running) and step it until all finish.

    `on_finished(job, request_output)` runs as each request finishes, in completion order. Requests the
    engine refuses (too long a prompt...) finish at once with `finish_reason="error"` and the reason. On any
    exception (Ctrl-C included) the requests in flight are aborted before it propagates.
    """
    from gptoss.engine.outputs import RequestOutput

    pending = iter(jobs)
    in_flight: dict[str, Job] = {}
    tokens = 0
    start = time.perf_counter()
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                    break
                request_id = f"{job.index}:{job.id}"
                try:
                    engine.add_request(request_id, job.prompt_token_ids, job.params)
                except ValueError as exc:  # PromptTooLongError, InvalidRequestError: this request only
                    on_finished(
                        job, RequestOutput(request_id, job.prompt_token_ids, [], "", True, "error", error=str(exc))
                    )
                    if progress is not None:
                        progress.update(1)
                    continue
                in_flight[request_id] = job
            if not in_flight:
                break
            for out in engine.step():
                tokens += count_tokens(out)
                if not out.finished:
                    continue
                job = in_flight.pop(out.request_id)
                on_finished(job, out)
                if progress is not None:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    progress.set_postfix_str(f"{tokens / elapsed:.1f} tok/s", refresh=False)
                    progress.update(1)
    finally:
        for request_id in list(in_flight):
            engine.abort_request(request_id)


def make_progress(total: int, enabled: bool, unit: str = "req") -> Any:
    """A tqdm bar on stderr (requests done, tokens/s in the postfix, ETA), or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)


# ---- the engine, from the shared engine flags (scripts/engine_flags.py) ----------------------------------


def make_llm(args: argparse.Namespace, **overrides: Any) -> Any:
    """An `LLM` from parsed engine flags (`add_engine_arguments`), with `EngineArgs` fields overridden."""
    from gptoss.engine.llm import LLM
    from gptoss.scripts.engine_flags import engine_args_from_cli

    engine_args = dataclasses.asdict(engine_args_from_cli(args, **overrides))
    return LLM(engine_args.pop("model"), **engine_args)


def in_flight_limit(max_num_seqs: int, max_num_waiting: int = 4096) -> int:
    """Requests handed to the engine at once: enough waiting ones to refill the batch as others finish, and
    never more than its waiting queue takes (beyond it `add_request` raises `EngineOverloadedError`)."""
    return min(2 * max_num_seqs + 8, max_num_seqs + max_num_waiting)


def check_input_output(input_path: Path, output_path: Path, what_in: str, what_out: str) -> None:
    """UsageError unless the input JSONL exists and the output is another file."""
    from gptoss.scripts.errors import UsageError

    if not input_path.is_file():
        problem = "is a folder" if input_path.is_dir() else "no such file"
        raise UsageError(f"{input_path}: {problem}; the first argument is the JSONL file of {what_in}")
    if output_path.resolve() == input_path.resolve() or (output_path.exists() and output_path.samefile(input_path)):
        raise UsageError(f"{output_path}: the {what_out} would overwrite the input; give another output file")
    if output_path.is_dir():
        raise UsageError(f"{output_path}: is a folder; the second argument is the JSONL file of {what_out}")


def report_bad_line(bad: BadLine) -> None:
    print(f"skipped {bad}", file=sys.stderr)


# ---- the command -----------------------------------------------------------------------------------------


@dataclass
class GenerateSummary:
    num_requests: int  # valid input lines
    num_bad_lines: int
    num_already_done: int  # found in the output file when the run started
    num_run: int  # left to run when the run started
    num_finished: int = 0  # of those, finished (all of them unless interrupted)
    num_failed: int = 0  # of those, finished with finish_reason "error"
    interrupted: bool = False


def generate_jsonl(
    input_path: str | Path,
    output_path: str | Path,
    llm: Any,
    encoding: Any,
    defaults: GenerateDefaults,
    *,
    max_in_flight: int,
    include_raw: bool = False,
    progress: bool = False,
    report: Callable[[BadLine], None] = report_bad_line,
    overwrite: bool = False,
) -> GenerateSummary:
    """The whole of `gptoss generate` once the model is known.

    `llm` is an `LLM`, or a callable that makes one (called only when something is left to run, so a finished
    file is not re-read into a model). A KeyboardInterrupt stops the run, keeps every finished line and
    returns with `interrupted=True`. Raises `GenerateError` when the output file holds results of other
    requests or flags (unless `overwrite`), OSError when it cannot be written.
    """
    bad_lines: list[BadLine] = []

    def on_bad(bad: BadLine) -> None:
        bad_lines.append(bad)
        report(bad)

    run_flags = {"defaults": dataclasses.asdict(defaults), "include_raw": include_raw}

    def build(obj: dict[str, Any], line_no: int, request_id: str) -> Job:
        job = build_generate_job(obj, line_no, request_id, encoding, defaults)
        job.fingerprint = request_fingerprint(obj, run_flags)
        return job

    jobs = read_jobs(input_path, build, on_bad)
    results = ResultsFile(output_path).open(
        lambda done: check_resumable(done, jobs, input_path, output_path), overwrite
    )
    pending = [job for job in jobs if job.id not in results.done_ids]
    summary = GenerateSummary(len(jobs), len(bad_lines), len(jobs) - len(pending), len(pending))
    try:
        if pending:
            if callable(llm) and not hasattr(llm, "engine"):
                llm = llm()
            bar = make_progress(len(pending), progress)

            def on_finished(job: Job, out: Any) -> None:
                results.append(generate_result(job, out, encoding, include_raw))
                summary.num_finished += 1
                summary.num_failed += out.finish_reason == "error"

            try:
                run_engine(llm.engine, pending, on_finished, max_in_flight=max_in_flight, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
    except KeyboardInterrupt:
        summary.interrupted = True
        return summary
    finally:
        results.close()
    results.finalize([job.id for job in jobs])
    return summary


def check_resumable(
    done: dict[str, str | None], jobs: list[Job], input_path: str | Path, output_path: str | Path
) -> None:
    """Raise `GenerateError` unless every finished result (`done`: id -> fingerprint) is of the input line with
    its id under this run's flags: resuming onto results of other requests would keep them as if they were."""
    expected = {job.id: job for job in jobs}
    mismatched = [
        rid for rid, fingerprint in done.items() if rid not in expected or expected[rid].fingerprint != fingerprint
    ]
    if not mismatched:
        return
    first = mismatched[0]
    if first not in expected:
        why = f"id {first!r} is not a request of {input_path}"
    elif done[first] is None:
        why = f"id {first!r} has no fingerprint (written by another tool or version)"
    else:
        why = f"id {first!r} (line {expected[first].line_no}): its line or the run's flags changed"
    raise GenerateError(
        f"{output_path}: {len(mismatched)} of its {len(done)} finished results do not match {input_path} with these "
        f"flags (first: {why}); resume with the same input and flags, or pass --overwrite to start over"
    )


def run_generate(args: argparse.Namespace) -> int:
    from gptoss.engine.harmony import HarmonyEncoding
    from gptoss.scripts.engine_flags import progress_enabled, resolve_model_path

    check_input_output(args.input, args.output, "requests", "results")
    args.model = resolve_model_path(args)  # the tiny default checkpoint or a config-only folder when not given
    encoding = HarmonyEncoding.from_file(args.tokenizer or args.model)
    defaults = GenerateDefaults(
        args.max_tokens, args.temperature, args.top_p, args.seed, args.reasoning_effort, args.current_date
    )
    try:
        summary = generate_jsonl(
            args.input,
            args.output,
            lambda: make_llm(args),
            encoding,
            defaults,
            max_in_flight=in_flight_limit(args.max_num_seqs, args.max_num_waiting),
            include_raw=args.include_raw,
            progress=progress_enabled(args),
            overwrite=args.overwrite,
        )
    except GenerateError as exc:
        print(f"gptoss generate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only folder, full disk...: what is finished stays in the output file
        where = exc.filename or args.output
        print(f"gptoss generate: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"{summary.num_requests} requests ({summary.num_bad_lines} bad lines skipped): "
        f"{summary.num_already_done} were already in {args.output}, {summary.num_finished} of {summary.num_run} "
        "others run",
        file=sys.stderr,
    )
    if summary.interrupted:
        print(
            "interrupted: every finished result is in the output file; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if summary.num_failed:
        print(f'{summary.num_failed} requests failed (finish_reason "error", see their "error")', file=sys.stderr)
        return 1
    return 1 if summary.num_bad_lines and args.strict else 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from gptoss.scripts.engine_flags import add_engine_arguments

    parser = subparsers.add_parser(
        "generate",
        help="offline batch generation: JSONL of requests in, JSONL of results out (resumable)",
        description=__doc__,
    )
    parser.add_argument("input", type=Path, help="JSONL of requests")
    parser.add_argument("output", type=Path, help="JSONL of results (appended to and resumed if it exists)")
    add_engine_arguments(parser)  # its --seed also seeds every request without one (see the description)
    sampling = parser.add_argument_group("defaults for lines that do not set them")
    sampling.add_argument("--max-tokens", type=int, default=256, help="most new tokens per request")
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    sampling.add_argument(
        "--reasoning-effort", default="medium", choices=("low", "medium", "high"), help="for harmony prompts"
    )
    sampling.add_argument("--current-date", default=None, help="YYYY-MM-DD for the system message (default: none)")
    parser.add_argument(
        "--include-raw",
        action="store_true",
        help="also write each completion's token ids and raw text (special tokens spelled out)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start the output file over instead of resuming it (needed when it holds results of other "
        "requests or flags)",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any input line was bad")
    parser.set_defaults(handler=run_generate)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `gptoss generate` to the `gptoss` command line."""
    add_generate_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
