"""ConnectorSettings: what `kv_connector_extra_config` may say to the kvstore vLLM connector.

One frozen dataclass, read once from the dict vLLM hands over, so a typo is an error at start-up
rather than a silently ignored key. Owns no behaviour.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from kvwire.defaults import DEFAULT_ADDRESS

TOKEN_ENV = "KVSTORE_TOKEN"
LAYOUTS = ("vllm", "canonical")


@dataclass(frozen=True)
class ConnectorSettings:
    address: str = DEFAULT_ADDRESS
    tenant: str | None = None
    token: str | None = None  # default: $KVSTORE_TOKEN
    transport: str = "auto"
    timeout_s: float = 5.0  # per store call; a hung store must not hold the scheduler for long
    retry_after_s: float = 5.0  # after a failed call the store is left alone this long (vLLM computes)
    lease_ttl_s: float = 30.0  # write leases, renewed every third of it while the blocks are computed
    wait_timeout_s: float = 30.0  # longest a request waits for blocks another engine is computing
    model_name: str | None = None  # default: the checkpoint directory's name
    revision: str | None = None  # default: vLLM's --revision, else a content hash of a local checkpoint
    layout: str = "vllm"  # "vllm": pages as vLLM keeps them; "canonical": the bundled engines' layout (shared with them)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorSettings":
        extra = dict(extra or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - names)
        if unknown:
            raise ValueError(f"kvstore connector: unknown kv_connector_extra_config keys {unknown}; known: {sorted(names)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: float(v) if fields[k].type == "float" else v for k, v in extra.items()}
        settings = cls(**values)
        if settings.layout not in LAYOUTS:
            raise ValueError(f"kvstore connector: layout {settings.layout!r} is not one of {LAYOUTS}")
        if settings.token is None and os.environ.get(TOKEN_ENV):
            settings = dataclasses.replace(settings, token=os.environ[TOKEN_ENV])
        return settings
