"""ByteTokenizer: the bundled tokenizer, UTF-8 bytes as ids, so nothing is ever downloaded.

Ids 0..255 are the bytes themselves; BOS and EOS follow. The bundled random
checkpoints have exactly this vocabulary, which keeps tests and benchmarks
self-contained. It refuses to be a real tokenizer: prompts are about 4x longer
in tokens than with BPE, which is fine (even useful) for exercising the KV path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

NUM_BYTES = 256


@dataclass(frozen=True)
class ByteTokenizer:
    bos_id: int = NUM_BYTES
    eos_id: int = NUM_BYTES + 1

    @property
    def vocab_size(self) -> int:
        return max(self.bos_id, self.eos_id) + 1

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Special and out-of-range ids are dropped; broken UTF-8 (a cut multi-byte char) becomes U+FFFD."""
        data = bytes(i for i in (int(i) for i in ids) if 0 <= i < NUM_BYTES)
        return data.decode("utf-8", errors="replace")
