"""deploy/: the Kubernetes manifests parse, validate strictly, and keep the rules their comments state.

Offline: Kubernetes' published schemas come with ``kubernetes-validate`` (dev requirements), KEDA's
ScaledObject schema is kept in deploy/schemas/ with its source and version. Each overlay is rendered the
way ``kubectl apply -k`` does (its kustomization only lists resources; no patch or generator is allowed, so
the files are the resources), and compared with ``kubectl kustomize`` when kubectl is on PATH.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from devtools.demo import producer as make_producer
from devtools.demo import send
from devtools.servers import WorkerProcess
from forwarder.errors import is_secret_variable
from forwarder.settings import VARS, Settings
from forwarder.shutdown_budget import grace_period_parts

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("redis", "sqs")
#: The Kubernetes version the manifests are written for (native sidecars are GA there), and the range checked.
KUBERNETES = "1.33.0"
KUBERNETES_CHECKED = ("1.30.0", KUBERNETES, "1.37.0")
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-scaledobject-v2.7.1.yaml"
#: Variables in the ConfigMaps and Secrets that KEDA reads and the worker does not.
KEDA_ONLY = {"REDIS_ADDRESS", "REDIS_PASSWORD"}
#: The payload allowance per in-flight task in the memory rules (deployment.yaml), MiB.
PAYLOAD_MIB = 8
SIZING = ROOT / "bench" / "results" / "sizing.json"


# ------------------------------------------------------------------------------------------ rendering


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k folder`` creates: every listed file's documents, bases first."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, f"{folder}: only `resources` is allowed"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def container(docs: list[dict[str, Any]], name: str = "forwarder") -> dict[str, Any]:
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


def worker_env(overlay: str) -> dict[str, str]:
    """What the worker container's envFrom gives it: both ConfigMaps, and the example Secrets' values."""
    docs = render(DEPLOY / overlay)
    env = {**find(docs, "ConfigMap", "forwarder-config")["data"], **find(docs, "ConfigMap", "forwarder-broker")["data"]}
    for example in (DEPLOY / "base" / "secret.example.yaml", DEPLOY / overlay / "secret.example.yaml"):
        if example.exists():
            env.update(yaml.safe_load(example.read_text())["stringData"])
    return env


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m forwarder check`` with only ``env`` (and PATH), as the container would run it."""
    return subprocess.run([sys.executable, "-m", "forwarder", "check"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}, timeout=60)


def grace_needed(overlay: str) -> int:
    done = check(worker_env(overlay))
    assert done.returncode == 0, done.stdout + done.stderr
    return int(re.search(r"terminationGracePeriodSeconds >= (\d+)", done.stdout).group(1))  # type: ignore[union-attr]


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


# ------------------------------------------------------------------------------------------ parsing, schemas


def test_every_manifest_parses_and_each_overlay_renders_as_kubectl_does() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 12
    for path in files:
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(path.read_text()) if d is not None), path
    for overlay in OVERLAYS:
        kinds = sorted(d["kind"] for d in render(DEPLOY / overlay))
        assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject",
                         "ServiceAccount"], kinds
        if shutil.which("kubectl"):  # the real renderer agrees (not needed: kustomizations only list files)
            done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
            assert sorted(yaml.safe_load_all(done.stdout), key=key) == sorted(render(DEPLOY / overlay), key=key)


def core_resources() -> list[tuple[str, dict[str, Any]]]:
    docs = [(overlay, d) for overlay in OVERLAYS for d in render(DEPLOY / overlay) if d["kind"] != "ScaledObject"]
    return docs + [(str(p.relative_to(DEPLOY)), yaml.safe_load(p.read_text())) for p in DEPLOY.rglob("secret.example.yaml")]


@pytest.mark.parametrize("version", KUBERNETES_CHECKED)
def test_core_resources_validate_strictly_against_kubernetes_schemas(version: str) -> None:
    for origin, doc in core_resources():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{origin} {doc['kind']}/{doc['metadata']['name']} on Kubernetes {version}: {exc.message}")


