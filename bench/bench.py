"""Speed and memory, side by side in one run: Hyena vs attention, our GPT-NeoX vs transformers, distillation.

    python bench/bench.py [--quick] [--out results/bench] [--only check,conv,mixer,model,train,decode,kd,serve]
                          [--compile on|off|both] [--conv-tiles]
    python bench/bench.py --cpu-smoke --out /tmp/benchsmoke   # every code path at tiny sizes on the CPU, ~1 minute

Sections (one GPU, bf16 autocast; B*L constant across L within a section):
  check   each fast path against its reference on this device, as relative errors (bench_check.py)
  conv    the long convolution alone, FFTConv vs the block-Toeplitz kernels (fast/toeplitz.py), L <= 8192: forward
          and forward+backward, useful TFLOP/s and their share of the GPU's bf16 peak; --conv-tiles first times
          each product at every fast.toeplitz.TILE_SWEEP configuration and runs this section and the later
          ones with the fastest (bench_conv.py)
  mixer   HyenaOperator (order 2) vs causal SDPA `Attention`: forward (no_grad) and forward+backward; compiled,
          also "hyena-fftconv", the operator with FFTConv where fast.install gives the Toeplitz kernels
  model   full-model forward (no_grad): all-Hyena student (make_student, l_max=L) vs the teacher
  train   one optimizer step (forward, backward, clip, fused AdamW) at L=2048: our GPT-NeoX vs
          transformers.GPTNeoXForCausalLM; distill.Distill "e2e" (trains all; teacher forward included) and
          "joint" (trains the mixers: distill.py's defaults); fine-tuning (student CE); then one batch-1
          student training step at L=64k (eager), whose peak memory is a target
  decode  tokens/s of N single-token cached steps after a prefill to the context, student vs teacher vs a modal
          student (every filter MODAL_STATE modes, random poles: recurrent decoding), each launched eagerly and
          replayed from a CUDA graph (step.graphed_step, what generate uses on a GPU); also the prefill's
          time and the cache's bytes per sequence
  kd      distill.kd_loss forward+backward alone on the train batch's tokens, and its share of an e2e step
  serve   the teacher against a modal student as a server sees them: generate() against the raw step, and
          tokens/s against the batch at 64k context up to each one's memory limit (bench_serve.py)
Timing: warm-up calls first (compilation happens there: `warmup_s`), then CUDA events around each call, no sync
in between; `ms` is the median, `spread` (max-min)/median. `peak_gb`: max_memory_allocated since the case began,
models included. Each case records its own OOM/error and the run goes on; bench.json and bench.md are rewritten
after every case, bench.png after every section; with --only, the other sections' rows of the last run at the
same sizes in --out are kept (env.kept says from when). The targets table (each goal against its measurement) is
printed last; bench_report.py holds the targets, tables and plot, bench_train.py the train and kd sections,
bench_conv.py the conv section.
"""
import argparse
import gc
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench.py`: import from the repo root
from bench.bench_check import Checks
from bench.bench_conv import CONV_MAX_L, ConvCases
from bench.bench_report import MODES, SECTIONS, fmt, keep_previous, modal_cfg, table, targets, write
from bench.bench_serve import ServeCases
from bench.bench_train import TrainCases
import fast
from fast.step import decode_step
from fast.fftconv import fftconv
from hyena import Attention, Config, HyenaOperator, make_student, new_cache
from modal.student import build


@dataclass
class Sizes:
    model: dict          # Config overrides; {} is the pythia-70m shape
    ls: list             # lengths of the mixer and model sections; the last is forward-only in the mixer section
    mixer_tokens: int    # B * L of the mixer section
    model_tokens: int    # B * L of the model section
    train_batch: int     # the train and kd sections run on train_batch x train_len tokens
    train_len: int
    long_len: int        # the batch-1 student training step whose peak memory is a target
    decode_ctx: list
    decode_batch: list
    decode_steps: int
    warmup: int
    repeats: int
    serve_ctx: int               # the serve section's context
    serve_batch: dict            # its batches per model ("modal", "teacher"), each swept up to its first OOM
    serve_short: int             # the context of its generate rows
    serve_generate_batch: list   # their batches


H200 = Sizes({}, [2048 << i for i in range(7)], 131072, 65536, 16, 2048, 65536, [2048, 16384, 65536, 131072], [1, 16], 64,
             3, 10, 65536, dict(modal=[1, 16, 64, 256, 1024, 4096, 16384], teacher=[1, 16, 64, 128, 256]), 2048, [1, 64])
SMOKE = Sizes(dict(hidden_size=32, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=256),
              [16 << i for i in range(7)], 512, 256, 2, 32, 512, [16, 64, 256], [1, 2], 4, 1, 2, 256,
              dict(modal=[1, 4], teacher=[1, 4]), 16, [1, 2])




class Bench(Checks, TrainCases, ConvCases, ServeCases):
    def __init__(self, sizes, dev, modes, out, env, conv_tiles=False):
        self.s, self.dev, self.modes, self.out, self.cuda = sizes, dev, modes, out, dev.type == "cuda"
        self.conv_tiles = conv_tiles  # the conv section sweeps fast.toeplitz.TILE_SWEEP first
        self.cfg = Config(**sizes.model)
        self.res = {"env": env, "errors": {}, **{name: [] for name in SECTIONS}}

    # ------------------------------------------------------------------------- measuring

    def autocast(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.cuda)

    def tokens(self, B, L):
        return torch.randint(self.cfg.vocab_size, (B, L), device=self.dev)  # random ids: never time on zeros

    def build(self, cfg):
        """A model of cfg (modal filters too), with fast/'s twins on CUDA (what the scripts' --fast auto gives)."""
        with self.dev:  # initialised on the device: no CPU init and copy
            return fast.install(build(cfg), self.cuda)

    def student(self, teacher, l_max=None):
        with self.dev:
            return fast.install(make_student(teacher, l_max=l_max), self.cuda)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        """A timestamp; a CUDA event lies on the GPU's timeline, so call i+1's launches may overlap call i."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def timed(self, step, tokens):
        """Median ms of step() after the warm-up calls, tokens/s, and the peak memory."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(self.s.warmup):
            step()
        self.sync()
        warmup_s, marks = time.perf_counter() - t0, []
        for _ in range(self.s.repeats):
            start = self.mark()
            step()
            marks.append((start, self.mark()))
        self.sync()
        times = [a.elapsed_time(b) if self.cuda else 1e3 * (b - a) for a, b in marks]
        ms = statistics.median(times)
        return {"ms": ms, "spread": (max(times) - min(times)) / ms, "tok_s": 1e3 * tokens / ms,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None, "warmup_s": warmup_s}

    def case(self, section, row, fn):
        """Run one measurement into `row`; an OOM or any error is recorded there and the run goes on."""
        try:
            row.update(fn())
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # noqa: BLE001 (one broken case must not cost the others)
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        if self.cuda or "error" in row:  # a failed case's tensors die with its traceback: free them before the
            gc.collect()                  # next case (on the CPU nothing else is measured that they would skew)
        if self.cuda:
            torch.cuda.empty_cache()
        self.res[section].append(row)
        print(f"{section}: " + ", ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
        write(self.out, self.res, asdict(self.s), self.modes)

    # ------------------------------------------------------------------------- sections

    def mixer(self):
        ls = self.s.ls
        for L in ls:
            B = max(1, self.s.mixer_tokens // L)
            for op in ("hyena", "hyena-fftconv", "sdpa"):
                for backward in (False, True) if L != ls[-1] else (False,):
                    # eager everywhere; compiled too (fused elementwise work) at the target lengths, fwd+bwd;
                    # hyena-fftconv (the FFT path where fast.install would give the Toeplitz kernels) only there
                    for compiled in {False, backward and L in (ls[0], ls[2], ls[5]) and max(self.modes)}:
                        if op == "hyena-fftconv" and (not compiled or L > CONV_MAX_L):
                            continue
                        self.case("mixer", dict(op=op, run="fwd+bwd" if backward else "fwd", L=L, B=B,
                                                compiled=compiled),
                                  lambda: self.mixer_case(op, B, L, backward, compiled))

    def mixer_case(self, op, B, L, backward, compiled):
        D = self.cfg.hidden_size
        m = fast.install(Attention(self.cfg) if op == "sdpa" else HyenaOperator(D, L, order=2), self.cuda).to(self.dev)
        if op == "hyena-fftconv":
            m.long_conv = fftconv
        m = torch.compile(m) if compiled else m
        x = torch.randn(B, L, D, device=self.dev, requires_grad=backward)  # (B, L, D)
        g = torch.randn(B, L, D, device=self.dev, dtype=torch.bfloat16 if self.cuda else None)  # dLoss/dy

        def step():
            with self.autocast(), torch.set_grad_enabled(backward):
                y = m(x)  # (B, L, D)
            if backward:
                y.backward(g)
        return self.timed(step, B * L)

    def model(self):
        for L in self.s.ls:
            B, teacher = max(1, self.s.model_tokens // L), self.build(replace(self.cfg, max_position_embeddings=L))
            idx = self.tokens(B, L)
            for name, m in (("student", self.student(teacher, l_max=L)), ("teacher", teacher)):
                for compiled in {False, L == self.s.ls[4] and max(self.modes)}:
                    f = torch.compile(m) if compiled else m
                    self.case("model", dict(model=name, L=L, B=B, compiled=compiled),
                              lambda: self.timed(lambda: self.forward(f, idx), B * L))

    def forward(self, m, idx):
        with torch.no_grad(), self.autocast():
            m(idx)  # logits (B, L, V)

    def decode(self):
        s = self.s
        modal = self.build(modal_cfg(self.cfg))
        for ctx in s.decode_ctx:
            teacher = self.build(replace(self.cfg, max_position_embeddings=ctx + s.decode_steps))
            models = (("student", self.student(teacher, l_max=ctx + s.decode_steps)), ("teacher", teacher),
                      ("modal", modal))
            for B in s.decode_batch:
                for graph in (False, True) if self.cuda else (False,):
                    for name, m in models:
                        self.case("decode", dict(model=name, ctx=ctx, B=B, graph=graph),
                                  lambda: self.decode_case(m, ctx, B, graph))

    @torch.no_grad()
    def decode_case(self, m, ctx, B, graph):
        steps, prompt, times = self.s.decode_steps, self.tokens(B, ctx), []
        for _ in range(3):  # the mean of two prefills after a warm-up (which pays FFT plans and allocations)
            cache = new_cache(m, ctx + steps)
            self.sync()
            t0 = time.perf_counter()
            with self.autocast():  # a cached forward keeps only the last position's logits, not (B, ctx, V)
                m(prompt, cache=cache)
            self.sync()
            times.append(time.perf_counter() - t0)
        per_seq = cache.nbytes() / B  # filter copies shared by the batch counted in
        return {"prefill_s": statistics.fmean(times[1:]), "cache_bytes_per_seq": per_seq,
                **self.timed_steps(m, cache, B, ctx, graph)}

    def timed_steps(self, m, cache, B, at, graph):
        """tokens/s of decode_steps raw steps (tokens -> logits) from position `at`, replayed from a CUDA graph or
        launched eagerly; ms is per call of decode_steps steps, ms_per_step per step."""
        steps, nxt = self.s.decode_steps, self.tokens(B, self.s.decode_steps)
        cache.pos.fill_(at)
        with self.autocast():
            one = decode_step(m, cache, B, graph)

        def step():
            cache.pos.fill_(at)  # rewind the position (shared by all layers) to time the same steps again;
            # Hyena's short-conv tails (and modal states) are not restored, which changes values, not the work
            with self.autocast():
                for i in range(steps):
                    one(nxt[:, i:i + 1])  # (B, 1) -> logits (B, V)
        res = self.timed(step, B * steps)
        return {**res, "ms_per_step": res["ms"] / steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for bench.json, bench.md, bench.png (default results/bench; "
                   "--cpu-smoke: runs/bench-smoke, so a smoke test never overwrites the committed GPU results)")
    p.add_argument("--quick", action="store_true", help="2 warm-up calls and 3 timed ones per case (default 3, 10)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, eager: checks every code path")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections from {','.join(SECTIONS)}")
    p.add_argument("--compile", choices=["on", "off", "both"], default=None,
                   help="torch.compile the train and kd cases (default on; off with --cpu-smoke)")
    p.add_argument("--conv-tiles", action="store_true",
                   help="the conv section first times each Toeplitz product at every fast.toeplitz.TILE_SWEEP "
                        "configuration at L=2048 and 8192, prints the fastest, and runs with it")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/bench-smoke" if args.cpu_smoke else "results/bench")
    only = args.only.split(",")
    if not set(only) <= set(SECTIONS):
        p.error(f"--only {args.only!r}: unknown section(s) {sorted(set(only) - set(SECTIONS))}; choose from {SECTIONS}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU visible: bench.py measures one GPU; `python bench/bench.py --cpu-smoke` checks it "
                "on the CPU")
    sizes = SMOKE if args.cpu_smoke else replace(H200, warmup=2, repeats=3) if args.quick else H200
    modes = MODES[args.compile or ("off" if args.cpu_smoke else "on")]
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    env = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "args": vars(args), "sizes": asdict(sizes),
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    bench = Bench(sizes, dev, modes, Path(args.out), env, args.conv_tiles)
    keep_previous(bench.res, bench.out, only)  # --only reruns a part: the other sections' rows stay
    for name in (n for n in SECTIONS if n in only):
        t0 = time.perf_counter()
        try:
            getattr(bench, name)()
        except Exception as e:  # noqa: BLE001 (a section that cannot even start must not stop the others)
            traceback.print_exc()
            bench.res["errors"][name] = f"{type(e).__name__}: {e}"[:400]
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        write(bench.out, bench.res, env["sizes"], modes, plot=True)
    print(f"\nwrote {args.out}/bench.json, bench.md, bench.png\n\n## targets ({env['device']})\n")
    print("\n".join(table(targets(bench.res, env["sizes"], modes))))
    return bench.res


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
