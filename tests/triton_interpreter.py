"""Run a script of fast/'s Triton kernels on the CPU, in Triton's interpreter (TRITON_INTERPRET=1), in a
fresh process (the interpreter is chosen when triton is imported). The registered scripts run together in one
process, started in the background once pytest has collected (`start`): about 20 s of interpreting that would
otherwise hold up the first test to read one. requirements-dev.txt installs Triton (the
version torch's CUDA build pins), so CI runs these checks; only where Triton is absent do they skip.

Triton 3.6's interpreter turns a tensor used as a loop bound (`range(start, end)` over a loaded or program-id
value: both kernels' loops) into an int by int() of a 1-element array, which NumPy >= 2.4 refuses ("only
0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171; Triton 3.7 squeezes first).
The kernels are right, compiled and interpreted alike: PRELUDE puts Triton 3.7's one-line fix into an older
interpreter, so a GPU machine whose torch brings Triton 3.6 runs these checks too.

The interpreter keeps bfloat16 values as their uint16 bit patterns and its tl.dot multiplies those patterns
(triton-lang/triton#11584: bf16 is not supported there yet). PRELUDE widens bf16 operands of tl.dot to fp32 first,
exactly (a bf16 is an fp32 with 16 zero low bits): products of bf16 values are exact in fp32 and the sums fp32,
as on tensor cores, so fast/toeplitz.py's kernel runs here as written. Casts to bf16 truncate in the interpreter
(the GPU rounds to nearest): an ulp, not half of one.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PRELUDE = """
import triton
from triton.runtime import interpreter as _interp
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):  # triton-lang/triton#9171, fixed in 3.7
    _patch_lang_tensor = _interp._patch_lang_tensor
    def _squeezed(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
    _interp._patch_lang_tensor = _squeezed
import numpy as _np
_create_dot = _interp.InterpreterBuilder.create_dot
def _dot_of_fp32(self, a, b, *rest):  # triton-lang/triton#11584
    def widen(x):
        if x.dtype.scalar != triton.language.bfloat16:
            return x
        return _interp.TensorHandle((x.data.astype(_np.uint32) << 16).view(_np.float32), triton.language.float32)
    return _create_dot(self, widen(a), widen(b), *rest)
_interp.InterpreterBuilder.create_dot = _dot_of_fp32
"""


def launch(code):
    """`code` (after PRELUDE) started in Triton's interpreter from the repository root: the process, its output
    piped."""
    return subprocess.Popen([sys.executable, "-c", PRELUDE + code], env={**os.environ, "TRITON_INTERPRET": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def finish(proc, timeout=600):
    """The stdout of a launched process once it ends; fails on an error (or kills it past `timeout` seconds)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


SEPARATOR = "=" * 8 + " next script " + "=" * 8
FAILED = "=" * 8 + " script failed " + "=" * 8
SCRIPTS = {}  # name -> script, registered by the test modules at import
MODULES = set()  # the files of the test modules that registered scripts
OUTPUTS = {}  # name -> its stdout, once run
BACKGROUND = {}  # the run start() began: {"proc": its process, "names": the scripts it runs}


def register(name, code):
    """Add a script to the session's interpreter run. Test modules register theirs when imported, which is before
    any test runs, so one run (one start of torch and Triton: seconds) takes them all."""
    SCRIPTS[name] = code
    MODULES.add(str(Path(sys._getframe(1).f_globals["__file__"]).resolve()))


def _batch(todo):
    """One program running the scripts `todo` one after another, each in its own namespace; a script that raises
    prints FAILED and its traceback, and the next one runs."""
    wrapped = [f"import sys, traceback\ntry:\n    exec(compile({SCRIPTS[n]!r}, {n!r}, 'exec'), {{'__name__': {n!r}}})\n"
               f"except BaseException:\n    print({FAILED!r})\n    traceback.print_exc(file=sys.stdout)\n"
               for n in todo]
    return f"\nprint({SEPARATOR!r})\n".join(wrapped)


def start():
    """Begin running every registered script not yet run, in the background, in one interpreter process, unless
    a run is in flight. conftest.py calls it once collection is done, so the run overlaps the tests before the
    first that reads one (the other tests keep to one thread: a second core is free). Without Triton, nothing."""
    todo = [n for n in SCRIPTS if n not in OUTPUTS]
    if todo and not BACKGROUND.get("names") and importlib.util.find_spec("triton") is not None:
        BACKGROUND.update(proc=launch(_batch(todo)), names=todo)


def stop():
    """Kill a background run no test read (conftest.py, at the session's end)."""
    if BACKGROUND and BACKGROUND["proc"].poll() is None:
        BACKGROUND["proc"].kill()
        BACKGROUND["proc"].communicate()


def output(name):
    """The stdout of the registered script `name`, from the run that has it (`start`'s, begun at collection or
    now); a script that raises fails only the tests that read it. A later script sees what an earlier one left
    patched, so each restores what it patches."""
    if name not in OUTPUTS:
        pytest.importorskip("triton", reason="Triton is not installed: pip install -r requirements-dev.txt (CUDA "
                                             "builds of torch bring it)")
        start()
        names, BACKGROUND["names"] = BACKGROUND["names"], []  # read once, even if it failed
        OUTPUTS.update(zip(names, finish(BACKGROUND["proc"]).split(SEPARATOR)))
    out = OUTPUTS[name].lstrip("\n")  # (what the separator's print left)
    if FAILED in out:
        pytest.fail(f"the interpreter script {name!r} raised:\n{out.split(FAILED)[1][-3000:]}", pytrace=False)
    return out


def output_json(name):
    """The JSON object the script `name` prints last, each entry also printed (pytest -s shows the numbers)."""
    out = json.loads(output(name).splitlines()[-1])
    for key, value in out.items():
        print(key, value)
    return out
