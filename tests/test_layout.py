"""The layout's rules that code can check. Imports flow one way: the scripts (distill, finetune, prepare, eval) use
the core (hyena.py, train.py, data.py) and the extras (fast/, modal/, evaluation/, harness/, experiment/, bench/) use
it too; the core never imports an extra, and the support modules it may use (PLUMBING) import no script and no
extra. No circles, no drawer folder, short files, a short reading path for `import distill`."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
SCRIPTS = {"distill", "finetune", "prepare", "eval"}  # the card's commands
CORE = {"hyena", "train", "data"}  # the model, the loop, the batches: what a reader of the method opens
PLUMBING = {  # what the core may use beside itself: no script, no extra, no speed, no Laughing Hyena
    "cli",         # the scripts' one error path, atomic writes, folder locks, the progress line
    "hub",         # the hub client
    "tokenizer",   # tokenizer.json -> tiktoken
    "training",    # the loop's settings (TrainConfig, DistillConfig), checkpoints and resume, its process, --branches
    "pretrained",  # checkpoints in HF's format: config.json, safetensors, weights checked by name and shape
    "corpora",     # the text prepare.py reads
}
EXTRAS = {"fast", "modal", "evaluation", "harness", "experiment", "bench"}  # use the core; the core never uses them


def test_no_script_is_imported_by_another_script_or_by_a_module():
    scripts = {p.stem for p in ROOT.glob("*.py") if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert {"prepare", "finetune", "distill", "eval"} <= scripts
    others = sorted((CORE | PLUMBING | EXTRAS) - {"bench"})  # bench/ times the scripts' own objectives
    files = [ROOT / f"{name}.py" for name in sorted(scripts)] + [ROOT / f"{name}.py" for name in others] + \
        sorted(p for name in others for p in (ROOT / name).glob("**/*.py"))
    files = [f for f in files if f.is_file()]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found += [f"{path.relative_to(ROOT)} imports {m}" for m in imported
                      if m.split(".")[0] in scripts - {path.stem if path.parent == ROOT else ""}]
    assert not found, found


def test_write_atomic_replaces_whole_files_or_leaves_the_old_one(tmp_path):
    from cli import write_atomic
    path = tmp_path / "out.json"
    write_atomic(path, "first\n")
    write_atomic(path, b"second\n")
    assert path.read_text() == "second\n"

    def broken(f):
        f.write(b"half a fi")
        raise OSError("disk full")
    try:
        write_atomic(path, broken)
    except OSError:
        pass
    assert path.read_text() == "second\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp left


def test_files_are_replaced_only_through_write_atomic():
    """os.replace / rename / write_text outside cli.write_atomic only where a whole write cannot be one call:
    the hub's resumable downloads and cache links, prepare.py's streamed .bin files (moved together, after their
    checks), and the checkpoint folder's swap."""
    allowed = {"cli.py", "hub.py", "prepare.py", "training/checkpoint.py"}
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "data", "runs") or rel.name.startswith("test_") or str(rel) in allowed:
            continue
        found += [f"{rel}: {m.group(0)}" for m in re.finditer(r"os\.replace\(|\.rename\(|\.write_text\(|\.write_bytes\(",
                                                                 path.read_text())]
    assert not found, found


def test_one_progress_line_for_downloads_and_tokenizing(capsys):
    """cli.Progress serves hub.py and prepare.py: in a log (stderr not a terminal) a line every 30 s, and the
    final line always; quiet draws nothing."""
    from cli import Progress
    progress = Progress(total=100)
    progress.update(10, lambda rate, eta: f"10 of 100{eta}")  # 30 s have not passed: not drawn
    progress.update(100, lambda rate, eta: f"done at {rate:.0f}/s{eta}", final=True)
    Progress(total=100, quiet=True).update(100, lambda rate, eta: "never", final=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done at ") and "ETA" not in lines[0]
    progress.t0 = progress.shown = progress.shown - 31  # 31 s later, half done: a line with the ETA of the rest
    progress.update(50, lambda rate, eta: f"half{eta}")
    assert capsys.readouterr().err == "half, ETA 31 s\n"
    sources = {name: (ROOT / name).read_text() for name in ("hub.py", "prepare.py")}
    assert all("Progress(" in text and "class _Progress" not in text for text in sources.values())


def test_one_repo_id_rule():
    """Hub ids are told from paths in one place (hub.REPO_ID, hub.looks_like_path), not by regexes here and there."""
    found = [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("**/*.py"))
             if p.name != "hub.py" and "tests" not in p.parts and re.search(r"re\.compile\(r?[\"'][^\"']*\\w\.-", p.read_text())]
    assert not found, found


