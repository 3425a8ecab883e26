"""benchmarks.gpu_check: the GPU check runs end to end on the CPU (--dry-run), keeps its
budget by skipping, and keeps its report when a section crashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_check as gpu_check_module

TITLES = ("Correctness", "No host sync", "Step time", "Refresh cost", "A short comparison",
          "DDP over NCCL")


@pytest.fixture(scope="module")
def gpu_check():
    return gpu_check_module


def _sections(out: Path) -> dict[int, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return {s["number"]: s for s in report["sections"]}


@pytest.mark.slow
def test_dry_run_runs_every_section_on_cpu_and_skips_only_cuda_parts(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    sections = _sections(tmp_path)
    assert sorted(sections) == [1, 2, 3, 4, 5, 6]
    for number, section in sections.items():
        assert section["status"] == "pass", (number, section["reason"], section["checks"])
        for check in section["checks"]:
            assert check["passed"] is not False, (number, check)
            if check["passed"] is None:  # only what needs CUDA is left out on the CPU
                assert "needs CUDA" in check["detail"], (number, check)
    correctness = {c["name"]: c["passed"] for c in sections[1]["checks"]}
    for dtype in ("float32", "bfloat16"):
        for path in ("foreach", "for-loop", "torch.compile(step)"):
            assert correctness[f"SophiaG {path}, {dtype} params"] is True
    assert correctness["SophiaH foreach: Hutchinson refresh + step"] is True
    skipped = [c["name"] for c in sections[2]["checks"] if c["passed"] is None]
    assert any("set_sync_debug_mode" in name for name in skipped)
    assert any("CUDA graph" in name for name in skipped)
    assert sections[3]["tables"][0]["columns"][:4] == ["optimizer", "median ms/step",
                                                        "min ms/step", "x fused AdamW"]
    assert {row[0] for row in sections[5]["tables"][0]["rows"]} == {"sophiag", "adamw"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    for number, title in enumerate(TITLES, start=1):
        assert f"## {number}. {title}" in markdown


def test_a_budget_too_small_skips_every_section_saying_so(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    for section in _sections(tmp_path).values():
        assert section["status"] == "skipped"
        assert section["reason"].startswith("budget: 0 s left, it needs")
    assert "skipped: budget" in (tmp_path / "gpu_check.md").read_text()


def test_a_crashing_section_is_recorded_and_the_next_still_runs(gpu_check, tmp_path,
                                                                  monkeypatch):
    seen_while_running = {}

    def crash(ctx, section):
        seen_while_running.update(_sections(tmp_path)[1])  # the report is on disk already
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    key, title, _, needs = gpu_check.SECTIONS[1]
    monkeypatch.setitem(gpu_check.SECTIONS, 1, (key, title, crash, needs))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "1,2"]) == 1
    assert seen_while_running["status"] == "running"
    sections = _sections(tmp_path)
    assert sections[1]["status"] == "error"
    assert "illegal memory access" in sections[1]["reason"]
    assert sections[2]["status"] == "pass"
    assert {sections[n]["status"] for n in (3, 4, 5, 6)} == {"skipped"}
    assert sections[3]["reason"] == "not asked for"


@pytest.mark.parametrize("how", ["module", "folder"])
def test_the_check_starts_as_a_module_and_as_a_folder_from_anywhere(tmp_path, how):
    """``python -m benchmarks.gpu_check`` from the checkout, and ``python benchmarks/gpu_check``
    (the form its child processes use) from any folder."""
    import subprocess
    import sys

    root = Path(gpu_check_module.__file__).resolve().parents[2]
    command = ([sys.executable, "-m", "benchmarks.gpu_check", "--help"] if how == "module"
               else [sys.executable, str(root / "benchmarks" / "gpu_check"), "--help"])
    done = subprocess.run(command, cwd=root if how == "module" else tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--dry-run" in done.stdout and "python -m benchmarks.gpu_check" in done.stdout
