"""deploy/ files pass only the worker settings and flags the code reads (worker/setting_table.py);
docs/settings.md and the commands' options are held to that table by tests/test_settings_doc.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import yaml

from worker.cli import main
from worker.setting_table import TABLE
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SETTING_NAMES = {setting.env for setting in TABLE}


def command_options(name: str) -> set[str]:
    command = main.commands[name]
    return {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts}


# -- what deploy/ passes to the worker --------------------------------------------------------


def compose_workers() -> dict[str, dict]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return {name: svc for name, svc in compose["services"].items() if name.startswith("worker")}


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def worker_env_vars() -> dict[str, set[str]]:
    """Every LABELER_* variable deploy/ gives a worker, with where it came from."""
    found: dict[str, set[str]] = {}

    def add(names: object, where: str) -> None:
        for name in names:
            if str(name).startswith("LABELER_"):
                found.setdefault(str(name), set()).add(where)

    for name, service in compose_workers().items():
        add(service["environment"], f"compose {name}")
    for doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            add(doc["data"], "k8s ConfigMap")
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                add([item["name"] for item in container.get("env", [])], "k8s Deployment")
    add(env_file(DEPLOY / "systemd" / "worker.env"), "systemd worker.env")
    unit = (DEPLOY / "systemd" / "labeler-worker@.service").read_text()
    add(re.findall(r"\b(LABELER_[A-Z_]+)=", unit), "systemd unit")
    for dockerfile in (DEPLOY / "docker").glob("Dockerfile.*"):
        add(re.findall(r"\b(LABELER_[A-Z_]+)=", dockerfile.read_text()), dockerfile.name)
    return found


def worker_argvs() -> dict[str, list[str]]:
    """The argument lists deploy/ hands to `labeler worker`."""
    argvs = {f"compose {name}": list(svc["command"]) for name, svc in compose_workers().items()}
    for doc in k8s_documents():
        if doc["kind"] == "Deployment":
            argvs["k8s Deployment"] = list(doc["spec"]["template"]["spec"]["containers"][0]["args"])
    unit = (DEPLOY / "systemd" / "labeler-worker@.service").read_text()
    exec_line = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1)
    inner = shlex.split(exec_line)[-1]  # /bin/sh -c '... labeler worker ARGS'
    argvs["systemd unit"] = shlex.split(inner.split("labeler worker", 1)[1])
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "docker" / "Dockerfile.gpu").read_text(), re.MULTILINE)
    argvs["Dockerfile.gpu CMD"] = yaml.safe_load(cmd.group(1))
    return argvs


def test_deploy_passes_only_settings_the_code_reads() -> None:
    found = worker_env_vars()
    assert {"LABELER_BROKER_URL", "LABELER_MODEL", "LABELER_METRICS_PORT"} <= set(found)
    unknown = {name: sorted(where) for name, where in found.items() if name not in SETTING_NAMES}
    assert not unknown, f"deploy/ sets variables worker/settings.py does not read: {unknown}"


def test_deploy_values_parse_as_settings() -> None:
    """The literal values (not the ${...} placeholders) are valid for their settings."""
    for service in compose_workers().values():
        values = {k: str(v) for k, v in service["environment"].items() if "${" not in str(v)}
        Settings.from_env(values)  # raises SettingsError on a bad value
    for doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            Settings.from_env(doc["data"])
    Settings.from_env(env_file(DEPLOY / "systemd" / "worker.env"))


def test_deploy_passes_only_worker_flags_that_exist() -> None:
    options = command_options("worker")
    for where, argv in worker_argvs().items():
        flags = [arg.split("=")[0] for arg in argv if arg.startswith("-")]
        assert flags, where
        assert set(flags) <= options, f"{where}: labeler worker has no {set(flags) - options}"
