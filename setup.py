"""Generates the gRPC stubs from proto/ as part of every build (wheel or editable), puts the CUDA
sources of csrc/ into a wheel's engines and kvstore packages, which compile them at run time (NVRTC:
the engines check blocks in their pages, the server its HBM tier's copies), and compiles the control
path's C: kvwire._native from csrc/kvnative (block keys, the local socket's frames, the Pin call's
messages) and kvstore._native from csrc/kvstore_native (the server's prefix Pin bookkeeping).

Both extensions are optional on purpose: where one cannot be compiled the install still succeeds, with
a warning here and again at import (kvwire/native.py), and its callers run the pure-Python reference of
every function it holds.
"""
import shutil
import sys
from glob import glob
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

NATIVE = [
    Extension("kvwire._native", sources=sorted(glob("csrc/kvnative/*.c")),
              depends=sorted(glob("csrc/kvnative/*.h")) + ["csrc/third_party/xxhash/xxhash.h"], extra_link_args=["-pthread"]),
    Extension("kvstore._native", sources=sorted(glob("csrc/kvstore_native/*.c")),
              depends=sorted(glob("csrc/kvstore_native/*.h")) + ["csrc/third_party/xxhash/xxhash.h"]),
]


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


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the extension only makes the control path faster."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as err:  # no compiler at all, no Python headers, or nothing built to copy in place
            self._skip(err)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # the compiler failed
            self._skip(err, ext.name)

    @staticmethod
    def _skip(err: Exception, name: str = "the control path's C extensions") -> None:
        print(f"WARNING: {name} not built ({err}); kvstore installs without it and runs the pure-Python "
              "reference instead (block keys, local socket frames, prefix Pins several times slower)", file=sys.stderr)


setup(ext_modules=NATIVE, cmdclass={"build_py": BuildWithProto, "build_ext": OptionalBuildExt})