def test_names_are_imported_from_where_they_are_defined():
    """No re-exports: `from m import name` (here, in bench/, experiment/, harness/ and the tests) takes name from
    the module that defines it, never from one that imported it (hyena once passed on Config and load_tokenizer,
    hub the safetensors functions)."""
    def defined(module):
        tree = ast.parse(module.read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names |= {t.id for n in ast.walk(node) for t in [n] if isinstance(t, ast.Name)
                          and isinstance(t.ctx, ast.Store)}
            elif isinstance(node, ast.If):  # e.g. `if triton is not None:` around a kernel
                names |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        return names

    ours = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
            for p in ROOT.glob("**/*.py")
            if not {"data", "runs"} & set(p.relative_to(ROOT).parts)}
    found, names = [], {module: defined(path) for module, path in ours.items()}
    for path in ours.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ours and node.level == 0:
                package = ours[node.module].parent if ours[node.module].name == "__init__.py" else None
                missing = [a.name for a in node.names if a.name not in names[node.module]  # nor a module of it:
                           and not (package and ((package / f"{a.name}.py").exists() or (package / a.name).is_dir()))]
                found += [f"{path.relative_to(ROOT)}: from {node.module} import {n}" for n in missing]
    assert not found, found


def test_the_model_does_not_import_the_http_client():
    import subprocess
    import sys
    code = "import sys, hyena; print(sorted({'hub', 'requests'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_meaning_per_name():
    """DTYPES is the --dtype table (pretrained/weights.py), evaluate is eval's perplexity pass, decode is the decoding module: no other
    module defines these names at its top level, and no function (methods aside) or parameter is named so."""
    owner = {"DTYPES": "pretrained/weights.py", "evaluate": "eval.py", "decode": None}
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel, tree = str(path.relative_to(ROOT)), ast.parse(path.read_text())
        methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and id(node) not in methods:
                names.append(node.name)
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                names += [a.arg for a in node.args.args + node.args.kwonlyargs]
        found += [f"{rel}: {n}" for n in names if n in owner and owner[n] != rel]
    assert not found, found


def test_one_position_representation_in_the_forwards():
    """The decoding position is always hyena.Cache.pos, a device tensor: no forward or decoding state asks
    which kind it is."""
    for name in ("hyena.py", "modal/student.py"):
        assert "is_tensor(" not in (ROOT / name).read_text(), name


def test_the_root_holds_at_most_a_dozen_modules():
    """The card's files (hyena, distill, finetune, prepare, eval, test_hyena) and the few modules a reader needs
    beside them; everything else lives in a folder named for what it holds (training/, pretrained/, fast/, ...)."""
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= 12, root
    assert {"hyena.py", "distill.py", "finetune.py", "prepare.py", "eval.py", "test_hyena.py"} <= set(root)
    assert sorted(p.name for p in ROOT.glob("test_*.py")) == ["test_hyena.py"]  # every other test in tests/


def test_no_module_is_longer_than_a_sitting():
    """Every non-test file reads in one sitting: at most about 300 lines (330 at the most). A file that grows past
    that splits, moving a cohesive part into a folder named for it (training/, fast/, ...), never by packing lines.
    hyena.py, the model whole in one file as the card asks, reads top to bottom in at most 650."""
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if {"tests", "data", "runs"} & set(rel.parts) or rel.name.startswith("test_"):
            continue
        lines, limit = len(path.read_text().splitlines()), 650 if str(rel) == "hyena.py" else 330
        found += [f"{rel}: {lines} lines (at most {limit})"] if lines > limit else []
    assert not found, found


