"""Rewrites <runs>/sweep/points.json of this session's cut sweep with today's driver, so that its page lists the
31m points: the GPU run wrote points.json only after a size was scored, and the device time ended before 31m's
eval step. Nothing runs: the driver's runner is stubbed; finished teachers are skipped as the driver skips them.
usage (in the folder holding runs/exp as it came back from the GPU): python REPO/experiment/plans/replan-2026-12-05.py REPO"""
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from experiment import runner, scaling  # noqa: E402
from experiment.scaling_report import write_scaling  # noqa: E402

runner.run_parallel = lambda jobs, gpus, logs: None
args = Namespace(sweep="70m,14m,31m", sweep_minutes="0.5,1", sweep_recipes="best,scratch", sweep_align_minutes=0.25,
                 sweep_seeds="", seed=1337, sweep_repeat=None, sweep_teacher_tokens=None, teacher_tokens=100e6,
                 block_size=2048, gpus=1, sweep_eval_tokens=1_000_000)
common = ["--data", "gutenberg", "--data-root", "data", "--block-size", 2048, "--batch-size", 16, "--seed", 1337,
          "--eval-interval", 100, "--eval-batches", 8, "--log-interval", 10, "--compile", "auto"]
scaling.sweep_steps(args, Path("runs/exp"), "data", "gutenberg", "data/shared/tokenizer/20B_tokenizer.json",
                    Path("runs/exp/logs"), common, [sys.executable], 50277)
write_scaling(Path("runs/exp"), "results")
