"""Who may import whom, across the three packages.

- The sandbox agent (`sandbox_agent`) imports grpc, protobuf, the standard library and, of the
  wire (`rlm_wire`), only the files its images carry (`rlm_wire.AGENT_FILES`): never
  rlm_orchestrator, pydantic or litellm (its image has none of them).
- The wire's own modules import grpc, protobuf and the standard library only.
- The client SDK (`rlm_orchestrator.client`) depends on the wire, never on the server
  (`rlm_orchestrator.service`).

Checked twice: statically (every import statement, those inside functions included) and by
importing in a fresh interpreter (what a module pulls in transitively).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import rlm_wire
import sandbox_agent

WIRE = Path(rlm_wire.__file__).parent
AGENT = Path(sandbox_agent.__file__).parent
# Third-party top-level packages the agent's image installs (deploy/build-sandbox-image.sh).
AGENT_DEPENDENCIES = {"grpc", "grpc_health", "grpc_reflection", "google"}
HEAVY = ("rlm_orchestrator", "pydantic", "pydantic_settings", "litellm", "openai")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; `from x import y` gives both x
    and x.y, as y may be a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _wire_file(module: str) -> str | None:
    """The file of rlm_wire that `module` names (relative to rlm_wire/), if it is one."""
    top, *rest = module.split(".")
    if top != "rlm_wire":
        return None
    candidates = [Path(*rest, "__init__.py")] + (
        [Path(*rest[:-1], f"{rest[-1]}.py")] if rest else []
    )
    return next((c.as_posix() for c in candidates if (WIRE / c).is_file()), None)


def _fresh_modules(statement: str) -> list[str]:
    """The modules loaded by a fresh interpreter running `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return modules


def test_the_agent_imports_only_grpc_the_standard_library_and_its_wire_files() -> None:
    allowed = set(sys.stdlib_module_names) | AGENT_DEPENDENCIES | {"sandbox_agent", "rlm_wire"}
    wrong = []
    for path in sorted(AGENT.rglob("*.py")):
        for line, module in _imports(path):
            where = f"{path.relative_to(AGENT.parent)}:{line}: {module}"
            if module.split(".")[0] not in allowed:
                wrong.append(where)
            elif module.startswith("rlm_wire.") and _wire_file(module) is None:
                continue  # a name imported from a module, not a module
            elif module.split(".")[0] == "rlm_wire" and _wire_file(module) not in (
                rlm_wire.AGENT_FILES
            ):
                wrong.append(f"{where} (not in rlm_wire.AGENT_FILES)")
    assert wrong == []


def test_the_wire_imports_only_grpc_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | AGENT_DEPENDENCIES | {"rlm_wire"}
    wrong = [
        f"{path.relative_to(WIRE.parent)}:{line}: {module}"
        for path in sorted(WIRE.rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] not in allowed
    ]
    assert wrong == []


def test_the_agent_files_exist_and_are_python() -> None:
    for name in rlm_wire.AGENT_FILES:
        assert (WIRE / name).is_file(), name
        assert name.endswith(".py"), name


def test_a_running_agent_loads_nothing_heavy_and_only_its_wire_files() -> None:
    modules = _fresh_modules(
        "import sandbox_agent.__main__, sandbox_agent.server, sandbox_agent.worker, "
        "sandbox_agent.jail"
    )
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []
    wire = {_wire_file(m) for m in modules if m.split(".")[0] == "rlm_wire"}
    assert wire <= set(rlm_wire.AGENT_FILES), wire - set(rlm_wire.AGENT_FILES)
    assert "v1/sandbox_pb2.py" in wire  # the check above saw the agent's wire


def test_the_client_sdk_does_not_import_the_server() -> None:
    modules = _fresh_modules("import rlm_orchestrator.client")
    assert "rlm_orchestrator.client._async" in modules
    assert "rlm_orchestrator.convert.events" in modules
    assert [m for m in modules if m.startswith("rlm_orchestrator.service")] == []
