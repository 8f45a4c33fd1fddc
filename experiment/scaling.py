"""experiment.py --sweep: the paper's open questions. (1) Does distillation hold up as the model grows? (2) After how
many GPU-minutes does pre-training the Hyena model from scratch catch up with distilling it?

Per size (Pythia's exact shapes, pretrained.config.SHAPES) a teacher is pretrained on the training split with
tokens scaled by its parameters: --sweep-teacher-tokens is the 70m's budget and a size of N parameters gets N / 70.4M
of it (the 70m's is then experiment.py's own teacher, `<runs>/teacher`). Per recipe, one warmup-stable-decay run of the
largest budget saves a branch where each smaller budget's decay starts (train.py --branches), and each branch is
then finished with its own budget: one stable phase pays for every budget's point. A budget is the recipe's GPU-
minutes in all (compiling is outside it, as in train.py):
  best     teacher init, `independent` alignment for a fixed --sweep-align-minutes, then KL at lr 1e-3 for the rest
           (branched)
  paper    random init, progressive MSE for --sweep-align-minutes, then CE fine-tuning for the rest (branched)
           (the paper splits its budget in halves; a fixed first stage is what lets the second one branch)
  scratch  Hyena of the teacher's shape from random init, CE for the whole budget (branched)
The first seed runs every point; the other --sweep-seeds repeat the --sweep-repeat points. Every step is skipped
once its output exists and resumes from its checkpoint, so the sweep restarts where it stopped. Its page
(experiment/scaling_report.py: <results>/scaling/SCALING.md and two plots) reads <runs>/sweep/points.json.
"""
import json
from pathlib import Path

from pretrained.config import SHAPES
from experiment import runner
from experiment.runner import PY, ROOT, todo
from training.branches import branch_folder, budget_name
from cli import write_atomic

RECIPES = ("best", "paper", "scratch")
TEACHER_LR = {"pythia-14m": 1e-3, "pythia-31m": 1e-3, "pythia-70m": 1e-3, "pythia-160m": 6e-4, "pythia-410m": 3e-4,
              "tiny": 2e-3}  # Pythia's own peak rates
BEST_E2E_LR = "1e-3"  # measured against distill.py's 3e-4: 2 % lower ppl at 1/4 (results/claim/TUNED.md)
REFERENCE = "pythia-70m"  # --sweep-teacher-tokens is this size's budget
DEFAULT_REPEAT = "70m:2,10"  # the points a second seed repeats: where a difference is small
TEACHER_EVAL_INTERVAL = 500  # a teacher's run is long: validating it every 100 steps would cost ~40 s of an H100


def add_sweep_args(p):
    g = p.add_argument_group("scale and crossover sweep (experiment/scaling.py)")
    g.add_argument("--sweep", default="", metavar="SIZE[,SIZE]", help="run the sweep instead of the four students: "
                   "sizes 14m, 31m, 70m, 160m, 410m (Pythia's shapes) or pretrained.config.SHAPES names")
    g.add_argument("--sweep-minutes", default="1,2,5,10,20", help="budgets, GPU-minutes per recipe; with an x "
                   "(0.125x,0.25x,...) fractions of the size's teacher's own training GPU-minutes, every one")
    g.add_argument("--sweep-recipes", default=",".join(RECIPES), help=f"from {','.join(RECIPES)}")
    g.add_argument("--sweep-align-minutes", default="0.25", help="best's alignment and paper's MSE stage, "
                   "the same for every budget (below the smallest); with an x, of the teacher's minutes as above")
    g.add_argument("--sweep-align-compile", default="off", choices=["auto", "on", "off"], help="distill.py "
                   "--align-compile of those stages: off spares a compile per stage that trains for seconds")
    g.add_argument("--sweep-teacher-tokens", type=float, help="the 70m teacher's tokens (default --teacher-tokens); "
                   "other sizes in proportion to their parameters")
    g.add_argument("--sweep-seeds", default="", help="seeds (default: --seed); the first runs every point")
    g.add_argument("--sweep-eval-tokens", type=int, default=1_000_000, help="validation tokens each point is "
                   "scored on (the same tokens for every point and the teacher)")
    g.add_argument("--sweep-repeat-recipes", default="", help="the recipes the other seeds repeat (default: all of "
                   "--sweep-recipes)")
    g.add_argument("--sweep-repeat", metavar="SIZE:B[,B][;SIZE:B]", help="the points the other seeds repeat "
                   f"(default {DEFAULT_REPEAT}, of those this sweep has)")


