"""Structured outputs: JSON mode, JSON Schema and strict tool arguments, enforced by constrained decoding.

A request that asks for structure (`response_format` json_object / json_schema, `text.format`, any function
tools, `tool_choice` required or a named function) gets a grammar over the *whole harmony reply* the model
writes after the prompt's trailing `<|start|>assistant`:

    reply    := message* (final | call)          (a forced call, tool_choice required or named: reply := call)
    message  := <|channel|>analysis<|message|> TEXT <|end|><|start|>assistant          (reasoning, free text)
              | <|channel|>commentary<|message|> TEXT <|end|><|start|>assistant        (preamble; only with tools)
    final    := <|channel|>final<|message|> BODY <|return|>                 (BODY: the schema's JSON, or TEXT)
    call     := ( to=functions.NAME<|channel|>commentary | <|channel|>commentary to=functions.NAME)
                [ <|constrain|>json |  json] <|message|> ARGS <|call|>  (ARGS: the parameters' JSON, or TEXT)

NAME is one of the declared functions: with tools, even non-strict ones under tool_choice auto, the grammar
holds the header alone, so a call to an undeclared function (or to `analysis$location`) cannot come out; the
arguments of a non-strict tool stay free TEXT. A forced call is the reply itself, without reasoning first: a
model that may reason first can reason until max_tokens and never call (a random test model mostly does).
TEXT is any text without special tokens. So the analysis channel stays free and the JSON grammar takes over
when the model opens the final channel (or a tool call), whatever the model does first: a real model writes
the headers by itself (the mask then allows what it would pick anyway), a random test model is led through
them. Special tokens are grammar terminals by name (`<|channel|>`), never matched by TEXT or JSON strings.

`StructuredOutputSpec(..., start_in_final=True)` is for a prompt that already ends inside the final channel
(`...<|start|>assistant<|channel|>final<|message|>`, `FINAL_HEADER` prefilled: reasoning skipped); its grammar
is just `BODY <|return|>`. With a random test model that is what makes replies end: it picks among the allowed
tokens about uniformly, so it opens the analysis channel half the time or more and then writes free TEXT that
a one-in-hundreds `<|end|>` practically never closes. With a schema whose values are all bounded (strings with
maxLength / enum / a bounded pattern, integers with minimum and maximum, arrays with maxItems, objects with
`additionalProperties: false`) and the whitespace cap below, every reply then ends within a bounded number of
tokens (tests/test_structured_e2e.py). It cannot go with tools (a call is not a final message).

Library: llguidance (MIT; the Rust core behind Guidance, also used by vLLM, SGLang and llama.cpp), chosen over
xgrammar (Apache-2.0) because
- its Lark dialect has special tokens as terminals by name and embeds JSON schemas inline (`%json {...}`),
  so the harmony structure above is ten lines of grammar text;
- it compiles a schema in about 1-3 ms with the 201k-token vocabulary (the mask is computed lazily over a
  token trie; xgrammar precomputes per-schema token-mask caches, about 0.1 s even for a small schema on this
  CPU), so an unseen schema does not stall time-to-first-token, and a cached grammar's matcher is copied in
  about 20 us;
- it fills a batch of bitmasks in parallel with the GIL released (`LLExecutor`), so mask computation can run
  on a worker thread while the GPU runs the forward pass (`BitmaskWorker`);
- it rejects unsupported JSON Schema keywords with a named error (or ignores them when asked: `lenient`),
  which is what a 4xx naming the problem needs;
- it is one self-contained wheel with no Python dependencies (xgrammar pulls in transformers, triton and
  apache-tvm-ffi). Both run on CPU; xgrammar's per-step mask is faster (~5-100 us vs ~50-300 us per row
  here), which the worker-thread overlap hides.

JSON details: an object's properties come in the schema's order (as in OpenAI's structured outputs; the
`# Response Formats` section shows them in that order); whitespace between JSON tokens is free but at most
MAX_JSON_WHITESPACE characters per gap (a model cannot loop on it). `strict: true` makes unsupported keywords
(`uniqueItems`, `not`, `if`/`then`, unknown formats, ...) an error; without it they are ignored (best effort).
Invalid schemas (bad types, regexes, `$ref`s, unsatisfiable bounds) are errors either way.

The bitmask format is llguidance's (and xgrammar's): int32 `[rows, ceil(V / 32)]`, bit `t % 32` of word
`t // 32` set when token t is allowed. Ids of the model's vocabulary beyond the tokenizer's (padding) are never
allowed.

Modules: `spec` (what a request asks for, `StructuredOutputSpec`, and its grammar text: plain Python, so the
server and `SamplingParams` use it without llguidance), `grammar` (llguidance: the compiler, per-request
matchers, batched bitmasks). A request carries its spec as `SamplingParams.structured_output`; the engine
compiles it (`LLMEngine`) and the model runner applies the masks, so structured outputs are handled there only.

Usage (what the engine does):

    compiler = StructuredOutputCompiler(tokenizer, vocab_size)   # once per engine (2-5 s with the real vocab)
    spec = StructuredOutputSpec.from_request(response_format=..., tools=..., tool_choice=...)  # None: no grammar
    state = compiler.new_state(spec)      # per request; raises StructuredOutputError (-> HTTP 400)
    # per step, batched: sync each state with its output tokens, fill the bitmasks off-thread, apply on device
    future = worker.submit([s for s in states if s.sync(output_token_ids_of(s))])   # a BitmaskWorker
    ... forward pass ...
    mask = allowed_token_mask_for_batch(future.result().to(device, non_blocking=True), rows, N, V)
    # or one request at a time: `state(output_token_ids) -> bool [V]`
"""
