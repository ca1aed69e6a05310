"""The image and the Compose stack, built from this checkout and run for real on a container engine.

Skipped when no engine answers. `../shared/tools/container-engine up` and `eval "$(... env)"` provide one
(`.ci/run` does both). One image build serves every test: the server image is built once, as
`convrpc:latest` (the name docker-compose.yml uses), and Compose reuses it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from convrpc.client import ConvClient

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "convrpc:latest"
PROJECT = "convrpc-test"
#: Debian's docker CLI has BuildKit built in (no buildx plugin needed); CONVRPC_DOCKER overrides it.
DOCKER = os.environ.get("CONVRPC_DOCKER") or next(
    (c for c in ("/usr/bin/docker", shutil.which("docker")) if c and os.path.exists(c)), "docker"
)
#: Waits for an engine's work (a build, a health check) end the test with a clear error, not a hang.
BUILD_SECONDS, HEALTHY_SECONDS = 1500, 240


def _engine_reachable() -> bool:
    try:
        return subprocess.run([DOCKER, "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(BUILD_SECONDS + 600),
    pytest.mark.skipif(not _engine_reachable(), reason="no container engine answers (see README, Development)"),
]


def docker(*args, check=True, timeout=120, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    """The server image, built once from the checkout with BuildKit."""
    docker("build", "-t", IMAGE, ".", timeout=BUILD_SECONDS, env={"DOCKER_BUILDKIT": "1"})
    return IMAGE


def wait_healthy(container: str) -> None:
    deadline = time.monotonic() + HEALTHY_SECONDS
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", container).stdout)
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if not state["Running"]:
            break
        time.sleep(1)
    logs = docker("logs", container, check=False)
    raise AssertionError(f"{container} did not become healthy: {state}\n{logs.stdout}{logs.stderr}")


@pytest.fixture
def container(image):
    name = f"convrpc-test-{uuid.uuid4().hex[:8]}"
    yield name
    docker("rm", "-f", name, check=False)


def exit_code(name: str) -> int:
    return int(docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout)


def test_the_image_runs_to_healthy_and_serves_the_sdk_through_its_published_port(container):
    docker("run", "-d", "--name", container, "-p", "127.0.0.1::50051", IMAGE)
    wait_healthy(container)
    port = docker("port", container, "50051/tcp").stdout.split()[0].rsplit(":", 1)[1]
    with ConvClient(f"127.0.0.1:{port}", timeout=60) as client:
        a = np.array([[1, 3, 1, 4], [2, 8, 5, 1], [3, 2, 0, 3]], dtype=np.float32)[None, None]
        k = np.array([[1, 0], [-1, 1]], dtype=np.float32)[None, None]
        np.testing.assert_array_equal(client.conv2d(a, k)[0, 0], [[7, 0, -3], [1, 6, 8]])
        assert client.server_info().backend == "numba"
    # The log names the address the socket is bound to: inside its own network namespace, every interface.
    bound = re.search(r"listening on (\S+):50051", docker("logs", container).stderr)
    assert bound and ipaddress.ip_address(bound.group(1).strip("[]")).is_unspecified, bound
    docker("stop", "-t", "20", container, timeout=60)
    assert exit_code(container) == 0  # drained and exited by itself


def test_a_container_stopped_right_after_start_exits_at_once(container):
    docker("run", "-d", "--name", container, IMAGE)
    # With 4 s of grace Docker SIGKILLs (exit 137) a container that lost the SIGTERM; 0 or 143 means the
    # signal was handled (or, under tini, ended the process) within those 4 s.
    docker("stop", "-t", "4", container, timeout=60)
    assert exit_code(container) in (0, 143)


NOTEBOOK_CHECK = textwrap.dedent("""
    import json, socket, urllib.request
    import numpy as np
    from convrpc.client import ConvClient

    replicas = sorted({info[4][0] for info in socket.getaddrinfo("server", 50051, proto=socket.IPPROTO_TCP)})
    x = np.arange(-8.0, 8.0).reshape(1, 1, 4, 4)
    with ConvClient("dns:///server:50051", timeout=60) as client:
        for _ in range(8 * len(replicas)):
            assert (client.relu(x) == np.maximum(x, 0)).all()
    served = {}
    for ip in replicas:
        text = urllib.request.urlopen(f"http://{ip}:9464/metrics", timeout=10).read().decode()
        served[ip] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("grpc_server_handled_total{") and 'grpc_method="Forward"' in line)
    print(json.dumps(served))
""")


@pytest.fixture
def compose_stack(image):
    env = {"SERVER_REPLICAS": "2", "SERVER_CPUS": "1", "COMPOSE_PROJECT_NAME": PROJECT}
    run = lambda *args, **kw: docker("compose", *args, env=env, **kw)  # noqa: E731
    run("build", "notebook", timeout=BUILD_SECONDS)
    yield run
    run("down", "--volumes", "--remove-orphans", "-t", "30", check=False, timeout=180)


def test_compose_brings_up_replicas_that_the_notebook_reaches_by_service_name(compose_stack):
    compose_stack("up", "-d", "--no-build", "--wait", "--wait-timeout", str(HEALTHY_SECONDS), timeout=HEALTHY_SECONDS + 60)
    servers = compose_stack("ps", "-q", "server").stdout.split()
    assert len(servers) == 2
    done = compose_stack("exec", "-T", "notebook", "python", "-c", NOTEBOOK_CHECK, timeout=300)
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(served) == 2 and all(n > 0 for n in served.values()), served  # every replica got calls
    compose_stack("down", "--volumes", "-t", "30", timeout=180)
    assert compose_stack("ps", "-a", "-q").stdout.split() == []
