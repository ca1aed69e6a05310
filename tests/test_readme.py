"""The README's python snippets run as a reader would paste them: every ```python block, in order, in one
namespace, against a test server that CONVRPC_TARGET names. Blocks marked as naming a deployment's addresses
are skipped (and counted); the rest may name no address but the loopback."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "<!-- tests/test_readme.py skips this block"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: A host:port or gRPC name that is not the loopback.
REMOTE = re.compile(r"dns:///|\b(?!127\.0\.0\.1\b)\d+\.\d+\.\d+\.\d+:\d+")


def blocks() -> list[tuple[int, str, bool]]:
    """(line number, source, skipped) of every python block of the README."""
    text = README.read_text()
    found = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((text.count("\n", 0, m.start()) + 1, m.group(1), before.startswith(SKIP_MARK)))
    return found


def test_only_blocks_naming_remote_addresses_are_skipped():
    found = blocks()
    assert len(found) >= 5
    for line, source, skipped in found:
        assert bool(REMOTE.search(source)) == skipped, f"README.md:{line}: mark and content disagree"
    assert sum(skipped for *_, skipped in found) == 2  # the Kubernetes and the replicas snippets


@pytest.mark.slow
def test_the_readme_snippets_run_in_order(server, monkeypatch, capsys):
    pytest.importorskip("matplotlib").use("Agg")
    monkeypatch.setenv("CONVRPC_TARGET", server.target)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for line, source, skipped in blocks():
        if skipped:
            continue
        # Top-level await is what a Jupyter cell allows; such a block is run as IPython would.
        code = compile(source, f"README.md:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        pending = eval(code, namespace)  # noqa: S307 - the README's own code
        if pending is not None:
            asyncio.run(pending)
        ran += 1
    out = capsys.readouterr().out
    assert ran == len(blocks()) - 2
    assert namespace["result"].steps > 0 and namespace["stopped"].stop_reason == "cancelled"
    assert "converged" in out and "StatusCode.INVALID_ARGUMENT" in out
