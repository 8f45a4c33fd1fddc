"""The README and docs/pipeline.md name only what exists: every `python SCRIPT ...` line of their code blocks asks
its script for flags its --help lists, every script and file they name is in the tree, and every other --flag
they mention belongs to some script; the README stays a short door (<= 250 lines)."""
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "pipeline.md"]
SCRIPTS = ["prepare.py", "distill.py", "finetune.py", "eval.py", "experiment/experiment.py", "bench/bench.py"]


@functools.cache
def helps():
    """Every script's --help, the processes started together (each imports torch: seconds)."""
    procs = {s: subprocess.Popen([sys.executable, str(ROOT / s), "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT) for s in SCRIPTS}
    out = {s: p.communicate() + (p.returncode,) for s, p in procs.items()}
    for s, (_, err, rc) in out.items():
        assert rc == 0, f"{s} --help failed: {err[-500:]}"
    return {s: text for s, (text, _, _) in out.items()}


def help_text(script):
    return helps()[script]


def commands(page):
    """(script, [flags]) for each `python SCRIPT ...` line in the page's code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"python3? (\S+\.py)((?: (?!&&|;|\|)\S+)*)", line):
                yield m.group(1), re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", m.group(2))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_in_the_docs_asks_for_flags_its_script_has(page):
    seen = 0
    for script, flags in commands(page):
        assert (ROOT / script).is_file(), f"{page.name} runs {script}, which is not in the tree"
        if script not in SCRIPTS:
            continue
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text(script))]
        assert not missing, f"{page.name}: `python {script}` with {missing}, which its --help does not list"
        seen += 1
    assert seen >= 3


def test_every_flag_the_readme_mentions_exists_somewhere():
    text = (ROOT / "README.md").read_text()
    every = "\n".join(help_text(s) for s in SCRIPTS)
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)) - {"--index-url"}  # pip's, not ours
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", every))
    assert not missing, f"README.md names {missing}, which no script's --help lists"


def test_the_readme_is_a_short_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", text):
        assert (ROOT / target).exists(), f"README.md links to {target}, which is not in the tree"


def test_the_reading_orders_line_counts_are_the_files():
    counts = re.findall(r"\*\*`([\w/.]+\.py)`\*\* \[(\d+)\]", (ROOT / "README.md").read_text())
    assert len(counts) >= 7
    for name, n in counts:
        assert len((ROOT / name).read_text().splitlines()) == int(n), f"README.md says {name} has {n} lines"