def imports(path, top_level_only):
    """The modules `path` imports (a from-import's names too: a submodule or a name), at its top level only (the
    body, its ifs and trys) or everywhere, as (module, line)."""
    tree, found = ast.parse(path.read_text()), []
    nodes = ast.walk(tree) if not top_level_only else \
        [n for top in tree.body for n in ast.walk(top) if not isinstance(top, (ast.FunctionDef, ast.ClassDef))]
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def test_the_model_imports_only_torch_and_the_standard_library():
    """hyena.py is the core: at its top it imports torch and the standard library, nothing of the project (fast/,
    modal/ and the rest use it, never the reverse). Only from_pretrained / save_pretrained import the project's
    checkpoint reader and writer, when called (as nanoGPT's from_pretrained imports transformers)."""
    import sys
    ok = {"torch"} | set(sys.stdlib_module_names)
    path = ROOT / "hyena.py"
    top = [f"hyena.py:{line} imports {m}" for m, line in imports(path, True) if m.split(".")[0] not in ok]
    assert not top, top
    lazy = {}
    for f in ast.walk(ast.parse(path.read_text())):
        if isinstance(f, ast.FunctionDef):
            found = {n.module for n in ast.walk(f) if isinstance(n, ast.ImportFrom)} | \
                {a.name for n in ast.walk(f) if isinstance(n, ast.Import) for a in n.names}
            lazy.update({f.name: found - ok} if found - ok else {})
    assert lazy == {"from_pretrained": {"pretrained.config", "hub", "pretrained.weights"},
                    "save_pretrained": {"pretrained.config", "cli", "pretrained.safetensors"}}, lazy


def cycles_of(graph):
    """The import cycles of {module: {modules it imports}}, each as the path that closes it (depth-first)."""
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_circles():
    """Imports flow one way: the modules the project's files import at their top form no cycle (hyena.py imports
    none; fast/ and modal/ import hyena; the scripts import them all). Imports inside a function are exempt."""
    def module_file(name):
        for f in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
            if f.is_file():
                return f
    files = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
             for p in ROOT.glob("**/*.py") if not {"tests", "data", "runs"} & set(p.relative_to(ROOT).parts)
             and not p.name.startswith("test_") and p.name != "conftest.py"}
    graph = {name: {m for m, _ in imports(path, True) if module_file(m) and m != name} for name, path in files.items()}
    assert not cycles_of(graph), cycles_of(graph)


FAST_HELPERS = {  # fast/'s public names that are not a fast path themselves, but parts of one
    "install", "wanted", "channels_first", "rfft", "chunk_fn", "default_chunk", "available", "decode_step", "serves", "Tiles"}


