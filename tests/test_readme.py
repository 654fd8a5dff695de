"""The README's quickstart runs as written, early in the file, and no document links outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _first_python_block(text: str) -> tuple[int, str]:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "the README has no python code block"
    return text[: match.start()].count("\n") + 1, match.group(1)


def test_the_quickstart_comes_first_and_runs_as_written(tmp_path: Path):
    line, code = _first_python_block((ROOT / "README.md").read_text())
    assert line <= 40, f"the first code block starts on line {line}"
    assert "Linear4bit" in code and "quantize_4bit" in code and "quantize_model" in code
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "converted 2 Linear layers to 4 bits" in done.stdout


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_links_stay_inside_the_repository_and_resolve(document: Path):
    text = document.read_text()
    assert "http://" not in text and "https://" not in text, f"{document.name} links outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        assert (document.parent / target).exists(), f"{document.name} links to a missing {target}"
