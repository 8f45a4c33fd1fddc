"""bench.py's serve section (issue 30): cached decoding as a server sees it, the teacher (KV cache) against a modal
student (every filter MODAL_STATE modes: a recurrence, O(1) per token at any context), both with fast.install's
twins, each step replayed from a CUDA graph.

  generate  at a short context (serve_short), B in serve_generate_batch: the raw step (tokens -> logits) and
            generate()'s tokens/s per new token (its step, the draw, the sequence it keeps), from two generate calls
            of different lengths (their difference: no prefill, no graph capture; each the median of
            GENERATE_RUNS), and the share of the raw step's tokens/s generate keeps. generate sizes its cache to
            its call, so the teacher's longer call attends over 6 decode_steps more positions a step: its share
            is slightly understated
  serve     at serve_ctx context, raw-step tokens/s against the batch, each model up to its memory limit (its first OOM
            ends its sweep; the rows past it are not tried): cache GB, tokens/s per GB of cache; the modal
            student's weight-bandwidth floor (its bf16 weights read once a step at the GPU's HBM bandwidth: the
            most a step could do at that batch, its states and activations aside) and the share reached
Both hold their weights in bf16, as a server does (serving_model).

A step's work does not depend on what the cache holds: the teacher's step attends over the positions up to `pos`
(fast.attention; the plain step, over its whole preallocated cache), a modal step reads only its states. So the
serving rows prefill a short prompt into a cache of serve_ctx + steps positions and move the position to
serve_ctx: the same work as after a real serve_ctx prefill, without its cost (a B = 4096 prefill of 64k tokens
would take minutes). A mixin of
bench.Bench: it uses the bench's device, sizes, model builder, timers and `case` recorder."""
import statistics
import time
from dataclasses import replace

import torch
import torch.nn as nn

from bench.bench_report import get, modal_cfg
from hyena import new_cache

HBM_TBS = {"H100": 3.35, "H200": 4.8}  # HBM bandwidth, TB/s, by device name (SXM parts)
PROMPT = 16  # the serving rows' prefill
# generate's calls timed at each length (their median): with 3 calls of 64 and 256 tokens a share scattered by up
# to 0.09 from run to run (results/gpu-logs-2026-12-07h/generate-ab.md)
GENERATE_RUNS = 7


class ServeCases:
    def serving_model(self, name, ctx):
        """The modal student or the teacher, its Linear, Embedding and LayerNorm weights in bf16 as a server holds
        them (the other sections keep fp32 weights under bf16 autocast, which casts every weight again at every
        step); the filters' poles and residues and RoPE's frequencies stay fp32 (in bf16 they drift)."""
        cfg = replace(self.cfg, max_position_embeddings=ctx)
        m = self.build(modal_cfg(cfg) if name == "modal" else cfg)
        for module in m.modules():
            if self.cuda and isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                module.to(torch.bfloat16)
        return m

    def serve(self):
        for name in ("modal", "teacher"):  # each phase builds its own model, freed when it returns
            self.serve_generate(name)
            self.serve_sweep(name)

    def serve_generate(self, name):
        s = self.s
        gen = 8 * s.decode_steps  # generate's longer call: the per-token rate is the difference of two calls
        m = self.serving_model(name, s.serve_short + gen + s.decode_steps + 2)
        for B in s.serve_generate_batch:
            for run in ("step", "generate"):
                self.case("serve", dict(model=name, run=run, ctx=s.serve_short, B=B),
                          lambda: self.generate_case(m, name, B, run, gen))

    def serve_sweep(self, name):
        s = self.s
        m = self.serving_model(name, s.serve_ctx + s.decode_steps + 2)
        for B in s.serve_batch[name]:
            row = dict(model=name, run="serve", ctx=s.serve_ctx, B=B)
            self.case("serve", row, lambda: self.serve_case(m, name, B))
            if row.get("error") == "OOM":
                break  # its memory limit: larger batches are not tried

    @torch.no_grad()
    def generate_case(self, m, name, B, run, gen):
        s, prompt = self.s, self.tokens(B, self.s.serve_short)
        if run == "step":  # the raw step after a prefill to the same context
            cache = new_cache(m, s.serve_short + s.decode_steps + 2)
            with self.autocast():
                m(prompt, cache=cache)
            return self.timed_steps(m, cache, B, s.serve_short, self.cuda)
        times = {}
        with self.autocast():
            m.generate(prompt, 2, temperature=1.0)  # warm-up
            for n in (gen // 4, gen):
                runs = []
                for _ in range(GENERATE_RUNS):
                    self.sync()
                    t0 = time.perf_counter()
                    m.generate(prompt, n, temperature=1.0)
                    self.sync()
                    runs.append(time.perf_counter() - t0)
                times[n] = statistics.median(runs)
        tok_s = B * (gen - gen // 4) / (times[gen] - times[gen // 4])
        step = get(self.res, "serve", "tok_s", dict(model=name, run="step", ctx=s.serve_short, B=B))
        return {"tok_s": tok_s, "ms_per_step": 1e3 * B / tok_s, "share_of_step": tok_s / step if step else None,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None}

    @torch.no_grad()
    def serve_case(self, m, name, B):
        s = self.s
        cache = new_cache(m, s.serve_ctx + s.decode_steps + 2)
        with self.autocast():
            m(self.tokens(B, PROMPT), cache=cache)  # the states, allocated for the whole context
        res = self.timed_steps(m, cache, B, s.serve_ctx, self.cuda)
        gb = cache.nbytes() / 1e9
        res.update(cache_gb=gb, tok_s_per_cache_gb=res["tok_s"] / gb)
        bw = next((v for gpu, v in HBM_TBS.items() if gpu in self.res["env"]["device"]), None)
        if bw and name == "modal":  # the weights' bytes, read once a step; the embedding: B rows, not the table
            weights = sum(p.nbytes for p in m.parameters()) - m.gpt_neox.embed_in.weight.nbytes
            floor_tok_s = B / (weights / (bw * 1e12))
            res.update(floor_tok_s=floor_tok_s, floor_share=res["tok_s"] / floor_tok_s)
        return res
