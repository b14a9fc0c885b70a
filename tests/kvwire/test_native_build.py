"""The install builds the control path's C (setup.py), and installs without it, warning, where it cannot."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS = ("kvwire/_native", "kvstore/_native")


def copy_sources(dest: Path) -> None:
    """Only what git would ship (tracked, or new and not ignored): the side environments and wheel caches
    beside a checkout are gigabytes, and copying them twice filled a CI disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:  # a source tree without git: skip what a checkout's .gitignore names
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv*", ".whl", "build", "dist", "*.egg-info",
                                                                 "*.so", "__pycache__", ".kvstore-data", "out"))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        origin = REPO / name
        if origin.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, dest / name)


def build_wheel(tmp: Path, **env: str) -> tuple[list[str], str]:
    """A wheel built from a copy of the sources: no extension built in place or in build/ is reused."""
    source, out = tmp / "src", tmp / "wheel"
    copy_sources(source)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(source)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist(), done.stdout + done.stderr


@pytest.mark.slow
def test_the_wheel_carries_both_extensions(tmp_path):
    names, _ = build_wheel(tmp_path)
    for extension in EXTENSIONS:
        assert any(n.startswith(extension + ".") and n.endswith(".so") for n in names), f"{extension} missing from {names}"


@pytest.mark.slow
def test_a_failed_compile_still_installs_and_says_so(tmp_path):
    names, log = build_wheel(tmp_path, CC="/bin/false")  # a compiler that fails every file
    assert not any(n.endswith(".so") for n in names)
    assert "kvwire/native.py" in names and "kvwire/keys.py" in names
    assert "WARNING: kvwire._native not built" in log and "pure-Python reference" in log
