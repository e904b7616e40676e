"""Screenshots of the MLflow UI for the README: the runs table and one run's page.

    python scripts/ui_screenshots.py --store sqlite:///mlruns/mlflow.db --out docs/img

Starts ``mlflow ui`` on the store (a free local port), waits until it answers, and has headless
Chromium (Debian's ``chromium`` package) render each page to a PNG. The run shown is the newest
finished run of the experiment that is not a sweep's parent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: the MLflow UI did not answer at {url} within {seconds:.0f} s")


def screenshot(chromium: str, url: str, out: Path, size: str) -> None:
    """Render ``url`` after its scripts have run (virtual time) into ``out``."""
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run dialogs
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # root in a container
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {out} ({out.stat().st_size:,} bytes) from {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--experiment", default="pocketgpt")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--size", default="1800,1000")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: no chromium on PATH; apt-get install chromium")
    from mlflow import MlflowClient

    client = MlflowClient(args.store)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"error: no experiment {args.experiment!r} in {args.store}; run make train first")
    runs = [
        r
        for r in client.search_runs(
            [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time DESC"]
        )
        if r.data.tags.get("pocketgpt.role") != "sweep"
    ]
    if not runs:
        sys.exit(f"error: experiment {args.experiment!r} has no finished training run")

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", args.store, "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/health", 60)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        exp_url = f"{base}/#/experiments/{exp.experiment_id}"
        view = "?workflowType=machine_learning"  # the UI's "Model training" side
        screenshot(chromium, f"{exp_url}{view}", out / "mlflow-runs.png", args.size)
        run_url = f"{exp_url}/runs/{runs[0].info.run_id}"
        screenshot(chromium, run_url + view, out / "mlflow-run.png", args.size)
        metrics_url = f"{run_url}/model-metrics{view}"
        screenshot(chromium, metrics_url, out / "mlflow-run-metrics.png", args.size)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
