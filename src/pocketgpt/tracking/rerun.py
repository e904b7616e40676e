"""Rerun a logged run from its MLflow record alone: ``pocketgpt-train +rerun=RUN_ID [overrides]``.

The job is the source run's logged ``config.yaml``, not the local ``conf/train.yaml``: it is
composed over the same schemas (``train_schema``), the command line's overrides go on top with
Hydra's grammar (``trainer.max_steps=50``, sweeps with ``-m``), and the new run, in the source's
experiment, is tagged ``pocketgpt.rerun_of=RUN_ID``. Before training, every difference between
the source's environment (``env.*`` tags, ``environment/requirements.txt``, corpus and tokenizer
fingerprints) and this one is logged as a warning, and the rerun goes on.

How: ``rerun_command_line`` runs before Hydra. It reads the run from the store this command
tracks to (``tracking.uri=...`` on the command line, else ``$MLFLOW_TRACKING_URI``, else
``./mlruns``), writes its config as the primary config ``rerun.yaml`` of a temporary folder and
points Hydra there. The ``+rerun=RUN_ID`` override stays on the command line, so the job
(``train.build`` through ``pop_rerun`` and ``check_rerun``) knows its source.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from pocketgpt.config import TrainConfig
from pocketgpt.errors import ConfigError, TrackingError
from pocketgpt.tracking.environment import (
    PACKAGES,
    REQUIREMENTS_ARTIFACT,
    REQUIREMENTS_DIR,
    TAG_PREFIX,
    parse_requirements,
    pip_freeze,
)
from pocketgpt.tracking.store import check_reachable, make_client, tracking_uri

log = logging.getLogger(__name__)

RERUN_KEY = "rerun"  # +rerun=RUN_ID
RERUN_TAG = "pocketgpt.rerun_of"
DIFFERENCES_TAG = "pocketgpt.rerun_differences"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
CONFIG_ARTIFACT = "config.yaml"  # the resolved config every pocketgpt-train run logs
CONFIG_NAME = "rerun"
# Where the source ran, not what it ran: these come from this command (its overrides, its
# environment, the schema's defaults), not from the source's record. A rerun starts fresh in
# its own output folder; model.vocab_size is filled in from the tokenizer by training.
LOCAL_KEYS = (
    "tracking.uri",
    "cache_dir",
    "trainer.checkpoint_dir",
    "trainer.resume",
    "model.vocab_size",
)
# Hydra options that choose the primary config, which a rerun replaces.
CONFIG_FLAGS = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")
MAX_PACKAGES_LISTED = 8
MAX_TAG = 5000  # MLflow's tag value limit is 8000 characters


@dataclass(frozen=True)
class SourceRun:
    """What a rerun takes from the source run's record."""

    run_id: str
    name: str
    uri: str
    tags: dict[str, str]
    params: dict[str, str]
    config: dict  # its logged config.yaml
    requirements: str | None  # its environment/requirements.txt, if it logged one


# --------------------------------------------------------------------------- reading a run


def load_source(run_id: str, uri: str) -> SourceRun:
    """The run ``run_id`` of the store at ``uri``, with its config checked against this
    pocketgpt's schemas; a ConfigError names what is missing or no longer fits."""
    from mlflow.exceptions import MlflowException

    client = make_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"+rerun={run_id}: the MLflow store {uri} has no such run; check the id, or point "
            "tracking.uri=... (or MLFLOW_TRACKING_URI) at the store that has it"
        ) from None
    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if CONFIG_ARTIFACT not in names:
            raise ConfigError(
                f"+rerun={run_id}: the run logged no {CONFIG_ARTIFACT} (it was not made by "
                "pocketgpt-train), so there is no config to rerun; pick a run pocketgpt-train made"
            )
        with tempfile.TemporaryDirectory() as tmp:
            config_text = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
            requirements = None
            if REQUIREMENTS_DIR in names:
                path = client.download_artifacts(run_id, REQUIREMENTS_ARTIFACT, tmp)
                requirements = Path(path).read_text()
    except (MlflowException, OSError) as e:
        raise TrackingError(
            f"+rerun={run_id}: reading the run's artifacts from {uri} failed: {e}"
        ) from None
    config = _parse_config(config_text, run_id)
    _check_composes(_job_config(config), run_id, run.data.tags.get("pocketgpt.version"))
    return SourceRun(
        run_id=run_id,
        name=run.info.run_name or run_id,
        uri=uri,
        tags=dict(run.data.tags),
        params=dict(run.data.params),
        config=config,
        requirements=requirements,
    )