def shape_name(size):
    name = size if size in SHAPES else f"pythia-{size}"
    if name not in SHAPES:
        raise ValueError(f"--sweep {size}: no such shape; choose from 14m, 31m, 70m, 160m, 410m or {', '.join(SHAPES)}")
    return name


def parameters(shape, vocab_size):
    """The teacher's parameter count (embeddings included, Pythia's convention), counted on the meta device."""
    import torch  # here: the driver and its report need no torch otherwise
    from hyena import Config, GPTNeoX
    with torch.device("meta"):
        model = GPTNeoX(Config(**SHAPES[shape], vocab_size=-(-vocab_size // 128) * 128))
    return sum(p.numel() for p in model.parameters())


def budgets_of(spec, flag):
    """'1,2,5' -> ([1.0, 2.0, 5.0], False): GPU-minutes; '0.25x,1x' -> ([0.25, 1.0], True): fractions of a teacher's
    training minutes."""
    parts = [b.strip() for b in spec.split(",") if b.strip()]
    relative = {b.endswith("x") for b in parts}
    if len(relative) > 1:
        raise ValueError(f"{flag} {spec!r}: give every budget with an x (fractions of the teacher's minutes) or none")
    try:
        out = sorted({float(b.rstrip("x")) for b in parts})
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: give comma-separated numbers") from None
    if not out or out[0] <= 0:
        raise ValueError(f"{flag} {spec!r}: give budgets > 0")
    return out, relative == {True}


def teacher_minutes(teacher):
    """The training GPU-minutes a finished teacher took (train.py's summary: compiling and validation excluded)."""
    summary = json.loads((Path(teacher) / "summary.json").read_text())
    return summary["minutes"] * summary["world"]


def parse_repeat(spec):
    """--sweep-repeat '70m:2,10;31m:5' -> {'pythia-70m': [2.0, 10.0], 'pythia-31m': [5.0]}."""
    out = {}
    for part in (x for x in spec.split(";") if x.strip()):
        size, _, budgets = part.partition(":")
        out[shape_name(size.strip())] = budgets_of(budgets, "--sweep-repeat")[0]
    return out


def recipe_steps(recipe, d, teacher, shape, budgets, align, common, align_compile):
    """One recipe at one seed in folder d: [commands in order] and its points [(budget, final, [run folders])]. The
    branched run's flag and its share of a budget b: all of b for scratch, b - align after a fixed first stage.
    Its --branches are finished inside that one run (train.py)."""
    top, rest = budgets[-1], budgets[:-1]
    wsd, before, share = ["--schedule", "wsd", "--data-stream", recipe], [], align
    if recipe == "scratch":
        run = [PY, ROOT / "finetune.py", "--init", "scratch", "--mixer", "hyena", "--config", shape, *common,
               "--lr", "1e-3", *wsd]
        flag, share = "--max-minutes", 0.0
    elif recipe == "best":
        run = [PY, ROOT / "distill.py", "--teacher", teacher, *common, "--lr", "1e-3", "--max-minutes", budget_name(align),
               "--init", "teacher", "--layers", "independent", "--align-compile", align_compile,
               "--e2e-lr", BEST_E2E_LR, *wsd]
        flag = "--e2e-minutes"
    else:  # paper: the MSE stage once, then the CE fine-tuning branched
        before = todo([PY, ROOT / "distill.py", "--teacher", teacher, *common, "--lr", "1e-3", "--max-minutes",
                       budget_name(align), "--init", "random", "--layers", "progressive", "--train", "block",
                       "--align-compile", align_compile, "--data-stream", "paper", "--out-dir", d / "paper"],
                      d / "paper" / "final")
        run = [PY, ROOT / "finetune.py", "--init", d / "paper" / "final", *common, "--lr", "3e-4", *wsd]
        flag = "--max-minutes"
    head = d / ("paper-ft" if recipe == "paper" else recipe)
    extra = [d / "paper"] if recipe == "paper" else []
    own = {b: float(budget_name(b - share)) for b in budgets}  # the branched run's budget, as its flag will spell it
    check_plan(head, [own[b] for b in budgets])
    branches = ["--branches", ",".join(budget_name(own[b]) for b in rest)] if rest else []
    steps = before + todo(run + [flag, budget_name(own[top]), *branches, "--out-dir", head], head / "final")
    points = [(top, head / "final", [head, *extra])] + \
        [(b, branch_folder(head, own[b]) / "final", [branch_folder(head, own[b]), *extra]) for b in rest]
    return steps, sorted(points)


def check_plan(head, budgets):
    """A recipe's run folder serves one list of budgets (its main run saved exactly those branches): refuse a
    rerun that asks for others, before anything runs, rather than fail on a missing branch or mislabel a point."""
    plan = head.parent / f"{head.name}.budgets.json"
    if plan.exists() and json.loads(plan.read_text()) != budgets:
        raise ValueError(f"{head} was run for budgets {json.loads(plan.read_text())} (the branched stage's "
                         f"minutes), not {budgets}: keep --sweep-minutes and --sweep-align-minutes as they were, "
                         "or use another --runs")
    plan.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(plan, json.dumps(budgets) + "\n")


def sweep_steps(args, runs, root, data, tok, logs, common, launcher, vocab_size):
    """Teachers, then per size every recipe's runs (one job per GPU), then one eval.py per size over the teacher
    and every point; writes <runs>/sweep/points.json for the report."""
    sizes = [shape_name(s.strip()) for s in args.sweep.split(",") if s.strip()]
    (budgets, relative), (aligns, align_rel) = (budgets_of(args.sweep_minutes, "--sweep-minutes"),
                                                 budgets_of(args.sweep_align_minutes, "--sweep-align-minutes"))
    align = aligns[0]
    recipes = [r for r in args.sweep_recipes.split(",") if r]
    if not recipes or not set(recipes) <= set(RECIPES):
        raise ValueError(f"--sweep-recipes {args.sweep_recipes!r}: choose from {', '.join(RECIPES)}")
    if len(aligns) > 1 or align_rel != relative:
        raise ValueError(f"--sweep-align-minutes {args.sweep_align_minutes}: give one value, in --sweep-minutes' "
                         "unit (with an x where those have one)")
    if not align < budgets[0] and {"best", "paper"} & set(recipes):
        raise ValueError(f"--sweep-align-minutes {args.sweep_align_minutes}: must be below the smallest budget "
                         f"{budgets[0]:g}")
    seeds = [int(s) for s in args.sweep_seeds.split(",") if s.strip()] or [args.seed]
    repeat = parse_repeat(args.sweep_repeat or DEFAULT_REPEAT) if len(seeds) > 1 else {}
    if args.sweep_repeat is None:  # the default asks only for what this sweep has
        repeat = {k: [b for b in v if b in budgets] for k, v in repeat.items() if k in sizes}
    unknown = set(repeat) - set(sizes) or {b for bs in repeat.values() for b in bs} - set(budgets)
    if unknown:
        raise ValueError(f"--sweep-repeat {args.sweep_repeat!r}: {', '.join(map(str, sorted(unknown)))} is not in "
                         "--sweep / --sweep-minutes")
    again = [r for r in args.sweep_repeat_recipes.split(",") if r] or recipes
    if not set(again) <= set(recipes):
        raise ValueError(f"--sweep-repeat-recipes {args.sweep_repeat_recipes!r}: choose from --sweep-recipes "
                         f"{','.join(recipes)}")
    base = args.sweep_teacher_tokens or args.teacher_tokens
    ref = parameters(REFERENCE, vocab_size)

    def rel(path):  # points.json names folders from <runs>, so the report can read them from any folder
        return str(Path(path).relative_to(runs))
    points, sweep = [], runs / "sweep"

    def save(size_points):  # after planning each size and after scoring it: a sweep cut short still reports
        write_atomic(sweep / "points.json", json.dumps({"data": data, "context": args.block_size, "gpus": args.gpus,
                                                        "budgets": budgets, "align_minutes": align,
                                                        "budget_unit": "teacher" if relative else "minutes",
                                                        "points": points + size_points}, indent=1) + "\n")
    for shape in sizes:
        n = parameters(shape, vocab_size)
        tokens = int(base * n / ref)
        teacher = runs / "teacher" if shape == REFERENCE and tokens == int(args.teacher_tokens) else \
            sweep / shape / "teacher"
        cmd = launcher + [ROOT / "finetune.py", "--init", "scratch", "--mixer", "attention", "--config", shape,
                          "--lr", TEACHER_LR[shape], *common, "--eval-interval", TEACHER_EVAL_INTERVAL, "--data-stream",
                          "teacher", "--max-tokens", tokens, "--out-dir", teacher]
        for c in todo(cmd, teacher / "final"):
            if runner.finish(runner.run(c, logs / f"teacher-{shape}.log")):
                raise SystemExit(f"experiment.py: the {shape} teacher failed; see {logs / f'teacher-{shape}.log'}")
        scale = teacher_minutes(teacher) if relative else 1.0  # a budget's GPU-minutes per unit
        ev = sweep / shape / "eval.json"
        jobs, size_points = {}, [dict(size=shape, params=n, teacher_tokens=tokens, recipe="teacher",
                                      final=str(teacher / "final"), folders=[rel(teacher)], eval=rel(ev))]
        for i, seed in enumerate(seeds):
            mine = budgets if i == 0 else repeat.get(shape, [])
            if not mine:
                continue
            seeded = [*common[:common.index("--seed") + 1], seed, *common[common.index("--seed") + 2:]]
            for recipe in recipes if i == 0 else again:
                minutes = [float(budget_name(b * scale)) for b in mine]
                steps, pts = recipe_steps(recipe, sweep / shape / f"seed{seed}", teacher / "final", shape, minutes,
                                          float(budget_name(align * scale)), seeded, args.sweep_align_compile)
                jobs[f"{shape}-{recipe}-s{seed}"] = steps
                size_points += [dict(size=shape, params=n, teacher_tokens=tokens, seed=seed, recipe=recipe,
                                     budget=b, minutes_budget=m, final=str(f), folders=[rel(x) for x in fs],
                                     eval=rel(ev)) for b, (m, f, fs) in zip(mine, pts)]
        save(size_points)
        runner.run_parallel({k: v for k, v in jobs.items() if v}, args.gpus, logs)
        finals = [p["final"] for p in size_points]
        scored = {r["path"] for r in json.loads(ev.read_text())["results"]} if ev.exists() else set()
        evals = [] if set(finals) <= scored else [[PY, ROOT / "eval.py", "--ckpt", *finals, "--data", data, "--split",
                                                   "val", "--data-root", root, "--context", args.block_size,
                                                   "--max-tokens", args.sweep_eval_tokens, "--tokenizer", tok,
                                                   "--json", ev]]  # again when a point is new
        runner.run_parallel({f"eval-{shape}": evals} if evals else {}, args.gpus, logs)
        points += size_points
    save([])
