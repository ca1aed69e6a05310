"""Dockerfile, docker-compose.yml and deploy/k8s agree with the code: env names, commands, ports, entrypoint, grace.

These files are parsed and checked against the settings model, the CLI parser and pyproject.toml;
test_containers.py builds and runs them for real where a container engine is reachable.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import ipaddress
import json
import math
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from convrpc import cli
from convrpc.core import BACKENDS, config
from convrpc.server import Settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_ENV = {f"CONVRPC_{f.name.upper()}" for f in dataclasses.fields(Settings)}
#: Variables read by clients (the examples), not by the server.
CLIENT_ENV = {"CONVRPC_TARGET"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- helpers --------------------------------------------------------------------------------------


def parse_command(argv: list[str]):
    """``argv`` (starting with the ``convrpc`` console script) parsed by the real CLI parser."""
    assert argv[0] == "convrpc", argv
    return cli.build_parser().parse_args(argv[1:])


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def check_server_env(env: dict[str, str]) -> Settings:
    """Every CONVRPC_* name is a Settings field and the values load; returns the settings they make."""
    named = {k for k in env if k.startswith("CONVRPC_")}
    assert named <= SETTINGS_ENV, f"not server settings: {sorted(named - SETTINGS_ENV)}"
    return Settings.from_env(environ={k: str(v) for k, v in env.items() if k in named})


def seconds(duration: str) -> float:
    """A Compose duration such as '1m30s' or '30s' in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def cpus(quantity) -> float:
    """A Kubernetes or Compose CPU quantity ('2', '500m', 1.5) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# -- Dockerfile -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]  # (KEYWORD, arguments)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its instructions (continuation lines joined)."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            logical.append(current + line)
            current = ""
    args, stages = {}, []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            stages.append(Stage(m.group(2) or str(len(stages)), m.group(1), []))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


DOCKERFILES = {name: parse_dockerfile((ROOT / name).read_text()) for name in
               ("Dockerfile", "Dockerfile.gpu", "Dockerfile.notebook")}  # fmt: skip
DOCKER_ARGS, STAGES = DOCKERFILES["Dockerfile"]
BY_NAME = {s.name: s for s in STAGES}


def effective(stage_name: str, stages=None) -> dict:
    """A stage's image config as Docker builds it: ENV, USER, ENTRYPOINT, CMD, ... inherited along FROM;
    ``stages`` maps the stage names (and the other images a Dockerfile starts FROM) that may be inherited."""
    stages = BY_NAME if stages is None else stages
    stage = stages[stage_name]
    conf = effective(stage.base, stages) if stage.base in stages else {"ENV": {}, "RUN": [], "COPY": []}
    conf = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in conf.items()}
    for keyword, rest in stage.instructions:
        if keyword == "ENV":
            for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                conf["ENV"][name] = value.strip('"')
        elif keyword in ("RUN", "COPY"):
            conf[keyword].append(rest)
        else:
            conf[keyword] = rest
    return conf


def gpu_image() -> dict:
    """Dockerfile.gpu's image: FROM the server image (its ARG default)."""
    args, (stage,) = DOCKERFILES["Dockerfile.gpu"]
    assert stage.base == "${SERVER_IMAGE}" and args["SERVER_IMAGE"] == "convrpc:latest"
    return effective("gpu", {"gpu": Stage("gpu", "server", stage.instructions), "server": BY_NAME["server"]})


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def test_dockerfiles_need_no_registry_frontend_and_the_default_build_is_the_server_alone():
    for name in DOCKERFILES:
        first = (ROOT / name).read_text().splitlines()[0]
        assert not re.match(r"#\s*syntax\s*=", first), f"{name}: BuildKit would fetch the frontend from a registry"
    assert "python:3.11-slim" in DOCKER_ARGS["PYTHON_IMAGE"]
    # The legacy builder builds every stage of the file: the default Dockerfile holds only the server's.
    assert [s.name for s in STAGES] == ["builder", "server"]
    assert {s.base for s in STAGES if s.base not in BY_NAME} == {"${PYTHON_IMAGE}"}
    builder = effective("builder")
    assert any("pip wheel" in r and "/wheels" in r for r in builder["RUN"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any('["optional-dependencies"]["server"]' in r for r in builder["RUN"]) and "server" in extras
    assert any(c.startswith("--from=builder /opt/venv /opt/venv") for c in effective("server")["COPY"])
    assert any('cupy-cuda12x[ctk]' in r for r in gpu_image()["RUN"]) and "gpu" in extras
    _, (notebook,) = DOCKERFILES["Dockerfile.notebook"]
    assert any('".[notebook]"' in r for k, r in notebook.instructions if k == "RUN") and "notebook" in extras


@pytest.mark.parametrize("stage", ["server", "gpu"])
def test_server_images_run_convrpc_serve_under_tini_as_a_non_root_user_with_health_and_sigterm(stage):
    conf = effective("server") if stage == "server" else gpu_image()
    uid = re.search(r"ARG UID=(\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert conf["USER"] == "${UID}:${UID}" and uid != "0"
    # tini is PID 1 and forwards SIGTERM from the first instant; the console script is its child.
    entrypoint = exec_form(conf["ENTRYPOINT"])
    assert entrypoint[:2] == ["tini", "--"] and any("install" in r and " tini" in r for r in conf["RUN"])
    scripts = PYPROJECT["project"]["scripts"]
    assert entrypoint[2:] == ["convrpc"] and scripts["convrpc"] == "convrpc.cli:main"
    module, func = scripts["convrpc"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main
    assert parse_command(entrypoint[2:] + exec_form(conf["CMD"])).func is cli.cmd_serve
    assert conf["STOPSIGNAL"] == "SIGTERM"

    env = conf["ENV"]
    settings = check_server_env(env)
    assert ipaddress.ip_address(settings.host).is_unspecified and settings.port == config.DEFAULT_PORT
    assert settings.backend in BACKENDS and settings.health_port
    assert conf["EXPOSE"].split() == [str(settings.port), str(settings.health_port)]

    # The probe dials the plaintext health port, so it passes under TLS and mutual TLS.
    health = re.fullmatch(r"(--\S+\s+)*CMD\s+(.*)", conf["HEALTHCHECK"])
    probe = parse_command(exec_form(health.group(2)))
    assert probe.func is cli.cmd_health and probe.tls_ca is None
    assert cli._local_health_target(env) == f"127.0.0.1:{settings.health_port}"

    # Kernel caches live where the server's user may write.
    for var in ("NUMBA_CACHE_DIR", "CUPY_CACHE_DIR"):
        assert any(env[var] in r and "mkdir" in r for r in conf["RUN"])
    assert any("chown" in r and "convrpc:convrpc" in r and "/var/cache/convrpc" in r for r in conf["RUN"])


def test_numba_warm_up_runs_at_build_time_as_the_server_user():
    stage = BY_NAME["server"]
    keywords = [k for k, _ in stage.instructions]
    runs = [r for k, r in stage.instructions if k == "RUN"]
    warm = [r for r in runs if "warm_up()" in r]
    assert warm, "the server image should compile its numba kernels at build time"
    assert "USER" in keywords[: keywords.index("RUN", keywords.index("USER"))]
    assert keywords.index("USER") < max(i for i, (k, r) in enumerate(stage.instructions) if "warm_up()" in r)
    code = shlex.split(warm[0])[2]
    assert shlex.split(warm[0])[:2] == ["python", "-c"]
    assert code == "from convrpc.core import numba_backend; numba_backend.warm_up()"
    if importlib.util.find_spec("convrpc.core.numba_backend") is None:
        pytest.skip("the numba backend is not in this checkout; the warm-up function is checked once it is")
    assert callable(importlib.import_module("convrpc.core.numba_backend").warm_up)


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignored = _dockerignore()
    for stage in [s for _, stages in DOCKERFILES.values() for s in stages]:
        for keyword, rest in stage.instructions:
            if keyword != "COPY" or "--from=" in rest:
                continue
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                path = source.rstrip("/")
                assert (ROOT / path).exists(), source
                assert not any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in ignored), source
    assert ".git" in ignored and "**/__pycache__" in ignored and "Dockerfile.*" in ignored


# -- docker-compose.yml ---------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SERVER_SERVICES = ["server", "server-gpu"]


def _interpolate(value) -> str:
    """Compose's ${NAME:-default} with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_compose_has_no_obsolete_version_and_the_expected_services():
    assert "version" not in COMPOSE
    assert set(SERVICES) == {"server", "server-gpu", "notebook"}
    for name, service in SERVICES.items():
        assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        assert service["build"]["context"] == "."
    gpu = SERVICES["server-gpu"]["build"]
    assert gpu["additional_contexts"] == {gpu["args"]["SERVER_IMAGE"]: "service:server"}


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_compose_servers_agree_with_settings_cli_and_ports(name):
    service = SERVICES[name]
    env = {k: _interpolate(v) for k, v in service["environment"].items()}
    settings = check_server_env(env)
    assert ipaddress.ip_address(settings.host).is_unspecified and settings.port == config.DEFAULT_PORT
    assert service["healthcheck"]["test"][0] == "CMD"
    probe = parse_command(service["healthcheck"]["test"][1:])
    assert probe.func is cli.cmd_health and probe.tls_ca is None
    assert settings.health_port and cli._local_health_target(env) == f"127.0.0.1:{settings.health_port}"
    published = {int(str(p).rsplit(":", 1)[1]) for p in service["ports"]}
    assert published == {settings.port, settings.metrics_port} and settings.metrics_port
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), "publish on the host's loopback only"
    # Docker's SIGKILL must not cut the server's own drain short.
    assert seconds(service["stop_grace_period"]) > settings.grace
    # Each replica has its own network namespace (where its shared-memory socket lives): no ipc sharing needed.
    assert "ipc" not in service and "shm_size" not in service
    assert "command" not in service and "entrypoint" not in service  # the image's `convrpc serve`


def test_compose_cpu_replicas_fit_a_two_core_host_with_numba_threads_matching_their_cpu_limit():
    service = SERVICES["server"]
    replicas = int(_interpolate(service["deploy"]["replicas"]))
    limit = cpus(_interpolate(service["deploy"]["resources"]["limits"]["cpus"]))
    assert replicas >= 2 and replicas * limit <= 2, "the defaults must not oversubscribe a 2-core machine"
    assert check_server_env(service["environment"]).backend == "numba"
    assert int(_interpolate(service["environment"]["NUMBA_NUM_THREADS"])) == math.ceil(limit)
    assert "-" in str(service["ports"][0]).rsplit(":", 1)[0], "a host port range, so that replicas can scale"


def test_compose_gpu_profile_runs_cupy_with_an_nvidia_reservation():
    service = SERVICES["server-gpu"]
    assert service["profiles"] == ["gpu"] and "profiles" not in SERVICES["server"]
    assert service["build"]["dockerfile"] == "Dockerfile.gpu"
    assert check_server_env(service["environment"]).backend == "cupy"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1


def test_compose_notebook_reaches_the_servers_by_service_name():
    service = SERVICES["notebook"]
    env = service["environment"]
    assert {k for k in env if k.startswith("CONVRPC_")} <= CLIENT_ENV
    target = _interpolate(env["CONVRPC_TARGET"])
    m = re.fullmatch(r"dns:///([\w-]+):(\d+)", target)
    assert m and m.group(1) in SERVER_SERVICES and int(m.group(2)) == config.DEFAULT_PORT, target
    assert service["depends_on"]["server"]["condition"] == "service_healthy"
    assert "ipc" not in service and service["init"] is True
    assert any(str(p).endswith(":8888") for p in service["ports"])


# -- deploy/k8s -----------------------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"], path
            docs[doc["kind"]] = doc
    return docs


MANIFESTS = _manifests()


def test_kustomization_lists_every_manifest():
    listed = set(MANIFESTS["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def _container():
    (container,) = MANIFESTS["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_runs_convrpc_serve_with_valid_settings_and_grpc_probes():
    deployment = MANIFESTS["Deployment"]
    assert deployment["apiVersion"] == "apps/v1" and deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = _container()
    assert parse_command(["convrpc", *container["args"]]).func is cli.cmd_serve
    assert "command" not in container  # the image's ENTRYPOINT, the console script
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = check_server_env(env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "health": settings.health_port, "metrics": settings.metrics_port}
    assert settings.port == config.DEFAULT_PORT and ipaddress.ip_address(settings.host).is_unspecified
    # The kubelet's gRPC probes speak plaintext: they go to the health-only port, which TLS leaves alone.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.health_port, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(ports["metrics"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.grace
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and str(security["runAsUser"]) == re.search(
        r"ARG UID=(\d+)", (ROOT / "Dockerfile").read_text()).group(1)  # fmt: skip


def test_deployment_sets_resources_and_numba_threads_from_the_cpu_limit():
    container = _container()
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert cpus(resources["requests"]["cpu"]) <= cpus(resources["limits"]["cpu"])
    (threads,) = [e for e in container["env"] if e["name"] == "NUMBA_NUM_THREADS"]
    if "valueFrom" in threads:
        ref = threads["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and ref.get("containerName", container["name"]) == container["name"]
        assert str(ref.get("divisor", "1")) == "1"
    else:
        assert int(threads["value"]) == math.ceil(cpus(resources["limits"]["cpu"]))


def test_headless_service_selects_the_pods_on_the_grpc_port():
    service = MANIFESTS["Service"]
    pod_labels = MANIFESTS["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"  # DNS returns every pod: clients balance round_robin
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert ports["grpc"]["port"] == config.DEFAULT_PORT == container_ports["grpc"] and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics" and ports["metrics"]["port"] == container_ports["metrics"]
    assert service["metadata"]["name"] == "convrpc"  # dns:///convrpc:50051 in the README
    assert MANIFESTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_readme_shows_the_targets_the_manifests_serve():
    readme = (ROOT / "README.md").read_text()
    assert f"dns:///convrpc:{config.DEFAULT_PORT}" in readme and f"dns:///server:{config.DEFAULT_PORT}" in readme
    assert "shard_size" in readme and "TrainKernel" in readme
