"""What every script shares: the one error path (`if __name__ == "__main__": cli.run(main)`), flag helpers, the
one way to write a file that must survive a crash (`write_atomic`), one writer per output folder (`out_dir_lock`),
a full disk said so (`disk_full`), and the one progress line (`Progress`).

Expected failures (bad flags, values, files, checkpoints, data, network) exit with status 2 and one line,
`script.py: error: <what is wrong and how to fix it>`; a traceback only with --debug or HYENA_DEBUG=1. Anything
else is a bug and keeps its traceback. Ctrl-C exits 130 and SIGTERM 143, 128 + the signal's number (train.py
handles both: it saves a checkpoint first and says how to resume).
"""
import errno
import fcntl
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def expected():
    """What a user can cause and fix. RuntimeError is not here: from torch it is most often a bug (the loaders
    turn corrupt files into ValueErrors that name them). torch and hub only count when the script imported them
    (this module imports neither, so that every module, hub.py included, can use its helpers)."""
    torch, hub = sys.modules.get("torch"), sys.modules.get("hub")
    return ((ValueError, OSError, FloatingPointError) + ((hub.HubError,) if hub else ())
            + ((torch.OutOfMemoryError,) if torch else ()))


def debug():
    return os.environ.get("HYENA_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run(main, argv=None):
    """Call main(argv) (argv None: sys.argv[1:]) and exit: 0 on success, 2 with one message on an expected
    failure, 130 on Ctrl-C (a train.py run stopped by a signal: 128 + its number). `--debug` anywhere in argv is
    taken out and re-raises instead (full traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = Path(main.__globals__["__file__"]).name  # the script's own name, also when called in-process
    show = debug() or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except KeyboardInterrupt as e:
        if show:
            raise
        print(f"{prog}: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(getattr(e, "status", 130))  # training/runtime.Stopped: 143 for SIGTERM
    except SystemExit as e:  # argparse (already exit 2) or a script's own `sys.exit("...: error: ...")`
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except expected() as e:
        if show:
            raise
        message = str(e) or type(e).__name__
        if type(e).__name__ == "OutOfMemoryError":
            message = f"out of memory ({message.splitlines()[0]}); lower --batch-size (or --block-size)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


def writable_dir(path, flag):
    """Create folder `path` if needed and check a file can be written there, before any work; names `flag`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another {flag}") from None
    return path


def integer(text):
    """An int flag that may also be written 50e6 or 50_000_000."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def write_atomic(path, content):
    """Write `content` to path so that a crash or a concurrent reader never sees half a file: into a pid-named temp
    file beside it, moved into place (os.replace) only when complete, removed if the write fails. content: str
    (written as UTF-8), bytes, or a function f -> None that writes to the open binary file (streamed output,
    e.g. tensors one at a time)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(e, folder, needed):
    """"the disk is full (N MB needed, M MB free)" when e, raised writing about `needed` bytes into folder, says
    so, else None. torch.save reports a full disk as a RuntimeError ("unexpected pos"), not ENOSPC: that one counts
    as full when the free space is short of what was needed."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, RuntimeError) and free < needed
    return f"the disk is full ({needed / 1e6:,.1f} MB needed, {free / 1e6:,.1f} MB free)" if full else None


@contextmanager
def out_dir_lock(out, master=True, what=None, fix="choose another --out-dir"):
    """Hold OUT/.lock (flock, with the holder's pid in it) while a run writes OUT: a second run on the same folder
    is refused at once instead of interleaving log.jsonl and swapping checkpoints under the first. The kernel
    drops a flock when its process dies, so a lock left by a killed run is stale: taken over, with a note.
    what / fix: how errors name the folder (default "--out-dir OUT") and what to do instead (prepare.py's
    dataset folders are locked the same way)."""
    if not master:  # under DDP rank 0 holds the lock for all ranks
        yield
        return
    out = Path(out)
    what = what or f"--out-dir {out}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise OSError(f"{what}: cannot write there ({e.strerror or e}); {fix}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FileExistsError(f"{what} is in use by another run (pid {f.read().strip() or '?'}, lock "
                                  f"file {out / '.lock'}): wait for it to end, or {fix}") from None
        f.seek(0)
        holder = f.read().strip()  # a pid left here: its run ended without releasing the lock (killed)
        if holder and holder != str(os.getpid()):
            print(f"{out / '.lock'}: taking over the stale lock of pid {holder} (that run is gone)", file=sys.stderr)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # released cleanly: no stale note for the next run


class Progress:
    """One progress line on stderr for work of `total` units (None: unknown), `done` of them already behind it:
    redrawn in place on a terminal (at most every 0.2 s), a new line every 30 s in a log; never when quiet.
    update(done, line) draws line(rate, eta) when due (always with final=True): rate is the units per second
    done since this Progress began, eta ", ETA 12 s" (or "" when unknown) for the rest of total."""

    def __init__(self, total=None, done=0, quiet=False):
        self.total, self.start, self.quiet, self.tty = total, done, quiet, sys.stderr.isatty()
        self.t0 = self.shown = time.monotonic()

    def update(self, done, line, final=False):
        now = time.monotonic()
        if self.quiet or not final and now - self.shown < (0.2 if self.tty else 30):
            return
        self.shown, rate = now, (done - self.start) / max(now - self.t0, 1e-9)
        eta = f", ETA {(self.total - done) / rate:.0f} s" if self.total and rate and not final else ""
        print(line(rate, eta), end="\n" if final or not self.tty else "\r", file=sys.stderr, flush=True)
