"""The layout's rules that code can check: the root's scripts do not import one another (what two scripts share
lives in a module)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository


def test_no_root_script_imports_another_script():
    scripts = {p.stem for p in ROOT.glob("*.py") if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert {"prepare", "finetune", "distill", "eval"} <= scripts
    found = []
    for name in sorted(scripts):
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{name}.py imports {m}" for m in imported if m.split(".")[0] in scripts - {name}]
    assert not found, found
