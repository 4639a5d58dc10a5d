"""The reference under docs/ stays true: it builds with `mkdocs build --strict` (no broken link or anchor, no page
left out of the nav), the README stays a short newcomer's page whose headline figures are the results page's,
the defaults the docs state are the code's, and the tests the docs name exist.

The command blocks of the README and of these pages are run by tests/house/test_readme.py.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README_MAX_LINES = 300

# Defaults the table in docs/cli.md must state (more rows are welcome; each is checked against the code).
REQUIRED_DEFAULTS = {
    "curate.method", "curate.budget", "curate.threshold", "bads.theta_space", "bads.prior_combine", "bads.epochs",
    "bads.kappa", "embedder", "embedder.default_model", "model", "stages.near_dup", "stages.near_dup_threshold",
    "stages.semantic_dup", "decontaminate.ngram_words", "near_dup.shingle_words", "stages.filters", "stages.pii",
    "tune.method", "tune.steps", "synth.rows", "synth.noise",
}


def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300)


def _copy_of_the_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    shutil.copytree(DOCS, root / "docs")
    return root


# ---- the build ------------------------------------------------------------------------------------------------

def test_docs_build_strict(tmp_path):
    done = _mkdocs(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_strict_build_fails_on_a_broken_link(tmp_path):
    root = _copy_of_the_docs(tmp_path)
    assert _mkdocs(root, tmp_path / "site-before").returncode == 0  # the copy builds as the original does
    page = root / "docs" / "selection.md"
    page.write_text(page.read_text() + "\nSee [the old page](no-such-page.md).\n")
    done = _mkdocs(root, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stdout + done.stderr


def test_strict_build_fails_on_a_broken_anchor_and_on_a_page_missing_from_the_nav(tmp_path):
    root = _copy_of_the_docs(tmp_path)
    page = root / "docs" / "stages.md"
    page.write_text(page.read_text() + "\nSee [the defaults](cli.md#no-such-heading).\n")
    done = _mkdocs(root, tmp_path / "site-anchor")
    assert done.returncode != 0 and "no-such-heading" in done.stdout + done.stderr
    page.write_text(page.read_text().replace("cli.md#no-such-heading", "cli.md#defaults"))
    (root / "docs" / "orphan.md").write_text("# Left out of the nav\n")
    done = _mkdocs(root, tmp_path / "site-orphan")
    assert done.returncode != 0 and "orphan.md" in done.stdout + done.stderr


# ---- the README -----------------------------------------------------------------------------------------------

def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_links_into_docs_resolve():
    text = (REPO / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        assert (REPO / target.split("#")[0]).exists(), f"README links to missing {target}"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else len(text)]


FIGURE = re.compile(r"[+−-]?\d[\d,]*\.\d+(?: ± \d[\d,]*\.?\d*)?|\d{1,3}(?:,\d{3})+(?: ± \d[\d,]*)?")


def headline_figures(readme: str) -> list[str]:
    """The measured figures of the README's "Headline results" (decimals, with their ± spread; counts with
    thousands separators)."""
    return FIGURE.findall(_section(readme, "## Headline results"))


def test_headline_figures_are_copied_from_the_results_page():
    results = (DOCS / "results.md").read_text()
    figures = headline_figures((REPO / "README.md").read_text())
    assert len(figures) >= 15
    missing = [figure for figure in figures if figure not in results]
    assert not missing, f"README headline figures not in docs/results.md: {missing}"


def test_a_figure_missing_from_the_results_page_is_found():
    readme = "## Headline results\n- bads 0.826 ± 0.012 and 0.999 ± 0.001 on 20,419 rows\n"
    results = "| bads | 0.826 ± 0.012 | 20,419 |"
    assert [f for f in headline_figures(readme) if f not in results] == ["0.999 ± 0.001"]


# ---- defaults: the docs against the code -----------------------------------------------------------------------

def defaults_table(text: str) -> dict[str, tuple[str, str]]:
    """setting -> (documented value, where it lives) from the table under "## Defaults"."""
    rows = {}
    for line in _section(text, "## Defaults").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and all(re.fullmatch(r"`[^`]+`", cell) for cell in cells):
            name, value, where = (cell.strip("`") for cell in cells)
            assert name not in rows, f"{name} is in the defaults table twice"
            rows[name] = (value, where)
    return rows


def _field_default(owner, name: str):
    fields = getattr(owner, "model_fields", None)  # pydantic
    if isinstance(fields, dict) and name in fields:
        return fields[name].get_default(call_default_factory=True)
    if dataclasses.is_dataclass(owner):
        for field in dataclasses.fields(owner):
            if field.name == name:
                if field.default is not dataclasses.MISSING:
                    return field.default
                return field.default_factory()
    if callable(owner):
        parameter = inspect.signature(owner).parameters.get(name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise LookupError(f"{owner!r} has no field or parameter {name!r} with a default")


def _cli_default(where: str):
    import typer.main
    from dpsel.cli import app
    _, command, option = where.split()
    group = typer.main.get_command(app)
    for param in group.commands[command].params:
        if option in param.opts:
            return param.default
    raise LookupError(f"`dpsel {command}` has no option {option}")


def code_default(where: str):
    """The value at `where`: `dpsel CMD --option`, `module.NAME`, or `module.Owner.field[.field...]` (a pydantic
    or dataclass field, or a parameter of a class or function; a section's default instance for nested names)."""
    if where.startswith("dpsel "):
        return _cli_default(where)
    parts = where.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = parts[cut:]
        break
    else:
        raise LookupError(f"no module in {where}")
    for name in rest:  # a class's or function's field default (an instance for a nested section), then on
        if inspect.isclass(target) or inspect.isfunction(target):
            try:
                target = _field_default(target, name)
                continue
            except LookupError:
                pass
        target = getattr(target, name)
    return target


def render(value) -> str:
    """A code value as the docs write it: booleans and None as on/off, floats without trailing zeros."""
    if value is True:
        return "on"
    if value is False or value is None:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_mismatches(table: dict[str, tuple[str, str]]) -> list[str]:
    wrong = []
    for name, (value, where) in table.items():
        actual = render(code_default(where))
        if actual != value:
            wrong.append(f"{name}: docs say {value!r}, {where} is {actual!r}")
    return wrong


def test_documented_defaults_are_the_codes():
    table = defaults_table((DOCS / "cli.md").read_text())
    assert REQUIRED_DEFAULTS <= set(table), f"missing from the defaults table: {REQUIRED_DEFAULTS - set(table)}"
    assert not default_mismatches(table)


def test_a_wrong_default_in_the_docs_fails_the_check():
    text = (DOCS / "cli.md").read_text()
    wrong = text.replace("| `stages.near_dup_threshold` | `0.8` |", "| `stages.near_dup_threshold` | `0.85` |")
    assert wrong != text
    assert default_mismatches(defaults_table(wrong)) == [
        "stages.near_dup_threshold: docs say '0.85', dpsel.config.RunConfig.stages.near_dup_threshold is '0.8'"]


def test_cli_help_states_the_documented_defaults():
    """Where `--help` names a default, it is the table's (the table is checked against the code above)."""
    table = defaults_table((DOCS / "cli.md").read_text())
    import typer.main
    from dpsel.cli import app
    commands = typer.main.get_command(app).commands
    helps = {(name, option): param.help or "" for name, command in commands.items()
             for param in getattr(command, "params", []) for option in param.opts}
    said = {"curate.budget": ("curate", "--budget"), "stages.near_dup_threshold": ("curate", "--near-dup-threshold"),
            "curate.select.batch_size": ("curate", "--batch-size"), "curate.select.max_length": ("curate", "--max-length"),
            "tune.steps": ("tune", "--steps"), "tune.batch_size": ("tune", "--batch-size"),
            "tune.max_length": ("tune", "--max-length"), "seed": ("curate", "--seed")}
    for name, key in said.items():
        assert f"(default {table[name][0]})" in helps[key], (name, helps[key])
    assert f"{table['curate.method'][0]} (default)" in helps[("curate", "--method")]
    assert f"{table['tune.method'][0]} (default)" in helps[("tune", "--method")]
    assert table["embedder.default_model"][0].split("/")[-1] in helps[("curate", "--embedder")]


# ---- the tests the docs name ---------------------------------------------------------------------------------

def test_tests_named_in_the_docs_exist():
    defined = {name for path in (REPO / "tests").rglob("test_*.py")
               for name in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.M)}
    named = {name for page in DOCS.glob("*.md") for name in re.findall(r"`(test_\w+)`", page.read_text())}
    assert named, "the guarantees page names the tests that hold each claim"
    assert not named - defined, f"tests named in docs/ but defined nowhere under tests/: {sorted(named - defined)}"


def test_docs_name_no_test_file_paths():
    """Tests move between folders; the docs name tests by function (stable), never by file path."""
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        assert not re.findall(r"tests/\w+\.py", page.read_text()), page.name


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_every_page_starts_with_its_title(page):
    assert page.read_text().startswith("# "), f"{page.name} should start with a `# Title` line"
