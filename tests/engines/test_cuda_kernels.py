"""Where the engines' CUDA sources are found: a source checkout and an installed wheel alike."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engines.cuda_kernels import CSRC_DIRS, source_path

REPO = Path(__file__).resolve().parents[2]


def test_every_kernel_source_is_found():
    sources = sorted(p.name for p in (REPO / "csrc").glob("*.cu"))
    assert "xxh3_paged.cu" in sources
    for name in sources:
        assert source_path(name).read_bytes() == (REPO / "csrc" / name).read_bytes()
    with pytest.raises(FileNotFoundError, match="none of"):
        source_path("no_such_kernel.cu")


@pytest.mark.slow
def test_wheel_carries_the_kernel_sources_where_the_loader_looks(tmp_path):
    """Without them an installed engine silently lost its GPU checksums (host checks instead)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    in_package = CSRC_DIRS[0].relative_to(REPO)  # engines/csrc
    with zipfile.ZipFile(wheel) as archive:
        for source in (REPO / "csrc").glob("*.cu"):
            assert archive.read(f"{in_package.as_posix()}/{source.name}") == source.read_bytes()
