"""SamplingParams: engine-level ranges (the API's are the server's, tests/test_server_errors.py); every error
names its field."""

from __future__ import annotations

import pytest
from gptoss.engine.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_are_valid_and_engine_like() -> None:
    params = SamplingParams()
    assert params.max_tokens == 256
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == -1
    assert not params.is_greedy and not params.uses_top_k and not params.uses_penalties


# (field, valid values, invalid values) at engine level.
ENGINE_CASES = [
    ("max_tokens", [1, 100_000], [0, -1, 1.5, True, None]),
    ("temperature", [0, 0.0, 1e-6, 5.0, 10.0], [-0.1, float("nan"), float("inf"), "1", None]),
    ("top_p", [1e-9, 0.001, 1.0, 1], [0.0, -0.5, 1.01, float("nan")]),
    ("top_k", [-1, 0, 1, 50, 1000], [-2, 1.5, True]),
    ("min_p", [0.0, 0.5, 1.0], [-0.01, 1.01]),
    ("repetition_penalty", [0.0, 1.0, 2.0, 3.0], [-0.1, float("inf")]),
    ("frequency_penalty", [-2.0, 0.0, 2.0], [-2.01, 2.01]),
    ("presence_penalty", [-2, 0, 2], [-2.5, 2.5]),
    ("seed", [None, 0, 1, 9_999_999_999, 2**70], [-1, 1.0, "7", True]),
    ("stop", [[], ["a"], ["\n\n", "END"], "x", ("a", "b")], [[""], [1], 5]),
    ("stop_token_ids", [[], [200002, 200012], (1, 2)], [[-1], ["a"], [1.0], 7]),
    ("include_stop_str_in_output", [True, False], [1, "yes"]),
    ("ignore_eos", [True, False], [0]),
    ("skip_special_tokens", [True, False], [None]),
    ("logprobs", [None, 0, 5, 20], [-1, 21, 2.0]),
    ("prompt_logprobs", [None, 0, 20], [-1, 21]),
]


@pytest.mark.parametrize("name,valid,invalid", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_ranges_name_the_field(name: str, valid: list, invalid: list) -> None:
    for value in valid:
        SamplingParams(**{name: value})
    for value in invalid:
        with pytest.raises(SamplingParamsError) as excinfo:
            SamplingParams(**{name: value})
        assert excinfo.value.param == name, (name, value)
        assert name in str(excinfo.value)
        assert isinstance(excinfo.value, ValueError)


def test_max_tokens_zero_only_with_prompt_logprobs() -> None:
    SamplingParams(max_tokens=0, prompt_logprobs=0)
    SamplingParams(max_tokens=0, prompt_logprobs=5)
    with pytest.raises(SamplingParamsError) as excinfo:
        SamplingParams(max_tokens=0)
    assert excinfo.value.param == "max_tokens"


def test_stop_normalised_to_list() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_flags() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    assert SamplingParams(top_k=5).uses_top_k and not SamplingParams(top_k=0).uses_top_k
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties


def test_is_stop_token() -> None:
    params = SamplingParams(stop_token_ids=[200002, 200012])
    assert params.is_stop_token(200002)
    assert params.is_stop_token(199999, eos_token_ids=(199999,))
    assert not params.is_stop_token(5, eos_token_ids=(199999,))
    ignoring = SamplingParams(stop_token_ids=[200002], ignore_eos=True)
    assert not ignoring.is_stop_token(199999, eos_token_ids=(199999,))
    assert ignoring.is_stop_token(200002, eos_token_ids=(199999,))


def test_stop_lists_are_bounded_and_the_error_names_the_field() -> None:
    """Stop strings are checked on the engine thread after every token: 500k of them slowed every client 7x."""
    from gptoss.engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

    SamplingParams(stop=["x"] * MAX_STOP_STRINGS, stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    SamplingParams(stop="y" * MAX_STOP_STRING_CHARS)
    for kwargs, field, message in (
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS} stop strings"),
        ({"stop": ["ok", "y" * (MAX_STOP_STRING_CHARS + 1)]}, "stop", f"at most {MAX_STOP_STRING_CHARS} characters"),
        ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids", "at most"),
    ):
        with pytest.raises(SamplingParamsError) as err:
            SamplingParams(**kwargs)
        assert err.value.param == field and message in str(err.value)
