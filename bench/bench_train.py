"""bench.py's train and kd sections: one optimizer step of each training objective as train.py takes it (ours
and transformers' GPT-NeoX, distillation end to end and aligned, fine-tuning, one long batch-1 step), and the
distillation loss alone with its share of an end-to-end step. A mixin of bench.Bench: it uses the bench's device,
sizes, model builders, timer and `case` recorder."""
from dataclasses import replace

import torch

from bench.bench_report import get


class TrainCases:
    def train(self):
        s = self.s
        x, y = self.tokens(s.train_batch, s.train_len), self.tokens(s.train_batch, s.train_len)
        for compiled in self.modes:
            for name in ("gpt-neox (ours)", "transformers", "distill e2e", "distill joint", "finetune"):
                self.case("train", dict(case=name, compiled=compiled, B=s.train_batch, L=s.train_len),
                          lambda: self.train_case(name, self.cfg, compiled, x, y))
        cfg = replace(self.cfg, max_position_embeddings=s.long_len)
        x, y = self.tokens(1, s.long_len), self.tokens(1, s.long_len)
        self.case("train", dict(case="finetune long", compiled=False, B=1, L=s.long_len),
                  lambda: self.train_case("finetune", cfg, False, x, y))

    def train_case(self, name, cfg, compiled, x, y):
        """One optimizer step of `name` as train.py takes it (the objective compiled when asked)."""
        from train import optim_groups  # lazily (distill too): train.py's imports serve only these cases
        if name == "transformers":
            try:
                import transformers
            except ImportError:
                return {"error": "transformers not installed"}
            self.res["env"]["transformers"] = transformers.__version__
            from pretrained.config import to_hf
            hf_cfg = transformers.GPTNeoXConfig.from_dict(to_hf(cfg), attn_implementation="sdpa")
            module = transformers.GPTNeoXForCausalLM(hf_cfg).to(self.dev)
            groups = [{"params": list(module.parameters()), "weight_decay": 0.1}]
            loss_of = (lambda f: f(input_ids=x, labels=y).loss)  # HF shifts labels: one position fewer, same work
        elif name in ("gpt-neox (ours)", "finetune"):
            import fast.losses
            from train import CrossEntropy, lm_loss
            model = self.build(cfg) if name == "gpt-neox (ours)" else self.student(self.build(cfg))
            module = CrossEntropy(model, fast.losses.lm_loss if self.cuda else lm_loss)  # train.py's --fast auto
            groups, loss_of = optim_groups(model, 0.1, 3e-4), (lambda f: f(x, y)[0])
        else:
            import distill
            import fast.losses
            mode, teacher = name.split()[1], self.build(cfg).requires_grad_(False)
            student = self.student(teacher)
            distill.set_trainable(student, "all" if mode == "e2e" else "mixer", range(cfg.num_hidden_layers))
            kd = fast.losses.kd_loss if self.cuda else distill.kd_loss  # distill.py's --fast auto
            module, groups = distill.Distill(teacher, student, mode, kd=kd), optim_groups(student, 0.1, 3e-4)
            loss_of = (lambda f: f(x, y)[0])
        f = torch.compile(module) if compiled else module
        opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=self.cuda)
        params = [p for g in groups for p in g["params"]]

        def step():
            with self.autocast():
                loss = loss_of(f)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return self.timed(step, x.numel())

    def kd(self):
        import distill
        import fast.losses
        B, L, D = self.s.train_batch, self.s.train_len, self.cfg.hidden_size
        teacher = self.build(self.cfg).requires_grad_(False)
        heads = (self.student(teacher), teacher)  # the student (trained, its head), the teacher (frozen)
        hs, ht = (torch.randn(B, L, D, device=self.dev, requires_grad=True) for _ in "st")  # (B, L, D) final states
        y = self.tokens(B, L)
        for compiled in self.modes:
            kd = fast.losses.kd_loss if self.cuda else distill.kd_loss  # distill.py's --fast auto
            fn = torch.compile(kd) if compiled else kd

            def step():
                with self.autocast():
                    loss = fn(hs, ht, y, *heads)
                loss.backward()

            def measure():
                r, e2e = self.timed(step, B * L), get(self.res, "train", "ms", dict(case="distill e2e", compiled=compiled))
                return {**r, "share": r["ms"] / e2e if e2e else None}  # needs the train section in this run
            self.case("kd", dict(case="kd_loss fwd+bwd", compiled=compiled, B=B, L=L), measure)
