"""Every command block of the README runs, in order, in a fresh folder (what a fresh clone has: configs/,
schedules.yaml), and schedules.yaml passes its check — so no example can rot. The reference pages under docs/
continue from where the README's tour left off (its data/synth, data/incoming and runs/cur): each page's blocks
run, in order, in a copy of that folder.

A block is skipped only when the line above it says `<!-- readme-test: skip (why) -->` (venv builds, servers,
GPUs, clusters, long runs).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SKIP_MARK = "<!-- readme-test: skip"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
DOC_BLOCK_SECONDS = 240  # a docs block is an example, not a job: longer ones get a skip mark with a reason

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


def doc_pages() -> list[Path]:
    """The pages of docs/ in the order of mkdocs.yml's nav (tests/house/test_docs.py checks that every page is in it)."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    docs = REPO / config.get("docs_dir", "docs")

    def files(entries) -> list[str]:
        out = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            out.extend(files(value) if isinstance(value, list) else [value])
        return out

    return [docs / name for name in files(config["nav"])]


def _skip_marks_explained(path: Path) -> None:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(SKIP_MARK):  # every skip says why
            assert re.match(r"<!-- readme-test: skip \(.+\) -->", line), f"{path.name}:{number}: {line}"


def test_skip_marks_are_explained_and_blocks_found():
    for path in [REPO / "README.md", *doc_pages()]:
        _skip_marks_explained(path)
    languages = [language for language, _, _ in readme_blocks((REPO / "README.md").read_text())]
    assert languages.count("bash") >= 1 and languages.count("python") >= 2
    docs = [block for page in doc_pages() for block in readme_blocks(page.read_text())]
    assert len(docs) >= 4  # the reference has runnable examples too


def test_a_block_after_a_skip_mark_is_left_out():
    text = ("```bash\necho one\n```\n<!-- readme-test: skip (needs a server) -->\n```bash\necho two\n```\n"
            "```python\nprint(3)\n```\n")
    assert [(language, code) for language, code, _ in readme_blocks(text)] == [("bash", "echo one\n"),
                                                                               ("python", "print(3)\n")]


def _fresh_clone(folder: Path) -> Path:
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


def _run_blocks(path: Path, folder: Path, env: dict, limit_s: float | None = None) -> None:
    """Run `path`'s blocks in order in `folder`; each must exit 0 (and, with `limit_s`, finish within it)."""
    for language, code, line in readme_blocks(path.read_text()):
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        started = time.monotonic()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - started
        where = f"{path.relative_to(REPO)} line {line} ({language} block)"
        assert done.returncode == 0, (f"{where} exited {done.returncode}:\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        assert limit_s is None or seconds <= limit_s, (
            f"{where} took {seconds:.0f} s: keep doc examples small, or mark the block "
            f"`<!-- readme-test: skip (why) -->`")


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh clone after the README's blocks ran in it: where the docs' examples start."""
    folder = _fresh_clone(tmp_path_factory.mktemp("readme") / "clone")
    env = _env(folder)
    _run_blocks(REPO / "README.md", folder, env)
    return folder, env


@pytest.mark.timeout(1800)  # a dozen CLI start-ups, three small model runs and a flow: minutes on a busy 2-core machine
def test_every_readme_command_block_runs_in_a_fresh_folder(tour):
    folder, env = tour
    check = subprocess.run([sys.executable, "-m", "flows.serve", "schedules.yaml", "--check"], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "filter/hourly-filter" in check.stdout


@pytest.mark.timeout(1800)  # the first one to run also waits for the README's tour
@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: page.name)
def test_every_docs_block_runs_after_the_readme_tour(tour, page, tmp_path):
    folder, _ = tour
    copy = tmp_path / "clone"
    shutil.copytree(folder, copy, symlinks=True, ignore=shutil.ignore_patterns("*.lock"))
    _run_blocks(page, copy, _env(copy), limit_s=DOC_BLOCK_SECONDS)
