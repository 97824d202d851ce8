"""The README runs: each of its ```python blocks, on its own, in a fresh interpreter, as a
reader would paste it; and every measured figure in it comes with the command that
reproduces it.

A block that cannot run here (it needs a GPU, a download, ...) says so on the line before
it, ``<!-- not-run: the reason -->``; it is the only kind of block skipped. The blocks run
concurrently, each in its own ``python`` subprocess with the repository first on
``sys.path``, from an empty directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 120  # per block; together they take ~15 s on 2 CPU cores

FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->", re.S)
# a measured figure: a speedup or ratio (1.24x, 0.33x, with the sign U+00D7), a time in
# s or ms, or a throughput
FIGURE = re.compile(r"\d(?:\.\d+)?\u00d7|\b\d+(?:\.\d+)? ?(?:s|ms)\b|tokens/s")
# what reproduces one: a fastpeft-bench command line or an example's
COMMAND = re.compile(r"`(?:fastpeft-bench|python3? -m fastpeft\.bench|python3? examples/)"
                     r"[^`]*`")


@dataclass(frozen=True)
class Block:
    """A ```python block of the README: where it starts, its code, and why it is not run
    (None: it runs)."""

    line: int
    code: str
    not_run: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The README's python blocks, with the ``not-run`` marker on the last non-blank line
    before each, if any."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(before.strip())
        blocks.append(Block(text.count("\n", 0, match.start()) + 1, match.group(1),
                            marker.group(1).strip() if marker else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> Iterator[dict[Block, subprocess.Popen]]:
    """Every block that runs, started at once, each in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = {}
    for block in BLOCKS:
        if block.not_run is None:
            cwd = tmp_path_factory.mktemp(f"readme-{block.line}")
            started[block] = subprocess.Popen(
                [sys.executable, "-c", block.code], cwd=cwd, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_readme_python_block_runs_on_its_own(block, processes):
    if block.not_run is not None:
        pytest.skip(f"marked not-run: {block.not_run}")
    try:
        output, _ = processes[block].communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block}: still running after {TIMEOUT_S} s")
    assert processes[block].returncode == 0, f"{block} failed on its own:\n{output[-3000:]}"


def test_only_marked_blocks_are_skipped():
    """Every not-run marker names its reason and stands right before a python block, so
    the blocks skipped are exactly the ones marked."""
    text = README.read_text()
    assert BLOCKS, "README has no python example"
    marked = [block for block in BLOCKS if block.not_run is not None]
    assert len(NOT_RUN.findall(text)) == len(marked), "a not-run marker before no python block"
    assert all(block.not_run for block in marked), "a not-run marker without a reason"
    assert len(marked) < len(BLOCKS)


def test_every_figure_comes_with_its_command():
    """A section (from one heading to the next) that quotes a measured figure shows the
    command that measured it. Code blocks are left out: their numbers are examples."""
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.M | re.S)
    sections = re.split(r"^(?=#{2,3} )", text, flags=re.M)
    assert any(FIGURE.search(section) for section in sections)
    for section in sections:
        if FIGURE.search(section):
            heading = section.splitlines()[0]
            assert COMMAND.search(section), f"{heading!r}: figures without their command"
