"""The client side's boundary: ``gateway.client`` imports only the wire vocabulary, ``gateway.loadtest``
only the client and the vocabulary, so either can ship (or be read) without the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT

ALLOWED = {
    "gateway.client": ("gateway.wire", "gateway.client"),
    "gateway.loadtest": ("gateway.wire", "gateway.client", "gateway.loadtest"),
}


def project_imports(package: str) -> dict[str, set[str]]:
    """Every ``gateway.*`` / ``workers.*`` module each file of ``package`` imports (relative ones resolved)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / Path(*package.split("."))).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(package + ("." + node.module if node.module else "") if node.level else node.module or "")
        out[path.name] = {n for n in names if n.split(".")[0] in ("gateway", "workers")}
    return out


def outside(name: str, allowed: tuple[str, ...]) -> bool:
    return not any(name == a or name.startswith(a + ".") for a in allowed)


def test_the_client_imports_only_the_wire_vocabulary() -> None:
    bad = {f: sorted(n for n in names if outside(n, ALLOWED["gateway.client"]))
           for f, names in project_imports("gateway.client").items()}
    assert not {f: n for f, n in bad.items() if n}, bad


def test_the_load_test_imports_only_the_client_and_the_vocabulary() -> None:
    bad = {f: sorted(n for n in names if outside(n, ALLOWED["gateway.loadtest"]))
           for f, names in project_imports("gateway.loadtest").items()}
    assert not {f: n for f, n in bad.items() if n}, bad


def test_importing_the_client_loads_no_server_module() -> None:
    code = ("import sys, gateway.client, gateway.client.spawn; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gateway', 'workers')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout)
    assert [m for m in loaded if outside(m, ("gateway.wire", "gateway.client")) and m != "gateway"] == []
