"""Only the optional C core of the tokenizer; all other metadata lives in pyproject.toml.

``pip install -e .`` (``make install``) and ``pip wheel .`` compile
``pocketgpt/tokenizer/_bpe_core.c`` with the machine's C compiler. ``optional=True``: where
there is no compiler (or the build fails), setuptools prints a warning and installs the package
without it, and ``BPETokenizer`` runs its pure-Python merge loop (same ids, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pocketgpt.tokenizer._bpe_core",
            sources=["src/pocketgpt/tokenizer/_bpe_core.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
