"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable), and puts the
CUDA sources of csrc/ into a wheel's engines and kvstore packages, which compile them at run time
(NVRTC): the engines check blocks in their pages, the server its HBM tier's copies."""
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    def run(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tools.gen_proto import generate

        generate()
        super().run()
        for package in ("engines", "kvstore"):
            kernels = Path(self.build_lib) / package / "csrc"
            kernels.mkdir(parents=True, exist_ok=True)
            for source in (Path(__file__).resolve().parent / "csrc").glob("*.cu"):
                shutil.copy2(source, kernels / source.name)


setup(cmdclass={"build_py": BuildWithProto})
