"""The client-facing JSON: request parsing, and stream deltas that add up to the non-stream text."""
import json
import random

import pytest

from engines.completions import BadRequest, CompletionRequest, CompletionResult, TextStream
from engines.http_server import sse
from engines.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()


def parse(**doc) -> CompletionRequest:
    return CompletionRequest.parse(json.dumps(doc).encode(), TOKENIZER)


def test_text_and_token_prompts():
    assert parse(prompt="hé").prompt_ids == TOKENIZER.encode("hé")
    assert parse(prompt=[256, 104, 105], max_tokens=3).prompt_ids == [256, 104, 105]
    assert parse(prompt=["hi"]).prompt_ids == TOKENIZER.encode("hi")
    request = parse(prompt="x", max_tokens=5, temperature=0.5, seed=7, stream=True)
    assert (request.max_tokens, request.temperature, request.seed, request.stream) == (5, 0.5, 7, True)


@pytest.mark.parametrize("doc", [
    {}, {"prompt": ""}, {"prompt": []}, {"prompt": [1, 999]}, {"prompt": ["a", "b"]}, {"prompt": "x", "n": 2},
    {"prompt": "x", "max_tokens": -1}, {"prompt": "x", "max_tokens": 1.5}, {"prompt": "x", "temperature": "hot"},
])
def test_malformed_requests_are_refused(doc):
    with pytest.raises(BadRequest):
        parse(**doc)


def test_stream_deltas_concatenate_to_the_decoded_text():
    """Random bytes cut multi-byte characters anywhere; the deltas must still add up exactly."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(256), 0xE2, 0x82, 0xAC, 0xC3, TOKENIZER.eos_id]) for _ in range(40)]
        stream = TextStream()
        assert "".join(stream.push(t) for t in ids) + stream.finish() == TOKENIZER.decode(ids)


def test_response_and_chunk_shapes():
    result = CompletionResult(parse(prompt="abc"), "m", token_ids=[104, 105], text="hi", finish_reason="length", cached_tokens=4)
    doc = result.response()
    assert doc["object"] == "text_completion" and doc["choices"][0]["text"] == "hi"
    assert doc["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                            "prompt_tokens_details": {"cached_tokens": 4}}
    assert sse(result.chunk("h")).startswith(b"data: {") and sse("[DONE]") == b"data: [DONE]\n\n"