def _parse_config(text: str, run_id: str) -> dict:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"+rerun={run_id}: its {CONFIG_ARTIFACT} is not YAML ({first})") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"+rerun={run_id}: its {CONFIG_ARTIFACT} is not a mapping of settings "
            f"(a {type(config).__name__}); pick a run pocketgpt-train made"
        )
    return config


def _check_composes(config: dict, run_id: str, version: str | None) -> None:
    """The logged config over this pocketgpt's schemas: an unknown key, a wrong type or a
    value outside an Enum fails here, before Hydra (whose message would be several lines)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(TrainConfig), config)
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = f" at {e.full_key}" if getattr(e, "full_key", None) else ""
        made_by = f"pocketgpt {version}" if version else "the pocketgpt that made it"
        raise ConfigError(
            f"+rerun={run_id}: its logged {CONFIG_ARTIFACT} no longer composes with this "
            f"pocketgpt's settings ({reason}{key}); rerun it with {made_by}"
        ) from None


def _job_config(config: dict) -> dict:
    """The source's config without the keys of the machine it ran on (``LOCAL_KEYS``)."""
    config = copy.deepcopy(config)
    for key in LOCAL_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


# --------------------------------------------------------------------------- the command line


def split_rerun_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """(RUN_ID of ``+rerun=RUN_ID``, or None; the other arguments)."""
    found, rest = [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == RERUN_KEY and not arg.startswith("-"):
            found.append(value.strip().strip("'\""))
        else:
            rest.append(arg)
    if not found:
        return None, args
    if len(found) > 1 or not found[0]:
        raise ConfigError(
            f"+rerun needs one run id, got {' '.join('+rerun=' + f for f in found)}; "
            "pass +rerun=RUN_ID once"
        )
    return found[0], rest


def _override_value(args: list[str], key: str) -> str | None:
    """The value the command-line overrides give ``key`` (the last one wins), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in args if a.partition("=")[0].lstrip("+~") == key]
    if not candidates:
        return None
    override = OverridesParser.create().parse_overrides(candidates[-1:])[0]
    if override.is_delete():
        return None
    value = override.value()
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{candidates[-1]}: a rerun reads its source from one store; give one {key}"
        )
    return value


@contextmanager
def rerun_command_line(args: list[str]) -> Iterator[list[str]]:
    """``args`` as they are, or for ``+rerun=RUN_ID``: the arguments that make Hydra compose
    that run's logged config (a temporary ``rerun.yaml``, kept while the command runs)."""
    run_id, rest = split_rerun_arg(args)
    if run_id is None:
        yield args
        return
    flags = [a for a in rest if a.partition("=")[0] in CONFIG_FLAGS]
    if flags:
        raise ConfigError(f"+rerun={run_id} takes its config from the run; drop {' '.join(flags)}")
    uri = tracking_uri(
        _override_value(rest, "tracking.uri"),
        create=False,
        error=TrackingError,
        hint="+rerun reads the run from tracking.uri=..., else MLFLOW_TRACKING_URI, else "
        "./mlruns; point one of them at the store that has the run",
    )
    check_reachable(uri, error=TrackingError)
    source = load_source(run_id, uri)
    with tempfile.TemporaryDirectory(prefix="pocketgpt-rerun-") as tmp:
        # A sweep's jobs keep Hydra's names (#0 a=1), which tell them apart.
        rename = not any(a in ("-m", "--multirun") for a in rest)
        (Path(tmp) / f"{CONFIG_NAME}.yaml").write_text(rerun_yaml(source, rename))
        # Quoted: Hydra would read an id like 1234e5 as a number.
        yield ["--config-dir", tmp, "--config-name", CONFIG_NAME, *rest, f"+rerun='{run_id}'"]


def rerun_yaml(source: SourceRun, rename: bool = True) -> str:
    """The primary config of a rerun: the schemas, the source's job config, and Hydra's own
    settings (output folders, the sweep callback) as the package's ``train.yaml`` has them.
    ``rename``: the new run is called ``<source run name>-rerun`` (a command-line
    ``tracking.run_name`` still wins)."""
    job = _job_config(source.config)
    if rename:
        job.setdefault("tracking", {})["run_name"] = f"{source.name}-rerun"
    train_yaml = yaml.safe_load((resources.files("pocketgpt.conf") / "train.yaml").read_text())
    # Of train.yaml's defaults, only Hydra's own choices (e.g. override hydra/job_logging).
    hydra_defaults = [
        entry
        for entry in train_yaml.get("defaults", [])
        if isinstance(entry, dict) and any(str(k).split()[-1].startswith("hydra/") for k in entry)
    ]
    defaults = ["train_schema", "_self_", *hydra_defaults]
    return OmegaConf.to_yaml({"defaults": defaults, **job, "hydra": train_yaml.get("hydra", {})})


def pop_rerun(dcfg: DictConfig) -> tuple[DictConfig, str | None]:
    """(the config without its ``rerun`` key, the source run id or None)."""
    if RERUN_KEY not in dcfg:
        return dcfg, None
    dcfg = dcfg.copy()
    with open_dict(dcfg):
        run_id = dcfg.pop(RERUN_KEY)
    return dcfg, str(run_id)


# --------------------------------------------------------------------------- comparing


def environment_differences(
    source: SourceRun, env: dict[str, str], fingerprints: dict[str, str]
) -> list[str]:
    """One line per difference between the source's record and this job: ``env.*`` tags,
    installed packages, corpus and tokenizer fingerprints."""
    lines = []
    if not any(k.startswith(TAG_PREFIX) for k in source.tags):
        lines.append(
            "the source run recorded no environment (env.* tags; an older pocketgpt made it), "
            "so what changed since cannot be named"
        )
    else:
        for key, now in env.items():
            then = source.tags.get(key)
            if then is None:
                lines.append(f"{key}: not recorded by the source run, {now} now")
            elif then != now:
                lines.append(f"{key}: {then} then, {now} now")
    for key, now in fingerprints.items():
        then = source.params.get(key)
        if then is not None and then != now:
            what = key.removeprefix("derived.").removesuffix("_fingerprint")
            lines.append(f"{key}: {then[:12]} then, {now[:12]} now (the {what} is not the same)")
    if source.requirements is not None:
        line = _package_differences(source.requirements, pip_freeze())
        if line:
            lines.append(line)
    return lines


def _package_differences(then_text: str, now_text: str) -> str | None:
    """One line naming the installed packages that differ (those with an env.* tag aside)."""
    then, now = parse_requirements(then_text), parse_requirements(now_text)
    tagged = set(PACKAGES.values())
    changed = []
    for name in sorted((then.keys() | now.keys()) - tagged):
        a, b = then.get(name), now.get(name)
        if a != b:
            changed.append(f"{name} {a or '(absent)'} -> {b or '(absent)'}")
    if not changed:
        return None
    listed = ", ".join(changed[:MAX_PACKAGES_LISTED])
    more = len(changed) - MAX_PACKAGES_LISTED
    return f"{REQUIREMENTS_ARTIFACT}: {len(changed)} packages differ: {listed}" + (
        f", and {more} more" if more > 0 else ""
    )


def check_rerun(
    run_id: str, uri: str, env: dict[str, str], fingerprints: dict[str, str]
) -> dict[str, str]:
    """Warn (one line each) about every difference between the source run and this job, and
    return the tags of the new run: its source, its description and the differences."""
    source = load_source(run_id, uri)
    differences = environment_differences(source, env, fingerprints)
    for line in differences:
        log.warning("rerun of %s: %s", run_id, line)
    tags = {
        RERUN_TAG: run_id,
        NOTE_TAG: f"Rerun of run {source.name} ({run_id}) from its logged config.",
    }
    if differences:
        tags[DIFFERENCES_TAG] = "\n".join(differences)[:MAX_TAG]
    return tags
