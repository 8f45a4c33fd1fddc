"""experiment/runner.py and the driver's steps: which step resumes, and Ctrl-C waiting for the running step."""
import os
import subprocess
import sys
from pathlib import Path

from experiment.runner import todo


STUB_STEP = """import signal, sys, time
def stop(signum, frame):
    time.sleep(1)  # the step finishes its current step, then checkpoints
    print("step: checkpoint saved", flush=True)
    open(sys.argv[1], "w").write("ckpt")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("step: training", flush=True)
time.sleep(60)
"""
STUB_DRIVER = """import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from experiment import experiment, runner
import cli
def drive(argv):
    runner.finish(runner.run([sys.executable, "-c", sys.argv[2], sys.argv[3]], Path(sys.argv[4])))
experiment.drive = drive
cli.run(experiment.main, [])
"""


def test_ctrl_c_waits_for_the_running_step_to_checkpoint(tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C, `timeout -s INT`): the driver outlives its step,
    relaying its last words, while the step stops with a checkpoint; then exit 130 and no traceback. (A driver that
    died at once closed the step's output pipe, and the step died printing, its checkpoint unwritten.)"""
    import signal
    import time
    root, console, ckpt = Path(__file__).resolve().parent.parent, tmp_path / "console.txt", tmp_path / "ckpt"
    with open(console, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", STUB_DRIVER, str(root), STUB_STEP, str(ckpt),
                                 str(tmp_path / "step.log")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while "[step] step: training" not in console.read_text() and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    text = console.read_text()
    assert "Ctrl-C: waiting for the running steps" in text and "[step] step: checkpoint saved" in text, text
    assert "the same command resumes every step" in text and "Traceback" not in text, text
    assert ckpt.read_text() == "ckpt"



def test_a_step_resumes_only_from_a_whole_checkpoint(tmp_path):
    """--resume when ckpt/ or ckpt.old/ holds a train state (stages' subfolders too); a torn ckpt.tmp/ alone, left
    by a kill during a save, starts the step afresh (finetune.py --resume would refuse it); a finished step is
    skipped."""
    run = tmp_path / "scratch"
    cmd = ["finetune.py", "--out-dir", str(run)]
    (run / "ckpt.tmp").mkdir(parents=True)
    (run / "ckpt.tmp" / "train_state.pt").write_bytes(b"torn")
    assert todo(cmd, run / "final") == [cmd]
    for whole in ("ckpt", "ckpt.old", "stage-01/ckpt"):
        (run / whole).mkdir(parents=True, exist_ok=True)
        (run / whole / "train_state.pt").write_bytes(b"")
        assert todo(cmd, run / "final") == [cmd + ["--resume"]], whole
        (run / whole / "train_state.pt").unlink()
    (run / "final").mkdir()
    assert todo(cmd, run / "final") == []