def test_the_kubernetes_validation_is_strict() -> None:
    deployment = copy.deepcopy(find(render(DEPLOY / "redis"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def keda_validator() -> jsonschema.Validator:
    """KEDA's ScaledObject schema, strict: an object without ``additionalProperties`` takes no unknown field
    (what ``kubectl apply --validate=strict`` does with a CRD's structural schema)."""
    schema = yaml.safe_load(KEDA_SCHEMA.read_text())["openAPIV3Schema"]

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return jsonschema.Draft7Validator(schema, format_checker=None)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_validate_against_kedas_schema(overlay: str) -> None:
    scaled = find(render(DEPLOY / overlay), "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in keda_validator().iter_errors(scaled)]
    assert errors == []
    typo = copy.deepcopy(scaled)
    typo["spec"]["pollingIntervall"] = 15
    assert list(keda_validator().iter_errors(typo)), "the KEDA validation must refuse an unknown field"


# ------------------------------------------------------------------------------------------ env, probes, secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmaps_env_passes_the_workers_check(overlay: str) -> None:
    env = worker_env(overlay)
    known = {var.name for var in VARS}
    assert set(env) - known - KEDA_ONLY == set(), "a variable the worker does not know (a typo?)"
    done = check(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration OK (pool=prefork, queue=launch-endpoint-id-example" in done.stdout
    # Each variable set for the worker is the one the container's env names (none shadowed by another source)
    envs = [e["name"] for e in container(render(DEPLOY / overlay))["env"]]
    assert not set(envs) & set(env)


def test_a_misspelt_variable_stops_the_deployed_worker() -> None:
    env = worker_env("redis")
    assert env["FORWARDER_STRICT_ENV"] == "1"
    done = check({**env, "FORWARDER_HOOK": "callback"})
    assert done.returncode == 2 and "FORWARDER_HOOK is not a variable this worker reads (did you mean FORWARDER_HOOKS?)" in done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_probe_commands_exist(overlay: str) -> None:
    forwarder = container(render(DEPLOY / overlay))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = forwarder[probe]["exec"]["command"]
        assert command[:4] == ["python", "-m", "forwarder", "probe"] and command[4] in ("live", "ready"), command
        done = subprocess.run([sys.executable, *command[1:], "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr


def test_nothing_secret_in_a_configmap() -> None:
    for overlay in OVERLAYS:
        for doc in render(DEPLOY / overlay):
            if doc["kind"] != "ConfigMap":
                continue
            for name, value in doc["data"].items():
                assert not is_secret_variable(name), name
                assert "@" not in value or not re.match(r"\w+://[^/]*:[^/]*@", value), f"{name} holds a password"
        # Each Secret the pod reads is optional or created by the team, never shipped with values
        assert all(d["kind"] != "Secret" for d in render(DEPLOY / overlay))
    redis_secret = yaml.safe_load((DEPLOY / "redis" / "secret.example.yaml").read_text())["stringData"]
    assert {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REDIS_PASSWORD"} <= set(redis_secret)


# ------------------------------------------------------------------------------------------ the stated rules


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_and_scale_down_wait_for_the_longest_task(overlay: str) -> None:
    docs = render(DEPLOY / overlay)
    needed = grace_needed(overlay)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= needed
    scaled = find(docs, "ScaledObject")["spec"]
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] <= 3600
    env = worker_env(overlay)
    if overlay == "redis":
        # LLEN cannot see the busy replicas: scaling down or to zero waits for any task taken before the list
        # emptied; and a message whose worker died comes back only after the longest task
        assert scaled["cooldownPeriod"] >= needed
        assert down["stabilizationWindowSeconds"] >= needed
        assert int(env["CELERY_BROKER_VISIBILITY_TIMEOUT"]) > needed
    # The startup probe outlasts the wait for the model and the worker's own start
    startup = container(docs)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= float(env["FORWARDER_READY_TIMEOUT"]) + 30
    # The model outlives the worker: a native sidecar, stopped after the worker's warm shutdown
    assert container(docs, "model")["restartPolicy"] == "Always"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_targets_follow_the_concurrency_and_the_queue(overlay: str) -> None:
    docs = render(DEPLOY / overlay)
    env = worker_env(overlay)
    (trigger,) = find(docs, "ScaledObject")["spec"]["triggers"]
    concurrency = int(env["CELERY_WORKER_CONCURRENCY"])
    if overlay == "redis":  # waiting messages only: a replica per concurrency's worth of backlog
        assert int(trigger["metadata"]["listLength"]) == concurrency
    else:  # waiting and running: ~80 % busy replicas (docs/CAPACITY.md)
        assert int(trigger["metadata"]["queueLength"]) == max(1, int(0.8 * concurrency))
    if overlay == "redis":
        assert trigger["metadata"]["listName"] == env["CELERY_QUEUE"]
        assert trigger["metadata"]["databaseIndex"] == env["CELERY_BROKER_URL"].rsplit("/", 1)[1]
        assert {"REDIS_ADDRESS", "REDIS_PASSWORD"} <= set(env)
    else:
        assert trigger["metadata"]["scaleOnInFlight"] == "true"  # the busy replicas are counted
        assert trigger["metadata"]["queueURLFromEnv"] in env
        assert trigger["metadata"]["awsRegion"] == env["AWS_REGION"]


def test_memory_follows_the_measured_figures() -> None:
    figures = json.loads(SIZING.read_text())["figures"]
    pss, rss = figures["pss_mb"], figures["rss_mb"]
    env = worker_env("redis")
    assert env["CELERY_WORKER_POOL"] == "prefork"
    concurrency = int(env["CELERY_WORKER_CONCURRENCY"])
    per_child_limit = int(env["CELERY_WORKER_MAX_MEMORY_PER_CHILD"]) / 1024  # KiB -> MiB
    resources = container(render(DEPLOY / "redis"))["resources"]
    request, limit = mib(resources["requests"]["memory"]), mib(resources["limits"]["memory"])
    steady = pss["prefork_main"] + concurrency * pss["prefork_child"]
    assert request >= 1.25 * steady + concurrency * PAYLOAD_MIB, (request, steady)
    assert per_child_limit >= 2 * figures["child_rss_max_mb"], "children would be recycled after nearly every task"
    assert limit >= rss["prefork_main"] + concurrency * (per_child_limit + PAYLOAD_MIB), (limit, per_child_limit)
    assert request <= limit


def test_the_worker_runs_as_the_images_user_on_a_read_only_root() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    docs = render(DEPLOY / "redis")
    forwarder = container(docs)
    assert forwarder["securityContext"]["runAsNonRoot"] and forwarder["securityContext"]["runAsUser"] == uid
    assert forwarder["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in forwarder["volumeMounts"]}
    assert Path(worker_env("redis")["FORWARDER_HEALTH_DIR"]).parent.as_posix() in mounts  # the probes' files
    assert "/dev/shm" in mounts  # prefork's semaphores


# ------------------------------------------------------------------------------------------ KEDA's Redis list


def test_the_redis_list_keda_reads_is_the_one_the_queue_fills(redis_server: Any) -> None:
    # Given the ScaledObject's list and database, and tasks queued the way producers queue them, no worker running
    metadata = find(render(DEPLOY / "redis"), "ScaledObject")["spec"]["triggers"][0]["metadata"]
    list_name, db = metadata["listName"], int(metadata["databaseIndex"])
    assert worker_env("redis")["CELERY_BROKER_URL"].endswith(f"/{db}")
    app = make_producer(f"{redis_server.url}/{db}", f"{redis_server.url}/1")
    try:
        for n in range(7):
            send(app, {"args": {"n": n}}, queue=worker_env("redis")["CELERY_QUEUE"])
    finally:
        app.close()
    # Then the length KEDA's redis trigger reads (LLEN listName on that database) counts every one of them
    client = redis.Redis.from_url(f"{redis_server.url}/{db}")
    try:
        assert client.type(list_name) == b"list"
        assert client.llen(list_name) == 7
    finally:
        client.delete(list_name)
        client.close()


def test_the_grace_period_counts_each_part_of_a_warm_shutdown() -> None:
    base = {"FORWARDER_MODEL_CONNECT_TIMEOUT": "5", "FORWARDER_MODEL_READ_TIMEOUT": "600"}
    assert grace_period_parts(Settings.from_env(base)) == {"model": 605, "result_store": 30, "margin": 50}
    hooked = Settings.from_env({**base, "FORWARDER_HOOKS": "callback,logging", "FIREHOSE_STREAM_NAME": "s",
                                "FORWARDER_CALLBACK_RETRIES": "4", "FORWARDER_CALLBACK_TIMEOUT": "10"})
    # Four attempts of 10 s, and 0.5 + 1 + 2 s of backoff between them
    assert grace_period_parts(hooked) == {"model": 605, "result_store": 30, "callback": 44, "logging": 15, "margin": 50}
    assert sum(grace_period_parts(hooked).values()) == 744


# ------------------------------------------------------------------------------------------ read-only root

def read_only_root(writable: Path) -> list[str]:
    """A command prefix: the rest of the command line runs with the root filesystem read-only, in a mount
    namespace of its own, except ``writable`` (the pod's /tmp emptyDir) and /dev/shm (its own tmpfs, as in a pod).
    Wherever the checkout lives (a CI clone under /tmp too), only ``writable`` takes a write."""
    script = 'mount --make-rprivate / && mount --bind "$1" "$1" && mount -o remount,bind,ro / && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(writable)]


def read_only_root_available(writable: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*read_only_root(writable), "true"], capture_output=True, timeout=30).returncode == 0


class ReadOnlyRootWorker(WorkerProcess):
    """The worker as deployment.yaml runs it: ``readOnlyRootFilesystem``, writing only its temporary folder
    (``FORWARDER_HEALTH_DIR`` and ``TMPDIR`` are in it, as in the pod's /tmp) and /dev/shm."""

    def command(self) -> list[str]:
        return [*read_only_root(self.temp_dir), *super().command()]


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_the_worker_needs_only_tmp_and_dev_shm_writable(pool: str, base_env: dict[str, str], producer: Any) -> None:
    worker = ReadOnlyRootWorker({**base_env, "CELERY_WORKER_POOL": pool}, ddtrace=True)
    if not read_only_root_available(worker.temp_dir):
        pytest.skip("needs a mount namespace (root, or unprivileged user namespaces) to make the root read-only")
    # The wrapper really makes the root read-only: writing next to the code, or at the top, fails under it
    for target in (ROOT / "written-on-a-read-only-root", Path("/written-on-a-read-only-root")):
        refused = subprocess.run([*read_only_root(worker.temp_dir), "touch", str(target)], capture_output=True,
                                 text=True, timeout=30)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, target
    try:
        worker.start(timeout=90)
        results = [send(producer, {"args": {"n": n}}, queue=base_env["CELERY_QUEUE"]) for n in range(6)]
        assert [r.get(timeout=30)["status_code"] for r in results] == [200] * 6
        for which in ("live", "ready"):  # the probes read what the worker wrote under /tmp
            done = subprocess.run([sys.executable, "-m", "forwarder", "probe", which], cwd=ROOT, timeout=30,
                                  env={**os.environ, **worker.env}, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        worker.stop(timeout=30)
    assert "Read-only file system" not in worker.output and "Traceback" not in worker.output, worker.output[-3000:]


# ------------------------------------------------------------------------------------------ llm-engine's values

#: llm-engine at the commit of deploy/llm-engine/upstream/ (a8236961): model_engine_server/core/celery/app.py.
#: ``TaskVisibility.VISIBILITY_24H = 3`` is the Redis broker's db (``get_redis_endpoint(task_visibility)``) of
#: every async endpoint (the forwarder hard-codes it; the chart passes it too), with ``visibility_timeout``
#: 86400; Redis results go to db 1 (``get_redis_endpoint(1)``).
LLM_ENGINE_BROKER_DB = 3
LLM_ENGINE_VISIBILITY_SECONDS = 86400
LLM_ENGINE_RESULTS_DB = 1
LLM_ENGINE = DEPLOY / "llm-engine"


def test_the_redis_overlay_uses_llm_engines_broker_db_and_visibility():
    env = worker_env("redis")
    assert env["CELERY_BROKER_URL"].rsplit("/", 1)[1] == str(LLM_ENGINE_BROKER_DB)
    assert env["CELERY_RESULT_BACKEND"].rsplit("/", 1)[1] == str(LLM_ENGINE_RESULTS_DB)
    assert int(env["CELERY_BROKER_VISIBILITY_TIMEOUT"]) == LLM_ENGINE_VISIBILITY_SECONDS
    trigger = find(render(DEPLOY / "redis"), "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert trigger["databaseIndex"] == str(LLM_ENGINE_BROKER_DB)
    # The comment says why, where the value is set
    assert "VISIBILITY_24H" in (DEPLOY / "redis" / "configmap.yaml").read_text()


def test_the_readmes_switching_guide_says_the_same():
    readme = (ROOT / "README.md").read_text()
    guide = readme.split("## Switching from llm-engine's forwarder", 1)[1].split("\n## ", 1)[0]
    assert f"`CELERY_BROKER_VISIBILITY_TIMEOUT={LLM_ENGINE_VISIBILITY_SECONDS}`, and db `/{LLM_ENGINE_BROKER_DB}`" in guide
    assert f"redis://<redis host>:6379/{LLM_ENGINE_BROKER_DB}`" in guide
    assert f"redis://<redis host>:6379/{LLM_ENGINE_RESULTS_DB}`" in guide
    assert "deploy/redis" in guide and "deploy/llm-engine" in guide


def test_only_the_worker_container_has_a_user_and_the_model_keeps_its_own():
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    for overlay in OVERLAYS:
        pod = find(render(DEPLOY / overlay), "Deployment")["spec"]["template"]["spec"]
        assert "runAsUser" not in pod.get("securityContext", {}) and "runAsNonRoot" not in pod.get("securityContext", {})
        assert "fsGroup" not in pod.get("securityContext", {})
        model = container(render(DEPLOY / overlay), "model")
        assert "securityContext" not in model, "the model container keeps its image's user"
        forwarder = container(render(DEPLOY / overlay))["securityContext"]
        assert forwarder["runAsNonRoot"] is True and forwarder["runAsUser"] == uid


# ------------------------------------------------------------------------------------------ llm-engine's chart

#: What two of the chart's helpers render to, for an AWS install with its infra config mounted (no Azure, no
#: s3EndpointUrl): ``modelEngine.asyncForwarderTemplateEnv`` and ``modelEngine.forwarderVolumeMounts`` in
#: charts/model-engine/templates/_helpers.tpl at the same commit.
ASYNC_FORWARDER_ENV = """env:
  - name: DD_TRACE_ENABLED
    value: "${DD_TRACE_ENABLED}"
  - name: DD_REMOTE_CONFIGURATION_ENABLED
    value: "false"
  - name: DD_SERVICE
    value: "${ENDPOINT_NAME}"
  - name: DD_ENV
    value: "${DD_ENV}"
  - name: DD_VERSION
    value: "${GIT_TAG}"
  - name: DD_AGENT_HOST
    valueFrom:
      fieldRef:
        fieldPath: status.hostIP
  - name: AWS_PROFILE
    value: "${AWS_ROLE}"
  - name: AWS_CONFIG_FILE
    value: /opt/.aws/config
  - name: RESULTS_S3_BUCKET
    value: "${RESULTS_S3_BUCKET}"
  - name: BASE_PATH
    value: "/workspace"
  - name: ML_INFRA_SERVICES_CONFIG_PATH
    value: "/workspace/model-engine/model_engine_server/core/configs/config.yaml"
  - name: CELERY_QUEUE
    value: "${QUEUE}"
  - name: CELERY_TASK_VISIBILITY
    value: "VISIBILITY_24H"
  - name: S3_BUCKET
    value: "${CELERY_S3_BUCKET}\""""
FORWARDER_VOLUME_MOUNTS = """
volumeMounts:
  - name: config-volume
    mountPath: /opt/.aws/config
    subPath: config
  - name: user-config
    mountPath: /workspace/user_config
    subPath: raw_data
  - name: endpoint-config
    mountPath: /workspace/endpoint_config
    subPath: raw_data
  - name: infra-service-config-volume
    mountPath: /workspace/model-engine/model_engine_server/core/configs"""
#: What llm-engine substitutes into the rendered template for one async endpoint (``safe_substitute``).
ENDPOINT_ARGUMENTS = {
    "QUEUE": "launch-endpoint-id-end_abc123", "SQS_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123/launch-endpoint-id-end_abc123",
    "CONCURRENT_REQUESTS_PER_WORKER": "4", "PREDICT_ROUTE": "/predict", "HEALTHCHECK_ROUTE": "/readyz",
    "USER_CONTAINER_PORT": "5005", "GIT_TAG": "abc", "FORWARDER_CONFIG_FILE_NAME": "service--forwarder.yaml",
    "FORWARDER_CPUS_LIMIT": "1", "FORWARDER_MEMORY_LIMIT": "2Gi", "FORWARDER_STORAGE_LIMIT": "1G",
    "DD_TRACE_ENABLED": "true", "ENDPOINT_NAME": "my-endpoint", "DD_ENV": "prod", "AWS_ROLE": "ml-worker",
    "RESULTS_S3_BUCKET": "results", "CELERY_S3_BUCKET": "celery",
}
CHART_VALUES = {
    "celeryForwarder": {"image": {"repository": "registry.example.com/celery-forwarder", "tag": "0.1.0"}},
    "config": {"values": {"infra": {"redis_host": "redis.example.internal", "s3_bucket": "llm-engine",
                                    "default_region": "us-east-1", "firehose_stream_name": "inference-logs"}}},
}


@pytest.fixture(scope="module")
def patched_chart(tmp_path_factory: pytest.TempPathFactory) -> str:
    """llm-engine's template (deploy/llm-engine/upstream/) with deploy/llm-engine's patch applied by git."""
    work = tmp_path_factory.mktemp("llm-engine")
    target = work / "charts" / "model-engine" / "templates" / "service_template_config_map.yaml"
    target.parent.mkdir(parents=True)
    shutil.copy(LLM_ENGINE / "upstream" / "service_template_config_map.yaml.tpl", target)
    done = subprocess.run(["git", "apply", "--verbose", str(LLM_ENGINE / "model-engine-chart.patch")], cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return target.read_text()


def async_segments(template: str) -> list[str]:
    """The text of each ``{{- else if eq $mode "async" }}`` branch of the forwarder containers (to its ``end``)."""
    lines = template.splitlines()
    segments = []
    for start, line in enumerate(lines):
        if line.strip() != '{{- else if eq $mode "async" }}':
            continue
        depth, end = 0, start + 1
        while True:
            stripped = lines[end].strip()
            if stripped.startswith(("{{- if ", "{{- with ", "{{- range ")):
                depth += 1
            elif stripped == "{{- end }}":
                depth -= 1
                if depth < 0:
                    break
            end += 1
        segments.append("\n".join(lines[start + 1:end]))
    return segments


def dedented_containers(segment: str, broker: str, datadog: bool, values: dict[str, Any]) -> dict[str, Any]:
    import textwrap
    from string import Template

    from tests.support.helm_lite import render as helm_render

    variables = {"$enable_datadog": datadog, "$celery_broker_type": broker, "$config_values": values["config"]["values"],
                 "$forwarder_repository": "public.ecr.aws/b2z8n5q1/model-engine",
                 "$async_forwarder_template_env": ASYNC_FORWARDER_ENV, "$forwarder_volume_mounts": FORWARDER_VOLUME_MOUNTS}
    text = Template(helm_render(segment, {"Values": values}, variables)).safe_substitute(ENDPOINT_ARGUMENTS)
    (found,) = yaml.safe_load(textwrap.dedent(text.strip("\n")))
    return found


def container_env(found: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in found["env"] if "value" in e}


def test_the_patch_only_adds_and_keeps_llm_engines_container_as_the_fallback(patched_chart: str):
    patch = (LLM_ENGINE / "model-engine-chart.patch").read_text()
    assert not [line for line in patch.splitlines() if line.startswith("-") and not line.startswith("---")]
    upstream = (LLM_ENGINE / "upstream" / "service_template_config_map.yaml.tpl").read_text()
    assert "a82369619a365b79a45e49ef6af1045653102615" in (LLM_ENGINE / "README.md").read_text()
    assert len(async_segments(upstream)) == len(async_segments(patched_chart)) == 2  # Deployment, LeaderWorkerSet
    for before, after in zip(async_segments(upstream), async_segments(patched_chart), strict=True):
        for broker in ("sqs", "redis", "servicebus"):
            theirs = dedented_containers(before, broker, True, CHART_VALUES)
            unset = {key: value for key, value in CHART_VALUES.items() if key != "celeryForwarder"}
            assert dedented_containers(after, broker, True, unset) == theirs  # no value: llm-engine's, as before
            assert theirs["command"][5] == "model_engine_server.inference.forwarding.celery_forwarder"
        assert dedented_containers(after, "servicebus", True, CHART_VALUES) == dedented_containers(
            before, "servicebus", True, CHART_VALUES)  # not supported here: llm-engine's stays


@pytest.mark.parametrize("broker", ["redis", "sqs"])
def test_the_patched_chart_runs_this_worker_with_llm_engines_values(patched_chart: str, broker: str, tmp_path: Path):
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    upstream = async_segments((LLM_ENGINE / "upstream" / "service_template_config_map.yaml.tpl").read_text())
    rendered = []
    for before, after in zip(upstream, async_segments(patched_chart), strict=True):
        theirs = dedented_containers(before, broker, True, CHART_VALUES)
        for datadog in (True, False):
            ours = dedented_containers(after, broker, datadog, CHART_VALUES)
            assert ours["name"] == "celery-forwarder"  # llm-engine's code finds the container by name
            assert ours["image"] == "registry.example.com/celery-forwarder:0.1.0"
            entry = ["tini", "--", *(["ddtrace-run"] if datadog else []), "python", "-m", "forwarder"]
            assert ours["command"] == entry
            # Kept from llm-engine's container: resources, mounts (the endpoint config), and its env
            assert ours["resources"] == theirs["resources"] and ours["volumeMounts"] == theirs["volumeMounts"]
            assert theirs["env"] == ours["env"][:len(theirs["env"])]
            assert ours["securityContext"]["runAsUser"] == uid and ours["securityContext"]["runAsNonRoot"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert ours[probe]["exec"]["command"][:4] == ["python", "-m", "forwarder", "probe"]
            rendered.append(ours)
    env = container_env(rendered[0])
    assert all(container_env(other) == env for other in rendered)  # both templates, with and without Datadog
    # llm-engine's values: its 24 h broker (db 3, 86400 s), its queue, its S3 result keys
    assert env["CELERY_BROKER_VISIBILITY_TIMEOUT"] == str(LLM_ENGINE_VISIBILITY_SECONDS)
    if broker == "redis":
        assert env["CELERY_BROKER_URL"] == f"redis://redis.example.internal:6379/{LLM_ENGINE_BROKER_DB}"
    else:
        assert env["CELERY_BROKER_URL"] == "sqs://" and env["CELERY_SQS_QUEUE_URL"] == ENDPOINT_ARGUMENTS["SQS_QUEUE_URL"]
    assert env["CELERY_QUEUE"] == ENDPOINT_ARGUMENTS["QUEUE"]
    assert env["CELERY_RESULT_BACKEND"] == "s3://llm-engine/tmp/celery"
    assert env["FORWARDER_MODEL_URL"] == "http://localhost:5005/predict"
    # The startup probe outlasts the wait for the model
    startup = rendered[0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= float(env["FORWARDER_READY_TIMEOUT"]) + 30
    # And the worker takes that environment as it is (strict: no variable of ours misspelt)
    assert env["FORWARDER_STRICT_ENV"] == "1"
    # The endpoint config llm-engine mounts there (base64 JSON), naming both hooks: the logging hook's stream
    # comes from the infra config
    endpoint_config = tmp_path / "endpoint_config"
    endpoint_config.write_bytes(base64.b64encode(json.dumps({
        "endpoint_name": "my-endpoint", "endpoint_id": "end_abc123", "post_inference_hooks": ["callback", "logging"],
        "default_callback_url": "https://hooks.example.com/done", "user_id": "u1", "labels": {"team": "ml"},
    }).encode()))
    assert env["FORWARDER_ENDPOINT_CONFIG_PATH"] == "/workspace/endpoint_config"
    done = check({**env, "FORWARDER_ENDPOINT_CONFIG_PATH": str(endpoint_config)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"queue={ENDPOINT_ARGUMENTS['QUEUE']}" in done.stdout and "warning" not in done.stdout
    grace = int(re.search(r"terminationGracePeriodSeconds >= (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert grace <= 1800  # llm-engine's async pods: terminationGracePeriodSeconds 1800
    assert "terminationGracePeriodSeconds: 1800" in patched_chart
