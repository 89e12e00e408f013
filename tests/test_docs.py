"""The guides cannot rot: every shell block of docs/*.md that runs on the demo model is executed,
guide after guide in one working directory (checkpoints.md trains the run that evaluation.md and
faults.md use), with the console scripts this checkout installs. A block preceded by
`<!-- not run: REASON -->` needs a cluster, a GPU or the network: it is reported as a skip with
its reason. The README's own two commands are what CI runs; its tour points into the guides.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bloom_train import data_cache  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
# The order the blocks run in: later guides use what earlier ones made.
GUIDES = ["data.md", "running.md", "planning.md", "checkpoints.md", "evaluation.md", "faults.md", "gpu.md"]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
BLOCK_TIMEOUT_S = 600


def blocks(text: str) -> list:
    """(runnable?, reason, code) for every ```bash block, in order."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marked = NOT_RUN.search(before)
            found.append((marked is None, marked.group(1) if marked else "", "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


def guide_blocks() -> list:
    return [(guide, index, block) for guide in GUIDES
            for index, block in enumerate(blocks((DOCS / guide).read_text()))]


def test_every_guide_is_run_and_linked_from_the_readme():
    guides = {p.name for p in DOCS.glob("*.md")} - {"measurements.md"}
    assert guides == set(GUIDES)
    readme = (REPO / "README.md").read_text()
    for guide in [*GUIDES, "measurements.md"]:
        assert f"docs/{guide}" in readme, guide


def test_the_parser_sees_marks_and_blocks():
    text = "x\n```bash\necho a\n```\n<!-- not run: needs a GPU -->\n\n```bash\necho b\n```\n```\nout\n```\n"
    assert blocks(text) == [(True, "", "echo a"), (False, "needs a GPU", "echo b")]


@pytest.mark.parametrize("guide,index,block", [b for b in guide_blocks() if not b[2][0]],
                         ids=lambda value: str(value) if not isinstance(value, tuple) else "")
def test_blocks_needing_a_cluster_or_gpu_are_skipped_with_their_reason(guide, index, block):
    pytest.skip(f"{guide} block {index + 1}: {block[1]}")


def test_guides_commands_run_on_the_demo_model(tmp_path, data_cache):
    """Each runnable block in guide order, in one directory, `bash -e -o pipefail`; the shared demo
    corpus cache stands in for `data_cache` so no block retrains the tokenizer."""
    (tmp_path / "data_cache").symlink_to(data_cache, target_is_directory=True)
    (tmp_path / "tests").mkdir()  # the guides' commands run from a checkout: its test fixtures
    (tmp_path / "tests" / "fixtures").symlink_to(REPO / "tests" / "fixtures", target_is_directory=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO))
    ran = 0
    for guide, index, (runnable, _, code) in guide_blocks():
        if not runnable:
            continue
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert result.returncode == 0, (f"docs/{guide} block {index + 1} exited {result.returncode}:\n{code}\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        ran += 1
    assert ran >= 10
    assert '"reason": "kill_switch"' in (tmp_path / "runs/demo/exit.json").read_text()
    assert (tmp_path / "hf-demo" / "config.json").is_file() and (tmp_path / "eval.json").stat().st_size
    assert (tmp_path / "runs/demo-ka/checkpoints/latest").is_file()
