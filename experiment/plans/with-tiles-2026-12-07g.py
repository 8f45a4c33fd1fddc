"""Run a script (a bench, a plan) with tiles a sweep chose, put into fast/'s modules first, in this process.

    PYTHONPATH=. python experiment/plans/with-tiles-2026-12-07g.py TILES_JSON SCRIPT [ARGS...]

TILES_JSON holds any of: BACK_TILES (fast.mixer, dict), SMALL_BATCH_TILES and LARGE_BATCH_TILES (fast.step, lists
as Tiles), MIX_BLOCK_D (fast.decode); a missing file changes nothing (the code's constants serve)."""
import json
import runpy
import sys
from pathlib import Path

from fast import decode, mixer, step

path, script, *args = sys.argv[1:]
chosen = json.loads(Path(path).read_text()) if Path(path).exists() else {}
if "BACK_TILES" in chosen:
    mixer.BACK_TILES.update(chosen["BACK_TILES"])
for name in ("SMALL_BATCH_TILES", "LARGE_BATCH_TILES"):
    if name in chosen:
        setattr(step, name, step.Tiles(*chosen[name]))
if "MIX_BLOCK_D" in chosen:
    decode.MIX_BLOCK_D = chosen["MIX_BLOCK_D"]
print(f"tiles from {path}: {chosen or 'none (the constants)'}", flush=True)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
