"""The package's optional compiled parts; all other metadata lives in pyproject.toml.

``pip install -e .`` (``make install``) and ``pip wheel .`` compile, with the machine's compilers:

- ``pocketgpt/tokenizer/_bpe_core.c``: the BPE encoder's C core;
- ``pocketgpt/native/csrc/*.cpp``: the native inference engine (C++17, OpenMP, pybind11).

Both are ``optional=True``: where there is no compiler (or a build fails), setuptools prints a
warning and installs the package without it; ``BPETokenizer`` then runs its pure-Python merge
loop (same ids, slower) and ``engine=auto`` generates with PyTorch (with a one-line notice).
``POCKETGPT_NATIVE=0`` leaves the engine out on purpose (its -O3 build takes ~30 s of CPU).
"""

import os
from glob import glob

from setuptools import Extension, setup


def native_engine() -> list[Extension]:
    """The C++ engine, when pybind11 (a build requirement) is importable."""
    if os.environ.get("POCKETGPT_NATIVE", "1") == "0":
        print("pocketgpt: POCKETGPT_NATIVE=0; building without the native engine", flush=True)
        return []
    try:
        import pybind11
    except ImportError:  # e.g. --no-build-isolation without pybind11: PyTorch path only
        print("pocketgpt: pybind11 not found; skipping the native engine", flush=True)
        return []
    return [
        Extension(
            "pocketgpt.native._engine",
            sources=sorted(glob("src/pocketgpt/native/csrc/*.cpp")),
            depends=sorted(glob("src/pocketgpt/native/csrc/*.hpp")),
            include_dirs=[pybind11.get_include()],
            language="c++",
            extra_compile_args=[
                "-O3",
                "-std=c++17",
                "-fopenmp",
                "-fvisibility=hidden",
                "-Wno-psabi",  # 16-float vectors in inlined helpers: no ABI crosses a call
                "-g0",  # no debug info: 7 MB -> under 1 MB
            ],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]


setup(
    ext_modules=[
        Extension(
            "pocketgpt.tokenizer._bpe_core",
            sources=["src/pocketgpt/tokenizer/_bpe_core.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        *native_engine(),
    ]
)
