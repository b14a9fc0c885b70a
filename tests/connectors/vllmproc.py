"""Run real vLLM processes for the connector tests and the benchmark, in the vLLM environment (`make vllm-env`).

The tests themselves run in the project's environment (they start kvstore servers, corrupt
slots, read the store); each vLLM instance is a child process of the vLLM environment's
Python running vllm_child.py, so two of them are two separate vLLM processes, as in production.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.checkpoint import random_state_dict, save_checkpoint
from engines.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("vllm_child.py")
PYTHON_ENV = "KVSTORE_VLLM_PYTHON"
# hidden 256, 4 layers, 2 KV heads of 64: the tiny Llama. Weights at 3x HF's init scale, so
# greedy outputs vary with the context (at 1x this model repeats one token whatever the prompt).
TINY = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
WEIGHT_SCALE = 3.0
BLOCK_TOKENS = 128  # vLLM's block size on CPU


def vllm_python() -> Path:
    return Path(os.environ.get(PYTHON_ENV) or ROOT / ".venv-vllm" / "bin" / "python")


def vllm_missing() -> str:
    """Why vLLM cannot run here ("" when it can)."""
    python = vllm_python()
    if not python.exists():
        return f"no vLLM environment at {python} (build it with `make vllm-env`, or set {PYTHON_ENV})"
    probe = subprocess.run([str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"])
    return "" if probe.returncode == 0 else f"{python} cannot import vllm"


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    if not (path / "config.json").exists():
        state = random_state_dict(TINY, seed)
        save_checkpoint(path, TINY, {k: v if k.endswith("norm.weight") else v * WEIGHT_SCALE for k, v in state.items()})
    return path


def tokens(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY.vocab_size, (n,), generator=generator).tolist()


@dataclass
class VllmProc:
    """One vLLM child process running a scenario (see vllm_child.py)."""

    workdir: Path
    name: str
    scenario: dict
    proc: subprocess.Popen | None = None
    started_s: float = field(default_factory=time.monotonic)

    @property
    def control_dir(self) -> Path:
        return self.workdir / f"{self.name}-control"

    def start(self) -> "VllmProc":
        self.control_dir.mkdir(parents=True, exist_ok=True)
        spec = self.workdir / f"{self.name}.json"
        spec.write_text(json.dumps({"control_dir": str(self.control_dir), **self.scenario}))
        # In-process engine by default, so the report can read the connector's counters; "multiprocessing"
        # runs vLLM as `vllm serve` does: engine core and worker each in a process of their own.
        multiprocessing = "1" if self.scenario.get("multiprocessing") else "0"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocessing, "VLLM_CPU_KVCACHE_SPACE": "1"}
        log = open(self.workdir / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen([str(vllm_python()), str(CHILD), str(spec), str(self.report_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True)
        return self

    @property
    def report_path(self) -> Path:
        return self.workdir / f"{self.name}.report.json"

    def wait_paused(self, index: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.control_dir / f"paused-{index}").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not reach pause {index}:\n{self.log()[-6000:]}")
            time.sleep(0.05)

    def go(self, index: int) -> None:
        (self.control_dir / f"go-{index}").touch()

    def result(self, timeout_s: float = 600) -> dict:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if code != 0:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log()[-6000:]}")
        return json.loads(self.report_path.read_text())

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_vllm(workdir: Path, name: str, **scenario) -> dict:
    proc = VllmProc(workdir, name, scenario).start()
    try:
        return proc.result()
    finally:
        proc.stop()


def stats(report: dict) -> dict:
    """The connector's counters of a report with one session."""
    (session,) = report["sessions"]
    return session["stats"]


def requests(report: dict) -> list[dict]:
    return [r for batch in report["batches"] for r in batch]


if __name__ == "__main__":  # a checkpoint for trying the connector by hand
    print(make_checkpoint(Path(sys.argv[1])))
