"""Release hygiene: the sdist and the wheel build, pass ``twine check``, carry the C++ kernel
source, ``py.typed`` and the LICENSE, and the wheel installs into a fresh virtualenv (no
system site-packages) where SophiaG takes a step.

``python -m build`` builds the sdist first and the wheel from the unpacked sdist, so a file
missing from the sdist also fails the wheel. The fresh environment gets torch 2.13.0 (the
version the project pins), numpy and ninja from pip's configured sources, then the wheel
with ``--no-deps``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import sophia_pytorch
from sophia_pytorch.functional import fused_kernel_available

pytest.importorskip("build", reason="the test extra (python -m build)")
pytest.importorskip("twine", reason="the test extra (twine check)")

ROOT = Path(__file__).resolve().parents[1]
VERSION = sophia_pytorch.__version__
KERNEL_SOURCE = "sophia_pytorch/_kernel/sophia_step.cpp"

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path = ROOT, timeout: int = 900,
         env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_the_version_is_single_sourced(dist: dict[str, Path]) -> None:
    assert dist["wheel"].name.startswith(f"sophia_pytorch-{VERSION}-")
    assert dist["sdist"].name == f"sophia_pytorch-{VERSION}.tar.gz"
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    assert f"## {VERSION}" in (ROOT / "CHANGELOG.md").read_text()


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    output = _run(sys.executable, "-m", "twine", "check", "--strict", dist["wheel"], dist["sdist"])
    assert output.count("PASSED") == 2, output


def test_the_wheel_ships_the_kernel_source_types_and_license(dist: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    info = f"sophia_pytorch-{VERSION}.dist-info"
    assert {KERNEL_SOURCE, "sophia_pytorch/py.typed", f"{info}/licenses/LICENSE",
            "sophia_pytorch/harness/trainer.py",
            "sophia_pytorch/integrations/transformers.py"} <= names
    metadata = zipfile.ZipFile(dist["wheel"]).read(f"{info}/METADATA").decode()
    assert f"Version: {VERSION}" in metadata and "License-Expression: MIT" in metadata
    entry_points = zipfile.ZipFile(dist["wheel"]).read(f"{info}/entry_points.txt").decode()
    assert "sophia = sophia_pytorch.harness.cli:main" in entry_points


def test_the_sdist_ships_the_kernel_source_and_license(dist: dict[str, Path]) -> None:
    prefix = f"sophia_pytorch-{VERSION}"
    with tarfile.open(dist["sdist"]) as sdist:
        names = set(sdist.getnames())
    assert {f"{prefix}/src/{KERNEL_SOURCE}", f"{prefix}/src/sophia_pytorch/py.typed",
            f"{prefix}/LICENSE", f"{prefix}/README.md", f"{prefix}/pyproject.toml"} <= names


def test_the_wheel_installs_into_a_fresh_virtualenv_and_takes_a_step(
        dist: dict[str, Path], tmp_path: Path) -> None:
    # Without PYTHONPATH: a checkout on it (src/ with its egg-info) would look installed to pip.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, env=env)  # no system site-packages
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "torch==2.13.0", "numpy", "ninja", env=env)
    _run(python, "-m", "pip", "install", "-q", "--no-deps", dist["wheel"], env=env)
    script = textwrap.dedent(f"""
        import sys, torch, sophia_pytorch
        from pathlib import Path
        from sophia_pytorch import SophiaG
        package = Path(sophia_pytorch.__file__).parent
        assert "site-packages" in str(package), package            # the wheel, not the checkout
        assert sophia_pytorch.__version__ == {VERSION!r}
        assert (package / "_kernel" / "sophia_step.cpp").is_file()
        assert (package / "py.typed").is_file()
        for fused in {(False, True) if fused_kernel_available() else (False,)}:
            param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
            param.grad = torch.tensor([0.5, -0.25, 0.0])
            SophiaG([param], lr=0.1, weight_decay=0.2, fused=fused).step()
            # h = 0 before any refresh, so the step is lr * sign(m) after decoupled decay
            expected = [1.0 * (1 - 0.02) - 0.1, -2.0 * (1 - 0.02) + 0.1, 3.0 * (1 - 0.02)]
            assert torch.allclose(param.detach().double(), torch.tensor(expected).double()), param
        print("stepped")
    """)
    output = _run(python, "-c", script, cwd=tmp_path, env=env)
    assert "stepped" in output
