"""Build the optional C kernel; embkv falls back to numpy when it cannot be compiled."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the kernel if a C compiler is there; otherwise warn and install the numpy path."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing: the package still works, slower
            print(f"embkv: C kernel not built ({exc}); using the numpy fallback", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if os.environ.get("EMBKV_REQUIRE_KERNEL") == "1":
                raise
            print(f"embkv: C kernel not built ({exc}); using the numpy fallback", file=sys.stderr)


setup(
    ext_modules=[
        Extension(
            "embkv.file._kernels",
            sources=["src/embkv/file/_kernels.c"],
            include_dirs=["src/embkv/file"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-function"],
        ),
        Extension(
            "embkv.train._idmap",
            sources=["src/embkv/train/_idmap.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
