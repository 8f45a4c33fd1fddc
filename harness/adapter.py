"""EleutherAI lm-evaluation-harness (lm-eval 0.4.x) adapter for every checkpoint GPTNeoX.from_pretrained loads:
teacher, Hyena student, hybrids.

    python -m harness.adapter run --model hyena --model_args pretrained=out/student,dtype=bf16 \\
        --tasks wikitext2_offline --include_path harness/tasks --batch_size 16 --device cuda
    python eval.py --ckpt out/student --tasks wikitext2_offline,lambada_openai --json out/tasks.json

lm-eval's CLI only knows the models registered in its process, and 0.4.x looks up no plugins (no entry-point
group): `python -m harness.adapter` registers this class as "hyena" and then runs lm-eval's own CLI, arguments
unchanged. In Python, hand an instance to lm_eval.simple_evaluate(model=HyenaLM(...)), as eval.py --tasks does.

What the harness asks of a model, and how it is done here (HF's adapter, lm_eval/models/huggingface.py, is the
reference):
  loglikelihood          log P(continuation | context) and whether greedy decoding gives the continuation.
                         Requests are sorted longest first, batch_size at a time right-padded with <|endoftext|>
                         (the model is causal, so padding after a row changes none of its logits), one forward a
                         batch; log-softmax in fp32, sums in fp64. Too long: truncated from the left, as HF does.
  loglikelihood_rolling  a document's total log-likelihood: lm-eval's own rolling windows (max_length tokens, no
                         overlap, the first token conditioned on <|endoftext|>, the last window given full
                         context), scored as loglikelihood requests, batched across documents.
  generate_until         cached decoding (GPTNeoX.generate, CUDA-graphed on a GPU) until a stop string (and
                         <|endoftext|>) or max_gen_toks. The model takes no padding mask, so a batch holds
                         requests whose contexts have the same number of tokens.
lm-eval is optional: only this folder (and eval.py --tasks, lazily) imports it.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import fast
from hyena import GPTNeoX
from pretrained.weights import DTYPES, checkpoint_tokenizer, resolve_ckpt
from modal.student import load_pretrained
from tokenizer import DEFAULT_TOKENIZER, load_tokenizer

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@register_model("hyena")
class HyenaLM(TemplateLM):
    """pretrained: a checkpoint folder (or train.py out_dir) or hub id, or a loaded GPTNeoX. tokenizer: a
    tokenizer.json or hub id (default: the checkpoint's tokenizer.json, else eval.py's default). dtype: one of
    eval.DTYPES (default fp32; a loaded model: its own). device: auto = cuda if available (a loaded model: its
    own). max_length: the longest window (default: the model's maximum). max_gen_toks: generate_until's default."""

    def __init__(self, pretrained, tokenizer=None, dtype=None, device=None, batch_size=8, max_length=None,
                 max_gen_toks=256, max_batch_size=None):
        super().__init__()
        if max_batch_size is not None:
            raise ValueError(f"max_batch_size={max_batch_size}: only for batch_size=auto, which this adapter does "
                             "not do; give batch_size=N")
        if str(batch_size).startswith("auto") or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: give a positive number (no automatic batch size here)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}")
        if isinstance(pretrained, GPTNeoX):
            model = pretrained
            if dtype is not None:
                model = model.to(DTYPES[dtype])
        else:
            ckpt = resolve_ckpt(str(pretrained))
            model = load_pretrained(ckpt, dtype=DTYPES[dtype or "fp32"])
            tokenizer = tokenizer or checkpoint_tokenizer(ckpt)
            device = device or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not isinstance(pretrained, GPTNeoX):  # loaded here: fast/'s twins on CUDA (eval.py's --fast auto)
            fast.install(model, fast.wanted("auto", device))
        self.model = model.to(device).eval() if device is not None else model.eval()
        self._device = next(self.model.parameters()).device
        self.tokenizer_path = str(tokenizer or DEFAULT_TOKENIZER)
        self.enc = load_tokenizer(self.tokenizer_path)
        limit = self.model.config.native_context  # None: any length (an all-modal student); default: its training's
        self._max_length = int(max_length or limit or self.model.config.max_position_embeddings)
        if not 1 <= self._max_length <= (limit or self._max_length):
            raise ValueError(f"max_length={max_length}: the model is defined for windows of 1 to {limit} tokens")
        self._batch_size, self._max_gen_toks = int(batch_size), int(max_gen_toks)

    @property
    def eot_token_id(self):
        return self.enc.eot_token

    @property
    def max_length(self):
        return self._max_length

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def tokenizer_name(self):
        return self.tokenizer_path

    def tok_encode(self, string, add_special_tokens=None):
        """HF's ids (GPT-NeoX adds no BOS): a literal <|endoftext|> in the text is the special token."""
        return self.enc.encode(string, allowed_special="all")

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False):
        """requests: (cache key or None, context ids, continuation ids) -> [(log-likelihood, is greedy)]."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        res = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            rows = []
            for i in order[start:start + self.batch_size]:
                key, context, cont = requests[i]
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens: need 1 to max_length={self.max_length}")
                rows.append((i, (context + cont)[-(self.max_length + 1):-1], cont))  # the input predicts cont
            x = torch.full((len(rows), max(len(inp) for _, inp, _ in rows)), self.eot_token_id, dtype=torch.long)
            for r, (_, inp, _) in enumerate(rows):
                x[r, :len(inp)] = torch.tensor(inp)  # right padding
            logits, _ = self.model(x.to(self.device))  # (B, L, V)
            for r, (i, inp, cont) in enumerate(rows):
                logp = F.log_softmax(logits[r, len(inp) - len(cont):len(inp)].float(), dim=-1)  # (C, V)
                target = torch.tensor(cont, device=self.device)  # (C,)
                res[i] = (logp.gather(1, target[:, None]).double().sum().item(), bool((logp.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res[i])
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for k, req in enumerate(requests):
            rolling = get_rolling_token_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1)
            for context, cont in map(make_disjoint_window, rolling):
                windows.append((None, context, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _generation_settings(self, gen_kwargs):
        """(stop strings, max new tokens, temperature, top_k) from a request's generation kwargs."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = tuple(handle_stop_sequences(kw.pop("until", None), eos=self.enc.decode([self.eot_token_id])))
        settings = until, kw.pop("max_gen_toks"), float(kw.pop("temperature", 0.0)), kw.pop("top_k", None)
        if kw.pop("do_sample", False) and settings[2] == 0:
            raise ValueError(f"generation kwargs {gen_kwargs}: do_sample with temperature 0; give a temperature")
        if kw:
            raise ValueError(f"generation kwargs {sorted(kw)} are not supported (supported: until, max_gen_toks, "
                             "do_sample, temperature, top_k)")
        if settings[1] >= self.max_length:
            raise ValueError(f"max_gen_toks={settings[1]} leaves no room for context in max_length={self.max_length}")
        return settings

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        groups = {}  # (settings, context length) -> [(request index, context ids)]
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            settings = self._generation_settings(gen_kwargs)
            ids = self.tok_encode(context)[-(self.max_length - settings[1]):] or [self.eot_token_id]
            groups.setdefault((settings, len(ids)), []).append((i, ids))
        res = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for ((until, max_new, temperature, top_k), n), items in sorted(groups.items(), key=lambda g: -g[0][1]):
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                idx = torch.tensor([ids for _, ids in batch], device=self.device)  # (B, n)

                def stopped(out):  # every row has a stop string in what it generated
                    return all(any(s in self.enc.decode(row[n:].tolist()) for s in until) for row in out)

                out = self.model.generate(idx, max_new, temperature=temperature, top_k=top_k, stop=stopped)
                for (i, _), row in zip(batch, out):
                    res[i] = postprocess_generated_text(self.enc.decode(row[n:].tolist()), list(until), None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, res[i])
                bar.update(len(batch))
        bar.close()
        return res


def task_manager(names, include_path=None):
    """A TaskManager that knows every name in `names`: harness/tasks, include_path's YAMLs, lm-eval's own tasks."""
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)  # indexing lm-eval's own tasks takes ~30 s
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task {', '.join(unknown)}; the offline tasks are "
                         f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))} (harness/tasks), and "
                         "--include-path DIR adds the YAML tasks of DIR")
    return manager


def evaluate_tasks(lm, names, manager, limit=None):
    """simple_evaluate with `lm` -> {task: {metric: value, metric_stderr: value}} (filter 'none' left out)."""
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            results[task][metric if filt == "none" else f"{metric} ({filt})"] = value if value != "N/A" else None
    return results


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()  # lm-eval's CLI, with "hyena" registered by the class above
