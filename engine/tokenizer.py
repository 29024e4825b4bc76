"""The checkpoint's tokenizer: loading `tokenizer.json`, harmony special tokens by name, and the tiny default.

gpt-oss uses o200k_harmony: o200k_base plus the harmony specials (`<|start|>`, `<|message|>`, ...). Nothing in
the engine hard-codes their ids; code asks `special_token_id(tokenizer, "<|start|>")`.

The tiny tokenizer made here is what random test checkpoints ship: a byte-level BPE trained with `tokenizers`
on a small built-in text, carrying the same special-token names, so every harmony code path runs on it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The harmony special tokens by name, in o200k_harmony's id order (199998 onwards in the real vocabulary).
HARMONY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_200000|>",
    "<|reserved_200001|>",
    "<|return|>",
    "<|constrain|>",
    "<|reserved_200004|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|reserved_200009|>",
    "<|reserved_200010|>",
    "<|reserved_200011|>",
    "<|call|>",
    "<|reserved_200013|>",
    "<|reserved_200014|>",
    "<|reserved_200015|>",
    "<|reserved_200016|>",
    "<|reserved_200017|>",
    "<|endofprompt|>",
)

_TRAINING_TEXT = """\
You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2026-11-26
Reasoning: low medium high
# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.
# Instructions
# Tools
## functions
namespace functions {
// Get the current weather in a location
type get_weather = (_: {
location: string,
unit?: "celsius" | "fahrenheit",
}) => any;
} // namespace functions
# Response Formats
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
Hello, world! How are you today? I am fine, thank you. Tell me a story about a dragon and a knight.
The user asks for the weather. We should call the tool. The answer is 42. Let me think step by step.
{"location": "Paris", "unit": "celsius", "temperature": 20, "items": [1, 2, 3], "ok": true, "value": null}
def main():\n    print("hello")\n    return 0
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -1 2024 2025 2026
Ünïcödé: café, naïve, 日本語, русский, العربية, emoji 🙂
"""


def build_tiny_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE of about `vocab_size` tokens (harmony specials included), deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(HARMONY_SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    # Specials get the ids after the learned vocabulary, in harmony order, as in o200k_harmony.
    tokenizer.add_special_tokens(list(HARMONY_SPECIAL_TOKENS))
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from a checkpoint folder or a file path."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(path))


def special_token_id(tokenizer: Tokenizer, name: str) -> int:
    """The id of a special token by name; a clear error if the tokenizer lacks it."""
    token_id = tokenizer.token_to_id(name)
    if token_id is None:
        raise KeyError(f"tokenizer has no special token {name!r}")
    return token_id
