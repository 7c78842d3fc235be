"""The production stack's files: docker-compose, Kubernetes manifests, prefect.yaml, image scripts.

Nothing here starts a container. The checks read the files the way Compose, Kubernetes and
Prefect read them and fail on what would break a real start: a variable missing from
.env.example, a secret written in clear, a selector that selects nothing, a Secret key nobody
defined, a deployment entrypoint that does not import. The image scripts run for real, against
MLflow's own config reader, DVC, and a stand-in `mc`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_YAML = ROOT / "prefect.yaml"
SECRET_TEMPLATE = K8S / "secrets.template.yaml"
BIN = Path(sys.executable).parent

# Names whose values are credentials: never written in clear, always required.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN")
# A URL that carries a password: scheme://user:password@host
URL_WITH_PASSWORD = re.compile(r"^[a-z0-9+.-]+://([^:/@\s]+):([^@\s]+)@", re.I)


# ---------------------------------------------------------------------------
# Helpers: YAML, Compose interpolation
# ---------------------------------------------------------------------------

class MissingVariable(ValueError):
    """A ${VAR:?message} whose VAR is unset or empty: Compose refuses to start."""


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{ENV_EXAMPLE}: line without '=': {line!r}"
            values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, ${VAR:+alt}, ${VAR+alt}."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or value == ""
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if not (unset_or_empty if op == ":+" else value is None) else ""
        return value or ""
    return _VAR.sub(one, text)


def variable_uses(text: str) -> list[tuple[str, str | None]]:
    """(name, operator) of every variable reference in text ($$ escapes are not references)."""
    return [(m.group(1) or m.group(4), m.group(2)) for m in _VAR.finditer(text) if m.group(0) != "$$"]


def strings(node):
    """Every string value in a nested YAML structure (mapping keys are not interpolated)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def resolve(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return node


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_list(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def option_value(args: list[str], name: str) -> str | None:
    """--name=value or --name value from an argument list."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


# ---------------------------------------------------------------------------
# Helpers: Kubernetes
# ---------------------------------------------------------------------------

def k8s_resources() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml" or path == SECRET_TEMPLATE:
            continue
        out += [(path, doc) for doc in load_docs(path)]
    return out


def workloads() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_resources() if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def secret_template() -> dict:
    (doc,) = load_docs(SECRET_TEMPLATE)
    return doc


# ---------------------------------------------------------------------------
# Every YAML file
# ---------------------------------------------------------------------------

YAML_FILES = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), PREFECT_YAML])


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses_to_mappings(path):
    docs = load_docs(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is {type(doc).__name__}, expected a mapping"
        if path.parent == K8S and path.name != "kustomization.yaml":
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object"
            assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without metadata.name"


# ---------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------

def test_compose_has_the_whole_stack(services):
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker",
            "prefect-deploy"} <= services.keys()


def test_compose_dependencies_exist_and_wait_on_real_conditions(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on should name a condition per service"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on {dep!r}, which is not a service"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} healthy, but {dep} has no healthcheck"
            elif cond == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{name} waits for {dep} to finish; {dep} must be one-shot"
            else:
                assert cond == "service_started", f"{name} -> {dep}: unknown condition {cond!r}"
    # no cycles: a topological order exists
    order, pending = [], dict((n, set(s.get("depends_on", {}))) for n, s in services.items())
    while pending:
        ready = [n for n, d in pending.items() if d <= set(order)]
        assert ready, f"depends_on cycle among {sorted(pending)}"
        order += ready
        for n in ready:
            del pending[n]


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name}: no healthcheck"


def test_every_compose_variable_is_in_env_example_and_every_example_is_used():
    text = COMPOSE.read_text()
    example = env_example()
    used = {name for name, _ in variable_uses(text)}
    assert used, "no ${VAR} in docker-compose.yml?"
    missing = used - example.keys()
    assert not missing, f"used in docker-compose.yml but not in infra/.env.example: {sorted(missing)}"
    unused = example.keys() - used
    assert not unused, f"in infra/.env.example but used nowhere in docker-compose.yml: {sorted(unused)}"


def test_secrets_are_required_variables_with_a_message():
    for name, op in variable_uses(COMPOSE.read_text()):
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must be written ${{{name}:?set {name} in infra/.env}}"


def test_compose_refuses_to_start_without_each_secret(compose):
    example = env_example()
    resolve(compose, example)  # the example itself resolves
    secrets = [k for k in example if SECRET_NAME.search(k)]
    assert len(secrets) >= 6
    for name in secrets:
        env = {k: v for k, v in example.items() if k != name}
        with pytest.raises(MissingVariable, match=f"{name}: set {name} in infra/.env"):
            resolve(compose, env)
        with pytest.raises(MissingVariable):  # an empty value is no better
            resolve(compose, {**example, name: ""})


def test_no_secret_is_written_in_clear_in_compose(services):
    # Resolve every variable to a marker: a credential that is not a marker was typed in clear.
    markers = {name: f"__{name}__" for name in env_example()}
    for name, svc in resolve(services, markers).items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment should be a mapping"
        for key, value in env.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"__[A-Z0-9_]+__", value), \
                    f"{name}.environment.{key} = {value!r}: use a ${{VAR:?...}} reference"
            m = URL_WITH_PASSWORD.match(value)
            if m:
                assert re.fullmatch(r"__[A-Z0-9_]+__", m.group(2)), \
                    f"{name}.environment.{key}: password in clear in a URL"
    urls = [v for svc in services.values() for v in strings(svc.get("environment", {}))
            if URL_WITH_PASSWORD.match(interpolate(v, markers))]
    assert len(urls) == 3, "MLflow's two databases and Prefect's carry the password"
    assert not any("change-me" in v for v in strings(services)), "a placeholder secret in docker-compose.yml"


def test_env_example_holds_placeholders_only():
    for key, value in env_example().items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f"infra/.env.example: {key} must be a change-me placeholder"


def test_infra_env_is_ignored_by_git_and_docker():
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    for must in ("infra/.env", ".dvc/config.local", ".venv/"):
        assert must in ignore, f"infra/Dockerfile.dockerignore must exclude {must}"
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert r.returncode == 0, "git does not ignore infra/.env: it would be committed"


def _mlflow_module(relpath: str, name: str):
    """Load one file of the installed MLflow without its package __init__ (no server deps)."""
    base = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(name, base / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mlflow_command_has_basic_auth_allowed_hosts_and_proxied_artifacts(services):
    svc = resolve(services["mlflow"], env_example())
    args = command_list(svc)
    assert args[:2] == ["mlflow", "server"]
    assert option_value(args, "--app-name") == "basic-auth"
    assert "--serve-artifacts" in args
    assert option_value(args, "--artifacts-destination") == "s3://mlflow"
    hosts = option_value(args, "--allowed-hosts").split(",")
    assert "*" not in hosts
    assert svc["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert svc["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"]

    # MLflow's own matcher: what the genflow containers send is accepted, a stranger is not.
    security = _mlflow_module("server/security_utils.py", "_mlflow_security_utils")
    uri = services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"]
    host = uri.split("://", 1)[1].rstrip("/")
    for ok in (host, "localhost:5000", "127.0.0.1:5000"):
        assert security.is_allowed_host_header(hosts, ok), f"--allowed-hosts refuses {ok}"
    assert not security.is_allowed_host_header(hosts, "evil.example")


def test_worker_deploy_and_prefect_yaml_use_one_work_pool(services):
    pools = {d["work_pool"]["name"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert len(pools) == 1
    (pool,) = pools
    worker = command_list(services["prefect-worker"])
    assert worker[:3] == ["prefect", "worker", "start"]
    assert option_value(worker, "--pool") == pool
    assert option_value(worker, "--type") == "process"
    deploy = " ".join(command_list(services["prefect-deploy"]))
    assert f"work-pool create {pool} --type process" in deploy
    assert "deploy --all" in deploy


def test_published_ports_are_unique(services):
    seen = {}
    for name, svc in resolve(services, env_example()).items():
        for spec in svc.get("ports", []):
            parts = str(spec).split("/")[0].split(":")
            assert len(parts) == 3, \
                f"{name}: publish as IP:HOST:CONTAINER (bind address from BIND_ADDRESS), got {spec!r}"
            host = (parts[0], int(parts[1]))
            assert host not in seen, f"{name} and {seen[host]} both publish {host}"
            seen[host] = name
    assert {5000, 4200, 9000} <= {p for _, p in seen}
    assert all(ip == "127.0.0.1" for ip, _ in seen), "by default the stack binds to 127.0.0.1 only"


def _databases_created(script: str) -> set[str]:
    m = re.search(r"for db in ([\w ]+); do", script)
    assert m, "init script: no `for db in ...; do` loop"
    return set(m.group(1).split())


def test_every_database_in_a_connection_url_is_created(services):
    created = _databases_created((INFRA / "postgres" / "init-databases.sh").read_text())
    created.add(services["postgres"]["environment"]["POSTGRES_DB"])
    urls = [s for s in strings(services) if re.match(r"postgresql(\+\w+)?://", s)]
    used = {url.rsplit("/", 1)[1] for url in urls}
    assert used == {"mlflow", "mlflow_auth", "prefect"}
    assert used <= created
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/") for m in mounts)
    k8s_init = next(d for _, d in k8s_resources() if d["metadata"]["name"] == "postgres-init")
    (script,) = k8s_init["data"].values()
    assert _databases_created(script) == _databases_created((INFRA / "postgres" / "init-databases.sh").read_text())


def test_images_are_pinned_and_versions_agree(services):
    images = {name: svc["image"] for name, svc in services.items()}
    for name, image in images.items():
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin {image}"
    prefect_version = images["prefect-server"].split(":")[1].split("-")[0]
    mlflow_version = images["mlflow"].split(":")[1]
    for name in ("prefect-worker", "prefect-deploy"):
        args = services[name]["build"]["args"]
        assert args["PREFECT_VERSION"] == prefect_version, f"{name}: client and server Prefect differ"
        assert args["MLFLOW_VERSION"] == mlflow_version, f"{name}: client and server MLflow differ"
    assert services["mlflow"]["build"]["args"]["MLFLOW_VERSION"] == mlflow_version
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"ARG PREFECT_VERSION={prefect_version}" in dockerfile
    assert f"ARG MLFLOW_VERSION={mlflow_version}" in dockerfile
    assert f"ARG MLFLOW_VERSION={mlflow_version}" in (INFRA / "mlflow" / "Dockerfile").read_text()
    k8s_images = {c["image"] for _, d in workloads() for c in containers(d)}
    for image in k8s_images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"k8s: pin {image}"
    assert k8s_images == set(images.values()), "k8s and compose run different images"


def test_genflow_dockerfile_installs_cpu_torch_first_then_the_cpu_extra():
    text = (INFRA / "Dockerfile").read_text()
    runs = [block for block in re.split(r"\n(?=[A-Z]+ )", text) if block.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if 'pip install "torch==' in r)
    deps_at = next(i for i, r in enumerate(runs) if "pip install -r /tmp/requirements.txt" in r)
    project_at = next(i for i, r in enumerate(runs) if "pip install --no-deps -e ." in r)
    assert torch_at < deps_at < project_at
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG ORT_EXTRA=cpu" in text
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"cpu", "gpu"} <= extras.keys(), "the CPU and GPU variants need both extras"
    assert re.search(r'^ENTRYPOINT \["sh", "/app/infra/genflow-entrypoint.sh"\]', text, re.M)
    assert (INFRA / "genflow-entrypoint.sh").exists()
    assert "FROM python:3.11-slim" in text.replace("${PYTHON_VERSION}", "3.11")


# ---------------------------------------------------------------------------
# Kubernetes manifests
# ---------------------------------------------------------------------------

def test_k8s_selectors_match_template_labels():
    for path, doc in workloads():
        if doc["kind"] == "Job":
            continue  # Kubernetes writes a Job's selector itself
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), \
            f"{path.name}: {doc['kind']} {doc['metadata']['name']} selector {selector} does not match {labels}"


def test_k8s_services_select_a_workload_and_its_ports():
    targets = [(d, d["spec"]["template"]["metadata"]["labels"]) for _, d in workloads()
               if d["kind"] in ("Deployment", "StatefulSet")]
    services = [(p, d) for p, d in k8s_resources() if d["kind"] == "Service"]
    assert len(services) >= 4
    for path, svc in services:
        selector = svc["spec"]["selector"]
        matched = [d for d, labels in targets if selector.items() <= labels.items()]
        assert matched, f"{path.name}: Service {svc['metadata']['name']} selects nothing ({selector})"
        port_names = {p["name"] for d in matched for c in containers(d) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in port_names, f"{path.name}: targetPort {target!r} is no container port name"


def test_k8s_statefulsets_name_an_existing_service():
    service_names = {d["metadata"]["name"] for _, d in k8s_resources() if d["kind"] == "Service"}
    for path, doc in workloads():
        if doc["kind"] == "StatefulSet":
            assert doc["spec"]["serviceName"] in service_names, f"{path.name}: serviceName has no Service"


def test_k8s_secret_and_configmap_references_exist():
    template = secret_template()
    keys = set(template["stringData"])
    configmaps = {d["metadata"]["name"]: d for _, d in k8s_resources() if d["kind"] == "ConfigMap"}
    refs = 0
    for path, doc in workloads():
        spec = doc["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{path.name}: no ConfigMap {vol['configMap']['name']}"
        for c in containers(doc):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
                if "secretRef" in src:
                    assert src["secretRef"]["name"] == template["metadata"]["name"]
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    assert ref["name"] == template["metadata"]["name"], f"{path.name}: unknown Secret {ref['name']}"
                    assert ref["key"] in keys, \
                        f"{path.name}: {var['name']} reads key {ref['key']!r}, not in the secret template"
    assert refs >= 20


def test_k8s_secret_template_keys_are_the_env_example_names():
    template = secret_template()
    example = env_example()
    assert set(template["stringData"]) <= example.keys(), "create the Secret with --from-env-file=infra/.env"
    for key, value in template["stringData"].items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f"secrets.template.yaml: {key} must stay a placeholder"


def test_no_secret_is_written_in_clear_in_manifests():
    for path, doc in workloads():
        for c in containers(doc):
            defined = []
            for var in c.get("env", []):
                name, value = var["name"], var.get("value")
                if SECRET_NAME.search(name):
                    assert value is None and "secretKeyRef" in var.get("valueFrom", {}), \
                        f"{path.name}: {name} must come from a secretKeyRef"
                if value is not None:
                    m = URL_WITH_PASSWORD.match(value)
                    if m:
                        assert re.fullmatch(r"\$\([A-Z_]+\)", m.group(2)), \
                            f"{path.name}: {name} has a password in clear"
                    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                        assert ref in defined, f"{path.name}: {name} uses $({ref}) before it is defined"
                defined.append(name)
    for path, doc in k8s_resources():
        assert not any("change-me" in v for v in strings(doc)), f"{path.name}: a placeholder secret value"


def test_kustomization_lists_every_manifest_but_the_secret_template():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["namespace"] == "genflow"
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert listed == on_disk
    for _, doc in k8s_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "genflow"


def test_k8s_matches_compose(services):
    configmap = next(d for _, d in k8s_resources() if d["metadata"]["name"] == "genflow-env")["data"]
    worker_env = services["prefect-worker"]["environment"]
    k8s_worker = next(d for _, d in workloads() if d["metadata"]["name"] == "prefect-worker")
    (container,) = k8s_worker["spec"]["template"]["spec"]["containers"]
    secret_env = {v["name"] for v in container["env"]}
    for key, value in worker_env.items():
        if "${" in str(value):
            assert key in secret_env, f"k8s worker lacks {key}"
        else:
            assert configmap.get(key) == value, f"configmap {key}={configmap.get(key)!r}, compose says {value!r}"
    compose_worker, k8s_args = command_list(services["prefect-worker"]), container["args"]
    assert compose_worker == k8s_args
    compose_mlflow = command_list(services["mlflow"])
    k8s_mlflow = next(d for _, d in workloads() if d["metadata"]["name"] == "mlflow")
    k8s_mlflow_args = k8s_mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    strip = lambda args: [a for a in args if not a.startswith("--allowed-hosts")]  # noqa: E731
    assert strip(compose_mlflow) == strip(k8s_mlflow_args)
    k8s_hosts = option_value(k8s_mlflow_args, "--allowed-hosts").split(",")
    security = _mlflow_module("server/security_utils.py", "_mlflow_security_utils_k8s")
    in_cluster = configmap["MLFLOW_TRACKING_URI"].split("://", 1)[1]
    assert security.is_allowed_host_header(k8s_hosts, in_cluster)
    assert security.is_allowed_host_header(k8s_hosts, "mlflow.genflow.svc.cluster.local:5000")


def test_kubectl_kustomize_renders_the_stack():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(r.stdout) if d)
    assert kinds.count("Deployment") == 4 and kinds.count("StatefulSet") == 2 and "Secret" not in kinds


def test_serve_probes_readiness_liveness_and_metrics_in_k8s_and_compose(services):
    k8s = next(d for _, d in workloads() if d["metadata"]["name"] == "serve")
    pod = k8s["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"]) == "8000"
    compose = services["serve"]
    assert command_list(compose) == container["args"]
    assert option_value(container["args"], "--port") == "8000"
    assert "/healthz" in " ".join(compose["healthcheck"]["test"])
    assert compose["labels"]["prometheus.io/port"] == "8000"


# ---------------------------------------------------------------------------
# prefect.yaml and its entrypoints
# ---------------------------------------------------------------------------

def prefect_deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_prefect_yaml_is_accepted_by_prefect():
    # Prefect skips a prefect.yaml that fails validation with only a warning: check it here.
    try:
        from prefect.cli.deploy._models import PrefectYamlModel
    except ImportError:
        pytest.skip("this Prefect version has no PrefectYamlModel")
    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert [d.name for d in model.deployments] == [d["name"] for d in prefect_deployments()]
    (step,) = model.pull
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
    assert "WORKDIR /app" in (INFRA / "Dockerfile").read_text()


@pytest.mark.parametrize("deployment", prefect_deployments(), ids=lambda d: d["name"])
def test_prefect_entrypoint_is_a_flow_accepting_its_parameters(deployment):
    path, _, attr = deployment["entrypoint"].partition(":")
    file = ROOT / path
    assert file.is_file(), f"prefect.yaml {deployment['name']}: {path} does not exist"
    module = importlib.import_module(".".join(Path(path).with_suffix("").parts))
    flow = getattr(module, attr)  # builds the flow object; no flow runs

    from prefect import Flow

    assert isinstance(flow, Flow), f"{deployment['entrypoint']} is a {type(flow).__name__}, not a flow"
    inspect.signature(flow.fn).bind_partial(**deployment.get("parameters", {}))


def test_nightly_schedule_is_the_one_in_params_yaml():
    schedule = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]
    nightly = next(d for d in prefect_deployments() if d["name"] == "nightly-retrain")
    (sched,) = nightly["schedules"]
    assert (sched["cron"], sched["timezone"]) == (schedule["cron"], schedule["timezone"])


def test_flows_deploy_imports_without_prefect():
    code = ("import sys, flows.deploy as d\n"
            "assert 'prefect' not in sys.modules, 'importing flows.deploy imported prefect'\n"
            "try:\n    d.no_such_flow\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------
# The scripts inside the images
# ---------------------------------------------------------------------------

def _run_mlflow_entrypoint(tmp_path, **env):
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth" / "basic_auth.ini"),
            "MLFLOW_AUTH_DATABASE_URI": "postgresql://genflow:p%40ss%25word@postgres:5432/mlflow_auth",
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-password",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}
    base.update({k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            base.pop(k, None)
    config_dir = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0]) / "server" / "auth"
    probe = ("import importlib.util, json, sys\n"
             f"spec = importlib.util.spec_from_file_location('c', {str(config_dir / 'config.py')!r})\n"
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
             "print(json.dumps(m.read_auth_config()._asdict()))\n")
    return subprocess.run(["sh", str(INFRA / "mlflow" / "entrypoint.sh"), sys.executable, "-c", probe],
                          env=base, capture_output=True, text=True, timeout=120)


def test_mlflow_entrypoint_writes_the_auth_config_mlflow_reads(tmp_path):
    r = _run_mlflow_entrypoint(tmp_path)
    assert r.returncode == 0, r.stderr
    conf = json.loads(r.stdout.strip().splitlines()[-1])
    # '%' in a URL-encoded password survives configparser's interpolation
    assert conf["database_uri"] == "postgresql://genflow:p%40ss%25word@postgres:5432/mlflow_auth"
    assert conf["admin_username"] == "admin" and conf["admin_password"] == "a-long-enough-password"
    assert conf["default_permission"] == "READ"
    ini = tmp_path / "auth" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o077 == 0, "the auth config holds a password: owner-only"
    assert "a-long-enough-password" not in ini.read_text()


@pytest.mark.parametrize("env, message", [
    ({"MLFLOW_AUTH_DATABASE_URI": None}, "MLFLOW_AUTH_DATABASE_URI is not set"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": None}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "change-me"}, "still the placeholder"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short-pw"}, "at least 12"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY is not set"),
    ({"MLFLOW_AUTH_DEFAULT_PERMISSION": "ALL"}, "is not one of READ, EDIT, MANAGE, NO_PERMISSIONS"),
])
def test_mlflow_entrypoint_refuses_bad_settings_in_one_line(tmp_path, env, message):
    r = _run_mlflow_entrypoint(tmp_path, **env)
    assert r.returncode == 64
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "auth" / "basic_auth.ini").exists()


def _dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=repo, check=True)
    return repo


def test_genflow_entrypoint_points_dvc_at_the_stack_in_local_config_only(tmp_path):
    if not shutil.which("git") or not (BIN / "dvc").exists():
        pytest.skip("git or dvc not installed")
    repo = _dvc_repo(tmp_path)
    shared_config = (repo / ".dvc" / "config").read_text()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "GENFLOW_DVC_REMOTE": "s3://dvc", "GENFLOW_DVC_ENDPOINT_URL": "http://minio:9000"}
    script = str(INFRA / "genflow-entrypoint.sh")
    r = subprocess.run(["sh", script, "sh", "-c", "echo ran $0", "ok"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ran ok"), "the entrypoint must exec its arguments"
    r2 = subprocess.run(["sh", script, "true"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr  # a container restart runs it again

    from dvc.config import Config  # DVC's own reader: what `dvc push` will use

    config = Config(dvc_dir=str(repo / ".dvc"), validate=False)
    local = config.load_one("local")
    assert local["core"]["remote"] == "stack"
    assert local["remote"]["stack"] == {"url": "s3://dvc", "endpointurl": "http://minio:9000"}
    assert config.load_one("repo")["remote"] == {}
    assert (repo / ".dvc" / "config").read_text() == shared_config, "the committed DVC config changed"
    assert "AWS" not in (repo / ".dvc" / "config.local").read_text()


def test_genflow_entrypoint_leaves_dvc_alone_without_a_remote(tmp_path):
    if not shutil.which("git") or not (BIN / "dvc").exists():
        pytest.skip("git or dvc not installed")
    repo = _dvc_repo(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFLOW_DVC")}
    r = subprocess.run(["sh", str(INFRA / "genflow-entrypoint.sh"), "true"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (repo / ".dvc" / "config.local").exists()


FAKE_MC = """#!/bin/sh
# stand-in for MinIO's client: logs its arguments, keeps policy attachments in a file
echo "$*" >> "$MC_LOG"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$MC_STATE.policy.json" ;;
  "admin policy attach")
    if [ -n "$MC_FAIL" ]; then echo "mc: <ERROR> $MC_FAIL" >&2; exit 1; fi
    if [ -f "$MC_STATE.attached" ]; then
      echo "mc: <ERROR> Unable to attach policy. The specified policy change is already in effect." >&2; exit 1
    fi
    touch "$MC_STATE.attached" ;;
esac
exit 0
"""


def _bucket_scripts(services) -> dict[str, str]:
    compose_script = interpolate(command_list(services["minio-init"])[0], env_example())
    job = next(d for _, d in workloads() if d["metadata"]["name"] == "minio-init")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {"compose": compose_script, "k8s": container["args"][0]}


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_bucket_init_creates_both_buckets_and_a_scoped_account_idempotently(tmp_path, services, where):
    script = _bucket_scripts(services)[where]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mc").write_text(FAKE_MC)
    (bindir / "mc").chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "MC_LOG": str(tmp_path / "mc.log"),
           "MC_STATE": str(tmp_path / "state"), "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw",
           "S3_ACCESS_KEY_ID": "genflow", "S3_SECRET_ACCESS_KEY": "s3pw"}

    def run(**extra):
        return subprocess.run(["/bin/sh", "-ec", script], env={**env, **extra}, capture_output=True,
                              text=True, timeout=30)

    first = run()
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert "alias set stack http://minio:9000 root rootpw" in calls
    assert "mb --ignore-existing stack/mlflow stack/dvc" in calls
    assert "admin user add stack genflow s3pw" in calls
    policy = json.loads((tmp_path / "state.policy.json").read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*", "arn:aws:s3:::dvc", "arn:aws:s3:::dvc/*"}

    again = run()  # a restarted stack runs the job again: the attached policy is not an error
    assert again.returncode == 0, again.stderr
    failing = run(MC_FAIL="Access Denied.")
    assert failing.returncode != 0 and "Access Denied" in failing.stderr


# ---------------------------------------------------------------------------
# The real Compose CLI, where it exists
# ---------------------------------------------------------------------------

def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def test_docker_compose_config_accepts_the_stack(tmp_path):
    if not _docker_compose_available():
        pytest.skip("`docker compose version` fails: the Docker CLI's compose plugin is not installed")
    args = ["docker", "compose", "-f", str(COMPOSE)]
    ok = subprocess.run(args + ["--env-file", str(ENV_EXAMPLE), "config", "-q"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    partial = tmp_path / "partial.env"
    partial.write_text("\n".join(f"{k}={v}" for k, v in env_example().items() if k != "POSTGRES_PASSWORD"))
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    refused = subprocess.run(args + ["--env-file", str(partial), "config", "-q"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0 and "set POSTGRES_PASSWORD in infra/.env" in refused.stderr


# ---------------------------------------------------------------------------
# prefect.yaml against a real Prefect server (on 127.0.0.1, SQLite, basic auth on)
# ---------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_api(url: str, path: str, auth: str | None, body: dict) -> tuple[int, object]:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


@pytest.mark.integration
def test_the_deploy_job_registers_every_deployment_on_a_prefect_server(tmp_path, services):
    import time
    import urllib.request

    auth = "admin:integration-check"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server"),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
                  "PREFECT_SERVER_API_AUTH_STRING": auth}
    server_env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=server_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "Prefect server did not answer in 180 s"
                time.sleep(1)

        # The stack's one-shot deploy command, as written in docker-compose.yml.
        command = command_list(services["prefect-deploy"])
        client_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_API_URL": url,
                      "PREFECT_API_AUTH_STRING": auth, "PREFECT_HOME": str(tmp_path / "client")}
        r = subprocess.run(command, cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

        assert _prefect_api(url, "/deployments/filter", None, {})[0] == 401, "the API must need the auth string"
        status, found = _prefect_api(url, "/deployments/filter", auth, {})
        assert status == 200
        by_name = {d["name"]: d for d in found}
        for wanted in prefect_deployments():
            got = by_name[wanted["name"]]
            assert got["entrypoint"] == wanted["entrypoint"]
            assert got["work_pool_name"] == wanted["work_pool"]["name"]
            assert got["parameters"] == wanted.get("parameters", {})
            assert got["pull_steps"] == yaml.safe_load(PREFECT_YAML.read_text())["pull"]
        (schedule,) = by_name["nightly-retrain"]["schedules"]
        (wanted_schedule,) = next(d for d in prefect_deployments() if d["name"] == "nightly-retrain")["schedules"]
        assert schedule["schedule"]["cron"] == wanted_schedule["cron"] and schedule["active"]
        status, pools = _prefect_api(url, "/work_pools/filter", auth, {})
        assert {p["name"]: p["type"] for p in pools}.get("genflow-pool") == "process"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
