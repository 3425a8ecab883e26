"""The report: sections with checks, figures and tables, written as JSON and Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sophia_pytorch.harness.jsonio import write_json

from .common import _fmt, _write_text, say


@dataclass
class Section:
    """One section of the report: its checks (passed True/False, or None: skipped), figures,
    tables and notes; ``status`` is pending, running, pass, fail, error or skipped."""

    number: int
    title: str
    key: str = ""  # the section's name in gpu_check.json (driver.SECTIONS)
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0
    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        say(f"  [{'pass' if passed else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        return bool(passed)

    def skip(self, name: str, reason: str) -> None:
        self.checks.append({"name": name, "passed": None, "detail": f"skipped: {reason}"})
        say(f"  [skip] {name}: {reason}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"title": title, "columns": columns, "rows": rows})

    def settle(self) -> None:
        """The status its checks give (an error stays an error)."""
        if self.status == "error":
            return
        verdicts = [c["passed"] for c in self.checks]
        if any(v is False for v in verdicts):
            self.status = "fail"
        elif any(v is True for v in verdicts):
            self.status = "pass"
        else:
            self.status, self.reason = "skipped", self.reason or "every part was skipped"


class Report:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``, rewritten whole and atomically."""

    def __init__(self, out: Path, header: dict[str, Any], sections: list[Section]) -> None:
        self.out, self.header, self.sections = out, header, sections

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header,
                "sections": [vars(s) for s in self.sections]}

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "gpu_check.json", self.to_dict())
        _write_text(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        h = self.header
        lines = [f"# GPU check: {h['device_name']}", "",
                 f"- command: `{h['command']}`",
                 f"- started {h['started']}, {h.get('elapsed_s', 0):.0f} s of a "
                 f"{h['budget_s']:.0f} s budget{' (dry run on CPU)' if h['dry_run'] else ''}",
                 f"- torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, NCCL {h['nccl']}, "
                 f"driver {h['driver']}, Python {h['python']}",
                 f"- device: {h['device_detail']}; host: {h['host']}",
                 f"- commit {h['commit']}; runs and caches in {h.get('work')}", "",
                 "| § | section | status | seconds | checks passed |", "|---|---|---|---|---|"]
        for s in sorted(self.sections, key=lambda s: s.number):
            passed = sum(c["passed"] is True for c in s.checks)
            counted = sum(c["passed"] is not None for c in s.checks)
            status = s.status + (f": {s.reason}" if s.reason else "")
            lines.append(f"| {s.number} | {s.title} | {status} | {s.seconds:.1f} | "
                         f"{passed}/{counted} |")
        for s in sorted(self.sections, key=lambda s: s.number):
            lines += ["", f"## {s.number}. {s.title}: {s.status}"
                      + (f" ({s.reason})" if s.reason else ""), ""]
            if s.checks:
                lines += ["| check | result | detail |", "|---|---|---|"]
                for c in s.checks:
                    verdict = {True: "pass", False: "**FAIL**", None: "skipped"}[c["passed"]]
                    detail = str(c["detail"]).replace("|", "\\|").replace("\n", " ")
                    lines.append(f"| {c['name']} | {verdict} | {detail} |")
                lines.append("")
            for key, value in s.figures.items():
                lines.append(f"- {key}: {_fmt(value)}")
            for t in s.tables:
                lines += ["", f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                          "|" + "---|" * len(t["columns"])]
                lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t["rows"]]
            if s.notes:
                lines += [""] + [f"> {n}" for n in s.notes]
        return "\n".join(lines) + "\n"
