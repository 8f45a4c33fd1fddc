"""generate()'s tokens/s against the raw step's (bench.py's serve section's generate rows, ServeCases.serve_generate,
--quick sizes), the modal student and the teacher at B = 1 and 64: after fast.draw split over the vocabulary.
usage: PYTHONPATH=. python THIS OUT   (OUT/generate.json: the rows, to merge into results/bench's serve section;
without CUDA it runs the smoke sizes on the CPU, a dry run)"""
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.bench import H200, SMOKE, Bench
from bench.bench_report import MODES
from cli import write_atomic

out = Path(sys.argv[1]) / "generate"
cuda = torch.cuda.is_available()
sizes = replace(H200, warmup=2, repeats=3) if cuda else SMOKE
torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(0)
env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
       "sizes": asdict(sizes), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
bench = Bench(sizes, torch.device("cuda" if cuda else "cpu"), MODES["on" if cuda else "off"], out, env)
for name in ("modal", "teacher"):
    bench.serve_generate(name)
write_atomic(out / "generate.json", json.dumps({"env": env, "serve": bench.res["serve"]}, indent=1))
print(env["device"])
for r in bench.res["serve"]:
    print(r["model"], r["run"], r["B"], f"{r.get('tok_s', 0):,.0f} tok/s", r.get("share_of_step", ""))
