"""The docs cover the code: every params key and every CLI command is documented under docs/, and the
README stays a front page whose test command CI can extract."""
from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from memforge.flows.cli import build_parser
from memforge.storage.params import Params

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (``Section``, ``Section | None``, ``Optional[Section]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def params_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every leaf key of ``model``, dotted (``targets.k``, ``runtime.num_workers``)."""
    keys = []
    for name, field in model.model_fields.items():
        sections = _models(field.annotation)
        if sections:
            for section in sections:
                keys += params_keys(section, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def cli_commands() -> list[str]:
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(name for action in subparsers for name in action.choices)


def docs_text() -> str:
    pages = sorted(DOCS.glob("*.md"))
    assert pages, f"no Markdown pages under {DOCS}"
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


@pytest.mark.unit
def test_the_params_walk_finds_every_section():
    keys = params_keys()
    assert {"artifacts_dir", "targets.k", "runtime.num_workers", "runtime.trust_remote_code", "flow.cron"} <= set(keys)
    assert not any(key.startswith("encode.num_workers") for key in keys)


@pytest.mark.unit
def test_every_params_key_is_documented():
    text = docs_text()
    missing = [key for key in params_keys() if not re.search(rf"`{re.escape(key)}`", text)]
    assert not missing, f"params keys not documented in docs/*.md (as `key`): {missing}"


@pytest.mark.unit
def test_every_cli_command_is_documented():
    text = docs_text()
    commands = cli_commands()
    assert {"run", "prepare", "lineage", "verify", "bench"} <= set(commands)
    missing = [c for c in commands if not re.search(rf"memforge {re.escape(c)}\b", text)]
    assert not missing, f"CLI commands not documented in docs/*.md (as `memforge COMMAND`): {missing}"


@pytest.mark.unit
def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.unit
def test_the_readme_holds_the_test_command():
    """What .ci/run extracts: the lines between the markers that are neither markers nor fences."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^<!-- test-command -->\n(.*?)^<!-- /test-command -->$", text, re.S | re.M)
    assert block, "README.md has no <!-- test-command --> ... <!-- /test-command --> block"
    command = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("```")]
    assert len(command) == 1, f"the test-command block must hold one command line, found {command}"
    assert "pytest" in command[0] and "-c constraints.txt" in command[0]


@pytest.mark.unit
def test_every_fault_row_names_tests_that_exist():
    """Each row of reliability.md's "What happens when…" table names the tests that reproduce it, and they exist."""
    table = (DOCS / "reliability.md").read_text().split("## What happens when", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| when")]
    assert len(rows) > 30
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.rsplit("|", 2)[-2])
        assert named, f"no test named in: {row[:80]}"
        for file, name in named:
            assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.MULTILINE), (file, name)


@pytest.mark.unit
def test_every_page_that_runs_dvc_repro_says_to_activate_the_environment():
    """DVC runs the stages as `memforge <stage>` from PATH: outside the virtual environment `dvc repro` fails with
    "memforge: command not found", so each page with a `dvc repro` command line says to activate it first."""
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        if any(re.search(r"(^|&& )dvc repro", block, re.M) for block in blocks):
            assert "source .venv/bin/activate" in text, page.name
