"""The wheel: what it ships, and that it runs the demo installed alone in a fresh venv.

Our fakes (Kubernetes, kubelet, Modal, the test PKI) live in tests/fakes/ and must stay out
of it; the scripted LM is public and must be in it (the demo needs it). uv builds the wheel
and installs it from its cache (seconds); the demo's run is mostly litellm's first import.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UV = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
# Anything of our test fakes, by name (fake_kube*.py, fake_kubelet.py, fake_modal*.py, ...).
FAKE = re.compile(r"(^|/)(fake_\w*|certs|fake_cluster)\.py$|(^|/)tests/")

pytestmark = pytest.mark.skipif(UV is None, reason="uv is not installed (make setup installs it)")


def _uv(*args: str | Path, timeout: float = 180) -> None:
    assert UV is not None
    done = subprocess.run(
        [UV, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert done.returncode == 0, f"uv {' '.join(map(str, args))}:\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _uv("build", "--wheel", "--quiet", "--out-dir", out, REPO)
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_ships_the_product_and_no_fakes(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {
        "rlm_orchestrator",
        "rlm_wire",
        "sandbox_agent",
    }
    assert [n for n in names if FAKE.search(n)] == []
    assert "rlm_orchestrator/testing/scripted_lm.py" in names
    assert "sandbox_agent/__main__.py" in names
    # The viewer's page: its files, no build step (rlm-orchestrator ui serves them as they are).
    for static in ("index.html", "app.js", "style.css", "login.html", "login.js"):
        assert f"rlm_orchestrator/ui/static/{static}" in names, static
    # Typed packages (PEP 561): each ships its marker.
    for package in ("rlm_orchestrator", "rlm_wire", "sandbox_agent"):
        assert f"{package}/py.typed" in names, package


def test_the_version_is_written_once(wheel: Path) -> None:
    """The wheel's metadata, both CLIs' --version and the packages' __version__ agree: one
    source (sandbox_agent/__init__.py), read by pyproject.toml."""
    import rlm_orchestrator
    import sandbox_agent

    metadata = next(
        zipfile.ZipFile(wheel).read(n).decode()
        for n in zipfile.ZipFile(wheel).namelist()
        if n.endswith(".dist-info/METADATA")
    )
    version = sandbox_agent.__version__
    assert f"\nVersion: {version}\n" in metadata
    assert rlm_orchestrator.__version__ == version
    assert not re.search(r"(?m)^version\s*=", (REPO / "pyproject.toml").read_text())
    for command in (["-m", "rlm_orchestrator"], ["-m", "sandbox_agent"]):
        shown = subprocess.run(
            [sys.executable, *command, "--version"], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0 and shown.stdout.split()[-1] == version, shown
    assert f"## {version}" in (REPO / "CHANGELOG.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_installed_wheel_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _uv("venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    _uv("pip", "install", "--quiet", "--python", python, wheel)
    # Nothing of this checkout on the path: the venv's own copy, from the wheel, runs.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # offline: litellm's bundled cost map
    probe = (
        "import importlib.util as u;"
        "print(u.find_spec('rlm_orchestrator').origin);"
        "names = ('tests', 'modal', 'lightkube', 'kubernetes_validate');"
        "print([m for m in names if u.find_spec(m)])"
    )
    where = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    origin, extras = where.stdout.splitlines()
    assert Path(origin).is_relative_to(venv), origin
    assert extras == "[]", "the demo must run without the dev extras"
    demo = subprocess.run(
        [venv / "bin" / "rlm-orchestrator", "demo", "--size", "20000", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.strip() == "The secret launch code is 7-ALPHA-42."


def test_this_checkout_imports_fakes_from_tests() -> None:
    """The fakes are found where the tests import them, and nowhere in the product."""
    assert importlib.util.find_spec("tests.fakes.fake_kube") is not None
    assert importlib.util.find_spec("rlm_orchestrator.testing.fake_kube") is None
