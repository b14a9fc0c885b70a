"""One vLLM process for the connector tests and the benchmark: runs a JSON scenario, writes a JSON report.

    python tests/connectors/vllm_child.py SCENARIO.json REPORT.json

The scenario names a checkpoint, a dtype, the kvstore address (null: vLLM without the connector)
and batches of prompts (token ids), each batch one `LLM.generate` call. With a control
directory it pauses before each batch whose index is in `pause_before`:
it writes `paused-<i>` there and waits for `go-<i>`, so a test can line processes up or kill
and restart the store between batches. The report has, per request, the greedy tokens, their
logprobs and vLLM's num_cached_tokens, each batch's wall time, and the connector's counters.
It runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the counters are readable here.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PAUSE_POLL_S = 0.05
PAUSE_TIMEOUT_S = 300


def run(scenario: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv_transfer = None
    if scenario.get("store"):
        extra = {"address": scenario["store"], **scenario.get("extra", {})}
        kv_transfer = KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm",
                                       kv_role="kv_both", kv_connector_extra_config=extra)
    started = time.perf_counter()
    llm = LLM(model=scenario["checkpoint"], dtype=scenario.get("dtype", "float32"), enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=scenario.get("max_model_len", 2048), enable_prefix_caching=scenario.get("prefix_caching", True),
              kv_transfer_config=kv_transfer, seed=0)
    report: dict = {"startup_s": time.perf_counter() - started, "batches": []}
    for index, batch in enumerate(scenario["batches"]):
        pause(scenario, index)
        prompts = [TokensPrompt(prompt_token_ids=p["prompt"]) for p in batch]
        params = [SamplingParams(max_tokens=p.get("max_tokens", 8), temperature=0.0, logprobs=1, detokenize=False) for p in batch]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall_s = time.perf_counter() - t0
        report["batches"].append([{
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
            "num_cached_tokens": o.num_cached_tokens,
            "finish_reason": o.outputs[0].finish_reason,
            "wall_s": wall_s,
        } for o in outputs])
    if kv_transfer is not None:
        from connectors.session import sessions

        report["sessions"] = [{"fingerprint": s.fingerprint.canonical().decode(), "stats": s.stats.as_dict()} for s in sessions()]
        # (empty under VLLM_ENABLE_V1_MULTIPROCESSING=1: the connector lives in the engine's own processes)
    return report


def pause(scenario: dict, index: int) -> None:
    if index not in scenario.get("pause_before", []):
        return
    control = Path(scenario["control_dir"])
    (control / f"paused-{index}").touch()
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    while not (control / f"go-{index}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody said go-{index} in {control}")
        time.sleep(PAUSE_POLL_S)


def main() -> None:
    scenario = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    report = run(scenario)
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
