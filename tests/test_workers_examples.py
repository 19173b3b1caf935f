"""The examples run as their README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(90)
def test_quickstart_finishes_by_itself_and_shows_each_result_and_worker(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "24/24 done" in result.stdout
    lines = [line.split() for line in result.stdout.splitlines() if "SUCCESS" in line]
    assert len(lines) == 24
    assert {line[0] for line in lines} == {"add", "slow_square", "word_count", "record_visit"}
    visits = [int(line[-2]) for line in lines if line[0] == "record_visit"]
    assert sorted(visits) == [1, 1, 2, 2, 3, 4, 5]  # one SQLite file, every worker's own pool
    assert all(line[-1].isdigit() for line in lines)
