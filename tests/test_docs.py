"""The pages users copy from run as written: the code blocks of the README, the getting-started
page and the bring-your-own page.

A page's ```python blocks run in order in one namespace, in a fresh folder that sees the
repository's ``configs/``; a ```python or ```yaml block whose first line is ``# <name>.py`` or
``# <name>.yaml`` is written to that file instead (a user's file the next blocks use). Shell and
other blocks are not run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/getting-started.md", "docs/guide/bring-your-own.md"]
BLOCK = re.compile(r"^```(python|yaml)\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"^# ([\w./-]+\.(?:py|yaml))\s*$")


def blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / page).read_text())


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_code_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    scope: dict = {"__name__": f"doc:{page}"}
    ran = 0
    for language, code in blocks(page):
        first = code.splitlines()[0] if code.strip() else ""
        target = FILE.match(first)
        if target:
            (tmp_path / target[1]).write_text(code)
        elif language == "python":
            exec(compile(code, f"{page} (block {ran})", "exec"), scope)
            ran += 1
    assert ran, f"{page} has no Python block to run"
    assert os.getcwd() == str(tmp_path)
