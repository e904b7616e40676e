"""The built wheel, installed into a fresh virtual environment, runs from any folder.

The new venv gets pocketgpt from the wheel only; its dependencies come from the test's own
environment through a ``.pth`` line (installing torch and mlflow again would take minutes and
the registries), which adds no pocketgpt: the editable install's own hook is never run there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from .conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    # Without the C++ engine (its -O3 build costs ~30 s): this venv is also the machine without
    # a compiler, where generate falls back to PyTorch (tests/test_native.py covers the engine).
    env["POCKETGPT_NATIVE"] = "0"
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        cwd=tmp,
        env=env,
    )  # fmt: skip
    wheel = next(dist.glob("pocketgpt-*.whl"))
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(target)  # pip from ensurepip: offline
    python = target / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp,
        env=env,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["POCKETGPT_CACHE_DIR"] = str(tmp / "cache")
    return {"python": python, "bin": target / "bin", "site": Path(site), "work": work, "env": env}


def test_the_wheel_holds_the_configs_and_the_corpus(installed):
    package = installed["site"] / "pocketgpt"
    assert (package / "conf" / "train.yaml").is_file()
    assert (package / "conf" / "experiment" / "lr_sweep.yaml").is_file()
    assert (package / "corpus" / "wikitext2_mini" / "train.txt.gz").is_file()
    where = _run(
        [installed["python"], "-c", "import pocketgpt; print(pocketgpt.__file__)"],
        cwd=installed["work"],
        env=installed["env"],
    ).stdout
    assert where.strip() == str(package / "__init__.py")


def test_console_scripts_train_and_generate_from_another_folder(installed):
    work, env, bin_dir = installed["work"], installed["env"], installed["bin"]
    job = _run([bin_dir / "pocketgpt-train", "--cfg", "job"], cwd=work, env=env).stdout
    assert "d_model: 128" in job and "max_steps: 600" in job
    tiny = [*TINY, "trainer.max_steps=5", "trainer.eval_interval=5", "experiment=baseline"]
    out = _run([bin_dir / "pocketgpt-train", *tiny], cwd=work, env=env).stdout
    assert "final: val loss" in out and (work / "mlruns" / "mlflow.db").is_file()
    text = _run(
        [bin_dir / "pocketgpt-generate", "model_uri=best:baseline", "max_new_tokens=5"],
        cwd=work,
        env=env,
    ).stdout
    assert text.startswith("The meaning of life is")
    # `python -m` works too, and a user's config folder is searched besides the package's.
    mine = work / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\nmodel:\n  d_model: 48\n")
    job = _run(
        [installed["python"], "-m", "pocketgpt.train", "--config-dir", str(work / "my_conf"),
         "experiment=mine", "--cfg", "job"],
        cwd=work,
        env=env,
    ).stdout  # fmt: skip
    assert "d_model: 48" in job
