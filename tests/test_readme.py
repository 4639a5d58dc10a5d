"""Every command block of the README runs, in order, in a fresh folder (what a fresh clone has: configs/,
schedules.yaml), and schedules.yaml passes its check — so no example can rot.

A block is skipped only when the line above it says `<!-- readme-test: skip (why) -->` (venv builds, servers).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_MARK = "<!-- readme-test: skip"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.slow


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every bash/python block not marked as skipped."""
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.startswith(SKIP_MARK):
            continue
        blocks.append((match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


def test_skip_marks_are_explained_and_blocks_found():
    text = (REPO / "README.md").read_text()
    for line in text.splitlines():
        if line.startswith(SKIP_MARK):
            assert re.match(r"<!-- readme-test: skip \(.+\) -->", line), line  # every skip says why
    languages = [language for language, _, _ in readme_blocks(text)]
    assert languages.count("bash") >= 1 and languages.count("python") >= 2


def _fresh_clone(tmp_path: Path) -> Path:
    folder = tmp_path / "clone"
    folder.mkdir()
    shutil.copytree(REPO / "configs", folder / "configs")
    shutil.copy(REPO / "schedules.yaml", folder / "schedules.yaml")
    (folder / ".venv").symlink_to(sys.prefix)  # the README calls `.venv/bin/python`
    return folder


def _env(folder: Path) -> dict:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               PREFECT_HOME=str(folder / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.mark.timeout(1800)  # a dozen CLI start-ups and three small model runs: minutes on a busy 2-core machine
def test_every_readme_command_block_runs_in_a_fresh_folder(tmp_path):
    folder = _fresh_clone(tmp_path)
    env = _env(folder)
    for language, code, line in readme_blocks((REPO / "README.md").read_text()):
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"README.md line {line} ({language} block) exited {done.returncode}:\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    check = subprocess.run([sys.executable, "-m", "flows.serve", "schedules.yaml", "--check"], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "filter/hourly-filter" in check.stdout
