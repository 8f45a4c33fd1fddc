"""Run a script of fast/'s Triton kernels on the CPU, in Triton's interpreter (TRITON_INTERPRET=1), in a
fresh process (the interpreter is chosen when triton is imported). requirements-dev.txt installs Triton (the
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


def run_interpreted(code, timeout=300):
    """stdout of `code` run in Triton's interpreter (after PRELUDE), from the repository root; fails on an error."""
    pytest.importorskip("triton", reason="Triton is not installed: pip install -r requirements-dev.txt (CUDA "
                                         "builds of torch bring it)")
    run = subprocess.run([sys.executable, "-c", PRELUDE + code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


SEPARATOR = "=" * 8 + " next script " + "=" * 8
FAILED = "=" * 8 + " script failed " + "=" * 8
SCRIPTS = {}  # name -> script, registered by the test modules at import
OUTPUTS = {}  # name -> its stdout, once run


def register(name, code):
    """Add a script to the session's interpreter run. Test modules register theirs when imported, which is before
    any test runs, so the first `output` runs them all in one process (one start of torch and Triton: seconds)."""
    SCRIPTS[name] = code


def output(name):
    """The stdout of the registered script `name`. The first call runs every registered script not yet run, one
    after another in ONE interpreter process, each in its own namespace; a script that raises fails only the tests
    that read it. A later script sees what an earlier one left patched, so each restores what it patches."""
    if name not in OUTPUTS:
        todo = [n for n in SCRIPTS if n not in OUTPUTS]
        wrapped = [f"import sys, traceback\ntry:\n    exec(compile({SCRIPTS[n]!r}, {n!r}, 'exec'), {{'__name__': {n!r}}})\n"
                   f"except BaseException:\n    print({FAILED!r})\n    traceback.print_exc(file=sys.stdout)\n"
                   for n in todo]
        OUTPUTS.update(zip(todo, run_interpreted(f"\nprint({SEPARATOR!r})\n".join(wrapped), timeout=600)
                           .split(SEPARATOR)))
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