def test_every_fast_path_names_its_plain_twin_and_the_test_holding_them_equal():
    """Each public function or class in fast/ (helpers aside) says "Plain twin(s): name" (resolved here) and names
    the test(s) holding the two equal as path::test (found here)."""
    import importlib
    import importlib.util

    def is_module(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent is a module, not a package
            return False
    found = []
    for path in sorted((ROOT / "fast").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_") \
                    or node.name in FAST_HELPERS:
                continue
            doc, where = " ".join((ast.get_docstring(node) or "").split()), f"{path.name}:{node.name}"
            twins = re.search(r"Plain twins?: ([\w.]+(?: \([^)]*\))?(?:, [\w.]+(?: \([^)]*\))?)*)", doc)
            tests = re.findall(r"((?:tests/)?test_\w+\.py)::(test_\w+)", doc)
            if not twins or not tests:
                found.append(f"{where}: no 'Plain twin: ...' or no path::test")
                continue
            for name in re.findall(r"(?:^|, )([\w.]+)", re.sub(r" \([^)]*\)", "", twins.group(1))):
                module, attrs = name, []
                while "." in module and not is_module(module):  # the longest prefix that is one (modal.fit)
                    module, attr = module.rsplit(".", 1)
                    attrs.insert(0, attr)
                obj = importlib.import_module(module)
                for a in attrs:
                    obj = getattr(obj, a, None)
                found += [f"{where}: twin {name} does not exist"] if obj is None else []
            for file, test in tests:
                if not re.search(rf"^def {test}\(", (ROOT / file).read_text(), re.M):
                    found.append(f"{where}: {file}::{test} does not exist")
    assert not found, found


def project_modules():
    """{dotted name: path} of every module of the project (tests, data and runs aside); a package by its name."""
    found = {}
    for p in ROOT.glob("**/*.py"):
        rel = p.relative_to(ROOT)
        if {"tests", "data", "runs"} & set(rel.parts) or rel.name.startswith("test_") or rel.name == "conftest.py" \
                or any(part.startswith(".") for part in rel.parts):  # hidden folders (.carry/, .ci/) are no modules
            continue
        found[str(rel.with_suffix("")).replace("/", ".").removesuffix(".__init__")] = p
    return found


def project_imports(path, top_level_only=False):
    """The project modules (their top-level names: "training", "hyena") that path imports, with the line."""
    ours = {name.split(".")[0] for name in project_modules()}
    return {(m.split(".")[0], line) for m, line in imports(path, top_level_only) if m.split(".")[0] in ours}


def test_every_module_has_a_place_in_the_layout():
    """A new root module or folder says where it stands (SCRIPTS, CORE, PLUMBING or EXTRAS above), so the rules
    below see it."""
    places = SCRIPTS | CORE | PLUMBING | EXTRAS
    loose = sorted({name.split(".")[0] for name in project_modules()} - places)
    assert not loose, loose


def test_the_core_and_its_plumbing_import_no_extra_and_no_script():
    """hyena.py, train.py and data.py, and the support modules they use, import (at the top or inside a function)
    only one another: never fast/, modal/ or another extra, never a script. Speed and Laughing Hyena are put in
    from outside by the scripts."""
    found = []
    for name, path in sorted(project_modules().items()):
        if name.split(".")[0] in CORE | PLUMBING:
            found += [f"{path.relative_to(ROOT)}:{line} imports {m}" for m, line in sorted(project_imports(path))
                      if m not in CORE | PLUMBING]
    assert not found, found


def test_no_drawer_folder():
    """No lib/, utils/, misc/, helpers/ or common/: each folder's name says what it holds."""
    found = [name for name in ("lib", "utils", "util", "misc", "helpers", "common")
             if list((ROOT / name).glob("**/*.py"))]
    assert not found, found


def test_results_hold_artifacts_only():
    """results/ holds what runs produced (logs, JSON, tables, plots); the plans and scripts that produced them live
    beside the experiment code (experiment/plans/)."""
    found = sorted(str(p.relative_to(ROOT)) for ext in ("py", "sh", "ipynb")
                   for p in (ROOT / "results").glob(f"**/*.{ext}"))
    assert not found, found


def test_no_import_circles_with_lazy_imports_too():
    """Imports inside functions make no circle either, module by module nor folder by folder, but for the one the
    model's loaders make on purpose: GPTNeoX.from_pretrained / save_pretrained import pretrained/ (which imports
    hyena) when called, as nanoGPT's from_pretrained imports transformers."""
    modules = project_modules()

    def target(m):  # the project module an import names: the longest dotted prefix that is one
        parts = m.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                return ".".join(parts[:k])

    graph = {name: {target(m) for m, _ in imports(path, False) if target(m) and target(m) != name}
             for name, path in modules.items() if name != "hyena"}  # hyena's imports: test_the_model_imports_only...
    folders = {}
    for name, deps in graph.items():
        top = name.split(".")[0]
        folders.setdefault(top, set()).update(d.split(".")[0] for d in deps if d.split(".")[0] != top)
    for g in (graph, folders):
        assert not cycles_of(g), cycles_of(g)


READING_PATH = {"modules": 8, "lines": 2200}  # what `import distill` may load of the project (issue 26)


def test_import_distill_loads_a_short_reading_path():
    """On a CPU machine `import distill` loads at most 8 project modules and 2,200 of their lines (the method, the
    loop, the model, the batches and the loop's plumbing): the hub client, the tokenizer, fast/, modal/ and HF's
    formats load inside the functions that need them. A namespace package counts as a module of 0 lines."""
    import json
    import os
    import subprocess
    import sys
    code = """if True:
        import json, os, sys
        root, before = os.path.realpath(os.getcwd()), set(sys.modules)
        import distill
        found = {}
        for name, m in sorted(sys.modules.items()):
            where = getattr(m, "__file__", None) or next(iter(getattr(m, "__path__", None) or []), None)
            if name in before or not where or not os.path.isabs(where):  # torch.ops names a bare "_ops.py"
                continue
            if not os.path.realpath(where).startswith(root + os.sep):
                continue
            found[name] = len(open(where).read().splitlines()) if os.path.isfile(where) else 0
        print(json.dumps(found))"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert "distill" in found and {"hyena", "train", "data"} <= set(found), found
    assert not {m.split(".")[0] for m in found} & EXTRAS, found  # no speed, no Laughing Hyena, no evaluation
    assert len(found) <= READING_PATH["modules"], found
    assert sum(found.values()) <= READING_PATH["lines"], (sum(found.values()), found)
