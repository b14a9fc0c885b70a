"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable)."""
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


setup(cmdclass={"build_py": BuildWithProto})
