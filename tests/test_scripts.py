"""Every script in scripts/ runs from a plain clone: it explains itself (--help), and one that needs something a
clone lacks says so in one line instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_explains_itself_from_any_folder(script, tmp_path):
    done = _run(str(script), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "Traceback" not in done.stderr


@pytest.mark.parametrize("script, option", [("measure_stop_tokens.py", "--base"), ("measure_advice.py", "--stories")])
def test_a_script_missing_the_shared_model_says_what_it_needs_in_one_line(script, option, tmp_path):
    done = _run(str(REPO / "scripts" / script), option, str(tmp_path / "absent"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "needs stories260K" in done.stderr and option in done.stderr
