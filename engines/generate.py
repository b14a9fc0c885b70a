"""Single-sequence generation in one process: the reference the prefill/decode split must reproduce.

It prefills the prompt (or only the part not already in the sequence's pages),
then decodes one token a step. It refuses batching and scheduling; the
decode worker owns those.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from engines.attention import SeqChunk
from engines.model import LlamaForCausalLM
from engines.paged_cache import PagedKVCache


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row of logits [n, vocab]: argmax at temperature 0, else a seeded softmax draw."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)  # multinomial needs the generator's device
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_greedy(
    model: LlamaForCausalLM,
    cache: PagedKVCache,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    seq_id: Hashable = "generate",
    num_cached_tokens: int = 0,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    keep_cache: bool = False,
) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids; returns only the new ids (EOS included if hit).

    num_cached_tokens says how many leading prompt tokens already have K/V in
    seq_id's pages (scattered in from the store, say); prefill starts there.
    If the whole prompt is cached, its last token is recomputed, because its
    logits, not its K/V, are what the first new token needs. The sequence's
    pages are freed at the end unless keep_cache.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt or max_new_tokens <= 0:
        return []
    start = min(num_cached_tokens, len(prompt) - 1)
    # The last generated token is returned but never fed back, so it needs no slot.
    cache.allocate(seq_id, len(prompt) + max_new_tokens - 1)
    table = cache.block_table(seq_id)
    try:
        logits = model(cache, [SeqChunk(prompt[start:], start, table)], last_only=True)
        generated: list[int] = []
        while True:
            token = int(sample_next(logits, temperature, generator)[0])
            generated.append(token)
            if len(generated) == max_new_tokens or token == eos_id:
                return generated
            position = len(prompt) + len(generated) - 1
            logits = model(cache, [SeqChunk([token], position, table)], last_only=True)
    finally:
        if not keep_cache:
            cache.free(seq_id)
