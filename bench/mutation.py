"""Mutation testing of the core with mutmut (dev-only dependency, requirements-dev.txt).

For each module in scope the script makes a private copy of the working tree under
`.mutation/<module>/` (git's tracked + untracked-not-ignored files), writes a mutmut config there
that mutates only that module and selects only that module's fast test files, runs `mutmut run`
(mutmut then runs, for each mutant, only the selected tests that call the mutated function), and
reads mutmut's result files into one table: killed / timeout / survived / equivalent / no tests,
score = (killed + timeout) / (mutants - equivalent).

Scope (MODULES below): scst.py, search.py, lora.py, rewards.py, evaluate.py, report.py, and the
generation code of t5.py only (top_k_filter, decode_loop, generate, the KV-cache decoder path
T5ForConditionalGeneration.decode / logits, T5LayerSelfAttention.forward, T5Attention.position_bias,
KVCache); t5's model layers, loader and tokenizer are checked against Hugging Face in test_t5.py
and are left out to keep the count down.

mutmut does not mutate functions with a decorator other than @staticmethod/@classmethod. So that
`@torch.no_grad()` functions (t5.generate, search.ensemble_generate, lora.merge, ...) and
`@contextmanager` ones are mutated too, the copy rewrites `@deco\\ndef f(...)` at module level as
`def f(...)` followed by `f = deco(f)` -- the same function object, so the same behaviour.

Equivalent mutants are listed in EQUIVALENT by (function, the mutated line) with one line why;
a surviving mutant whose diff matches an entry is counted as equivalent, not survived.

    python bench/mutation.py [MODULE ...] [--jobs 2] [--out bench/results/mutation.md] [--survivors]

The table goes to stdout and to --out (Markdown) with a JSON file beside it listing every
mutant's status; --survivors also prints the diff of every surviving mutant. Run it with
`nice -n 10` on a shared machine. Same code + same tests -> same table (mutmut's mutants and the
tests are deterministic; a timeout is decided on CPU time, 15x the test's clean duration).
"""
import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> (test files it is checked by, functions in scope: None = all, functions left out).
# Names are "function" or "Class.method" (fnmatch patterns). Missing test files are skipped. Besides the
# module's own test file, a module lists the files whose tests call it directly (search's tests decode with
# lora and t5; evaluate's call search, lora and t5; scst's combine rewards): mutmut runs, for each mutant,
# only the selected tests that call the mutated function.
MODULES = {
    "rewards": (["tests/test_rewards.py", "tests/test_objectives.py", "tests/test_scst.py"], None,
                # checkpoint loading / conversion and model construction: file plumbing, checked against
                # Hugging Face and by the error tests, not a stated behaviour of the method
                ["load_distilbert_classifier", "*.from_dir", "convert_checkpoint", "checkpoint_key", "_unwrap",
                 "load_scorers", "check_vocab", "*.__init__"]),
    "report": (["tests/test_report.py", "tests/test_search.py", "tests/test_compare.py"], None,
               # the SVG figures' drawing (coordinates, colours); test_search and test_compare check their structure
               ["search_svg", "_subpanel", "_colourbar", "colour", "curves_svg", "fronts_svg", "_axes", "_legend"]),
    "search": (["tests/test_search.py", "tests/test_evaluate.py", "tests/test_compare.py"], None, []),  # scalarise: compare's
    "lora": (["tests/test_lora.py", "tests/test_npz.py", "tests/test_search.py", "tests/test_evaluate.py"], None, []),
    "scst": (["tests/test_scst.py"],
             # the pure maths of §4 / SPEC §2 (with the KL's hand-written gradient), the DynaOpt bandit and the
             # merged-weight sampling; the training loop, checkpoints and
             # validation (train, scst_step, TrainingRun, validate) are exercised end to end by test_scst
             # and test_pipeline, too slow to re-run for every mutant
             ["response_mask", "scst_advantages", "token_logprobs_and_kl", "logprobs_and_kl_formula",
              "_LogprobsAndKL.*", "scst_loss", "coefficient_of_variation", "converged", "Exp3.*", "DynaOpt.*",
              "trained_objectives", "combine_rewards", "shift_right", "score", "sample_responses"], []),
    "evaluate": (["tests/test_evaluate.py"], None, []),
    "t5": (["tests/test_t5.py", "tests/test_search.py", "tests/test_evaluate.py"],
           # generation only; the model layers, loader and tokenizer are checked against HF in test_t5.py
           ["top_k_filter", "decode_loop", "generate", "T5ForConditionalGeneration.decode",
            "T5ForConditionalGeneration.logits", "T5LayerSelfAttention.forward", "T5Attention.position_bias",
            "KVCache.*"], []),
}
# End-to-end tests in a selected file, deselected: they run emorl.py in subprocesses (mutmut cannot see which
# function they call) and take over a minute; the file's in-process tests check the same functions.
DESELECT = ["tests/test_objectives.py::test_add_an_objective_train_it_alone_search_d_2_and_4_evaluate",
            "tests/test_objectives.py::test_train_all_jobs_end_when_the_command_is_killed",
            "tests/test_compare.py::test_bad_preference_file_is_one_error_line",
            "tests/test_compare.py::test_reproduce_and_compare_resume_after_kill_9",
            "tests/test_compare.py::test_compare_hoe_and_iterative_rows_and_jobs"]

# Surviving mutants that cannot change behaviour: (function, mutated line as mutmut writes it, why).
# The line is matched after stripping whitespace; "*" wildcards are allowed.
EQUIVALENT = [
    ("rewards.FluencyScorer.score_batch", "return ((self.cap - self._perplexity(prompts, responses)) / self.cap).clamp(0.0, *)",
     "ppl = exp(mean NLL) >= 1, so (50 - ppl) / 50 <= 0.98: the upper clip at 1 never binds"),
    ("rewards.FluencyScorer._perplexity", "input_ids, attention_mask = self.tokenizer.pad(rows, 1, self.device)",
     "the pad id fills right-padding that the attention mask and the per-row NLL ignore"),
    ("rewards.ClassifierScorer.score_batch", "return logits.float().softmax(dim=+1)[:, self.label]",
     "logits are [B, labels]: dim 1 is dim -1"),
    ("rewards.ReflectionModel.forward", "return torch.sigmoid(self.head(cls)).squeeze(+1)",
     "the head's output is [N, 1]: squeeze(1) is squeeze(-1)"),
    ("report.hypervolume", "return _hypervolume([p for p in points if all(x >= r for x, r in zip(p, ref))], ref)",
     "a point on the reference boundary dominates zero volume, kept or not"),
    ("report._hypervolume", "if p[-1] >= below:*",
     "a slab of height p[-1] - below = 0 adds zero volume"),
    ("report.pareto_report", '"hypervolume": hypervolume([r["scores"] for r in chosen], ),',
     "0.0 is hypervolume's default reference"),
    ("scst.sample_responses", "return t5.generate(model, input_ids, attention_mask, do_sample=True, top_k=args.top_k,",
     "t5.generate's temperature defaults to 1.0"),
    ("scst._LogprobsAndKL.forward", "ctx.dtype = None",
     "autograd casts a Function's gradient to its input's dtype, so backward's .to(dtype) is a no-op either way"),
    ("scst._LogprobsAndKL.backward", "return grad.to(None), None, None",
     "autograd casts a Function's gradient to its input's dtype (the policy logits')"),
    ("search.ensemble_generate", "w = torch.tensor(*).view(k, 1, +1)",
     "view(k, 1, 1) and view(k, 1, -1) are the same shape for k weights"),
    ("search.best_region", "for halves in itertools.product((0, 2), repeat=len(bounds)):*",
     "the loop only asks h == 0, so 2 means the upper half as 1 does"),
    ("search.hierarchical_grid_search", '*"best_weights": None if (best_weights is None) and False else*',
     "best_weights is never None: every grid has a non-zero point and each score must be finite"),
    ("search.make_objective", '*level="hidden", batch_size=17,*',
     "rows decode independently: the batch size only groups the prompts"),
    ("search.best_region", "best, best_total = None, +math.inf",
     "the first sub-cube is taken whatever best_total starts at (best is None)"),
    ("search.check_weights", "*{'negative' if bad <= 0 else 'not a finite number'}*",
     "a bad weight is negative or not finite, never 0"),
    ("search.check_weights", "*{'negative' if bad < 1 else 'not a finite number'}*",
     "a bad weight is negative or not finite (nan < 1 and inf < 1 are false, -inf < 0 is true): the same word"),
    ("search.ensemble_generate", "sampling = dict(do_sample=do_sample, top_k=top_k if (do_sample) or True else 0, generator=generator)",
     "greedy decoding takes the argmax: top_k is read only when sampling"),
    ("search.ensemble_generate", "sampling = dict(do_sample=do_sample, top_k=top_k if do_sample else 1, generator=generator)",
     "greedy decoding takes the argmax: top_k is read only when sampling"),
    ("search.header_difference", "old = stored.get(key) if (isinstance(stored, dict)) or True else None",
     "stored is always a dict: run_search checks the file, and the recursion passes dicts only"),
    ("search.hierarchical_grid_search", '"best_score": best_score if (math.isfinite(best_score)) or True else None,',
     "best_score is always finite: every grid has a non-zero point and each score must be finite"),
    ("search.run_search", "result = hierarchical_grid_search(objective, d, iterations, log=log, on_eval=on_eval, ray_invariant=None)",
     "hierarchical_grid_search then reads the same objective.ray_invariant (default True)"),
    ("search.run_search", "result = hierarchical_grid_search(objective, d, iterations, log=log, on_eval=on_eval, )",
     "hierarchical_grid_search then reads the same objective.ray_invariant (default True)"),
    ("search.run_search", 'score = "n/a" if (result["best_score"] is None) and False else *',
     "best_score is never None (always finite, see hierarchical_grid_search)"),
    ("search.run_search", 'score = "XXn/aXX" if result["best_score"] is None else *',
     "best_score is never None (always finite, see hierarchical_grid_search)"),
    ("search.run_search", 'score = "N/A" if result["best_score"] is None else *',
     "best_score is never None (always finite, see hierarchical_grid_search)"),
    ("search.run_search", "bar = tqdm(*", "progress bar display (total, label, unit)"),
    ("search.run_search", "bar.update(*", "progress bar display"),
    ("lora.LoRALinear.__init__", 'self.mode = ""*',
     "add_adapter sets every layer's mode (set_adapter) right after wrapping it"),
    ("lora.save_adapter", "m = layers[1][1]", "every layer of one adapter has the same r, alpha and dropout"),
    ("lora.save_adapter", 'targets = sorted({path.rsplit(".", *)[-1] for path, _ in layers})',
     "rsplit with any maxsplit, then [-1]: the last name"),
    ("lora.LoRALinear.forward", "h = (F.dropout(x, p, ) if self.training and p > 0 else x) @ self.lora_A[name].T",
     "F.dropout's training argument defaults to True"),
    ("lora.LoRALinear.forward", "h = (F.dropout(x, p, True) if self.training and p >= 0 else x) @ self.lora_A[name].T",
     "dropout with p = 0 returns its input"),
    ("lora.set_adapter", "m.mode = None if (name is None) and False else {name: 1.0}",
     "mode {None: 1.0} adds no adapter term (no layer has an adapter named None): the base model"),
    ("lora._targeted", 'return re.fullmatch(targets, path) if isinstance(targets, str) else path.rsplit(".", *)[-1] in targets',
     "every variant of rsplit takes the last name"),
    ("lora.mixed_adapters", "rows = torch.as_tensor(row_adapter, *)",
     "row indices are integers (adapter_major_rows, int lists): as_tensor infers int64"),
    ("lora._same_base", "abs(a - c) < 0.02 * max(b, d) + 1e-12 for*",
     "< or <= at exactly the 2 % tolerance: a float tie no real base hits"),
    ("evaluate.evaluate", "for training_seed, method in tqdm(*", "progress bar display (label, unit)"),
    ("evaluate.generate_texts", "sampling = dict(do_sample=generator is not None, top_k=TOP_K if (generator is not None) or True else 0, generator=generator)",
     "greedy decoding (no generator) takes the argmax: top_k is read only when sampling"),
    ("evaluate.generate_texts", "sampling = dict(do_sample=generator is not None, top_k=TOP_K if generator is not None else 1, generator=generator)",
     "greedy decoding (no generator) takes the argmax: top_k is read only when sampling"),
    ("evaluate.seed_order", 'return (0, seed, "XXXX") if isinstance(seed, int) else (1, 0, str(seed))',
     "only the order of the keys is used: every integer seed gets the same third element"),
    ("evaluate.seed_order", 'return (0, seed, "") if isinstance(seed, int) else (2, 0, str(seed))',
     "labels still sort after the integer seeds (2 > 0, as 1 > 0)"),
    ("evaluate.seed_order", 'return (0, seed, "") if isinstance(seed, int) else (1, 1, str(seed))',
     "every label gets the same middle element: labels still sort by their text"),
    ("lora._targeted", 'if isinstance(targets, str) and targets.*() != "*":',
     'this test only decides whether to compile the string; "all-linear" is a valid regex and match() tests the shorthand itself'),
    ("lora.LoRALinear._concatenated", "return A, B, (rows[:, None] == owner).to(None)",
     "a bool mask multiplies the float activations as 0 / 1 (type promotion): the same values and dtype"),
    ("lora.convert_npz", "archive = np.load(src, allow_pickle=None)", "np.load's allow_pickle defaults to False"),
    ("lora.convert_npz", "archive = np.load(src, )", "np.load's allow_pickle defaults to False"),
    ("lora.convert_npz", 'if value.dtype.kind not in "XXfiuXX" or not np.isfinite(value).all():',
     "X is no numpy dtype kind: the same kinds pass"),
    ("lora.convert_npz", 'target_modules=sorted({stem.rsplit(".", *)[-1] for stem in modules}), bias="none",',
     "rsplit with any maxsplit, then [-1]: the last name"),
    ("lora.convert_npz", 'target_modules=sorted({stem.rsplit(".", 1)[+1] for stem in modules}), bias="none",',
     "every stem is base_model.model.<path> (checked), so it has a dot and [1] of rsplit(., 1) is the last name"),
    ("t5.generate", "cache = None", "decode() then makes the cache itself (capacity 64, grown on demand): the same keys and values"),
    ("t5.generate", "cache = KVCache(len(model.decoder.block), )",
     "the capacity only sets when the cache buffers grow (doubling): the same keys, values and tokens"),
    ("t5.KVCache.__init__", "def __init__(self, num_layers, capacity=65):",
     "the capacity only sets when the cache buffers grow: the same keys, values and tokens"),
    ("t5.KVCache.append", "if self.self_k[layer] is None or end >= self.self_k[layer].shape[2]:",
     "growing a full buffer one token early copies the same keys and values"),
    ("t5.T5ForConditionalGeneration.decode", "cache = KVCache(len(dec.block), )",
     "a longer input grows the cache at once (capacity 2 (past + new)): the same keys and values"),
    ("t5.T5ForConditionalGeneration.decode", "if past + new >= cache.capacity:*",
     "growing one token early: the relative position bias is the same slice of a larger square"),
    ("t5.T5ForConditionalGeneration.decode", "cache.capacity, cache.position_bias = 3 * (past + new), None",
     "a larger capacity: the relative position bias is the same slice of a larger square"),
    ("t5.T5ForConditionalGeneration.decode", "bias = attention.position_bias(size, size).to(None)",
     "the bias embedding has the model's dtype (a model is cast whole), so the cast is a no-op"),
    ("t5.T5LayerSelfAttention.forward", "def forward(self, x, bias, cache=None, layer=1):",
     "the layer index is read only with a cache, and decode() always passes it"),
    ("t5.decode_loop", "tokens = torch.full((batch_size, max_new_tokens), pad_id, device=device)",
     "an int fill value makes torch.full int64, as dtype=torch.long does"),
    ("t5.decode_loop", "tokens = torch.full((batch_size, max_new_tokens), pad_id, dtype=None, device=device)",
     "an int fill value makes torch.full int64, as dtype=torch.long does"),
    ("t5.decode_loop", "last = torch.full((batch_size,), start_id, device=device)",
     "an int fill value makes torch.full int64"),
    ("t5.decode_loop", "last = torch.full((batch_size,), start_id, dtype=None, device=device)",
     "an int fill value makes torch.full int64"),
    ("t5.decode_loop", "steps = *", "steps is set by every iteration; with 0 new tokens the slice is empty either way"),
    ("t5.decode_loop", "log_p = torch.log_softmax(logits / temperature if do_sample else logits, +1)",
     "logits are [B, V]: dim 1 is dim -1"),
    ("t5.decode_loop", "token = (top_k_filter(log_p, top_k) - torch.log(-torch.log(uniform))).argmax(+1)",
     "[B, V]: dim 1 is dim -1"),
    ("t5.decode_loop", "token = logits.argmax(+1)", "[B, V]: dim 1 is dim -1"),
    ("t5.top_k_filter", "if not top_k or top_k > scores.shape[-1]:",
     "top_k = V keeps every score through the topk path too"),
    ("t5.top_k_filter", "if not top_k or top_k >= scores.shape[+1]:", "scores are [B, V]: dim 1 is dim -1"),
    ("t5.top_k_filter", "kth = scores.topk(top_k, ).values[..., -1:]", "topk's default dim is -1"),
    ("t5.top_k_filter", "kth = scores.topk(top_k, dim=+1).values[..., -1:]", "scores are [B, V]: dim 1 is dim -1"),
    ("t5.top_k_filter", 'return scores.masked_fill(scores < kth, float("-INF"))', 'float("-INF") is float("-inf")'),
]

# Alive on purpose, not behaviour the README or the paper states (listed in the README with why):
# device placement of the scorers' inputs (the CPU suite has one device) and the 512-token cap of
# the scorers' encoders (the test models have fewer positions, so min(512, positions) = positions).

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}


def functions(path):
    """Top-level functions and methods of a module: 'name' or 'Class.method'."""
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}"


def in_scope(module):
    """mutmut's mutant-name patterns for the functions in scope, and the functions themselves."""
    _, include, exclude = MODULES[module]
    names = [f for f in functions(ROOT / f"{module}.py")
             if (include is None or any(fnmatch.fnmatchcase(f, p) for p in include))
             and not any(fnmatch.fnmatchcase(f, p) for p in exclude)]
    mangled = [f"x_{f}" if "." not in f else "xǁ" + f.replace(".", "ǁ") for f in names]
    return [f"{module}.{m}__mutmut_*" for m in mangled], names


def source_files():
    """The working tree as git sees it (tracked + untracked, minus ignored); a plain walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".mutation", "mutants", "runs", "__pycache__", ".pytest_cache"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def undecorate(source: str) -> str:
    """`@deco` + `def f` at module level -> `def f` ... `f = deco(f)` (mutmut skips decorated functions)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []  # (first decorator line, last line of the function, name, decorator sources)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            decos = [ast.get_source_segment(source, d) for d in node.decorator_list]
            edits.append((node.decorator_list[0].lineno, node.end_lineno, node.name, decos))
    for first, last, name, decos in reversed(edits):
        wrapped = name
        for deco in reversed(decos):
            wrapped = f"({deco})({wrapped})"
        lines.insert(last, f"{name} = {wrapped}\n")
        del lines[first - 1:first - 1 + len(decos)]
    return "".join(lines)


def prepare(module, work, tests):
    """A fresh copy of the tree in `work` with the mutmut config for one module."""
    shutil.rmtree(work, ignore_errors=True)
    files = source_files()
    for rel in files:
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    target = work / f"{module}.py"
    target.write_text(undecorate(target.read_text()))
    # mutmut forks each mutant's test run from the process that ran the tests once. tqdm's default lock
    # is a multiprocessing lock shared by every forked child: a child killed (timeout) while holding it
    # leaves every later child that opens a progress bar waiting forever. One private lock per process.
    with open(work / "tests" / "conftest.py", "a") as f:
        f.write("\n\nimport threading as _threading  # added by bench/mutation.py (see prepare)\n"
                "import tqdm as _tqdm\n\n_tqdm.tqdm.monitor_interval = 0\n"
                "_tqdm.tqdm.set_lock(_threading.RLock())\n")
    top = sorted({rel.split("/")[0] for rel in files if rel.endswith(".py") and "/" not in rel})
    dirs = sorted({rel.split("/")[0] for rel in files
                   if "/" in rel and not rel.startswith((".", "tests/", "bench/"))})
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths =\n" + "".join(f"    {p}\n" for p in top + dirs) +
        f"only_mutate = {module}.py\n"
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests) +
        "".join(f"    --deselect\n    {node}\n" for node in DESELECT if node.partition("::")[0] in tests) +
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -x\n"
        # fork from the process that ran the tests once: torch and the HF oracles are imported already
        "process_isolation = fork\n"
        "timeout_constant = 5\n"
        "use_git_change_detection = false\n")


def mutmut(work, *args):
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", *args]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)


DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in sys.argv[1:]}))
"""


def diffs(work, names):
    """{mutant: (removed lines, added lines, unified diff)}, read with mutmut's own diff (one process)."""
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-c", DIFFS, *names], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: reading mutmut's diffs failed:\n{proc.stderr[-3000:]}")
    out = {}
    for name, diff in json.loads(proc.stdout.splitlines()[-1]).items():
        lines = diff.splitlines()
        removed = [l[1:].strip() for l in lines if l.startswith("-") and not l.startswith("---")]
        added = [l[1:].strip() for l in lines if l.startswith("+") and not l.startswith("+++")]
        out[name] = (removed, added, diff)
    return out


def function_of(name):
    """'search.x_grid_points__mutmut_3' -> 'search.grid_points'; methods -> 'module.Class.method'."""
    module, _, rest = name.partition(".")
    rest = rest.partition("__mutmut_")[0]
    rest = rest[2:].replace("ǁ", ".")  # "x_f" or "xǁClassǁmethod"
    return f"{module}.{rest}"


def equivalent_reason(function, added):
    """The EQUIVALENT entry whose line matches one of the mutant's added lines ("*" is the only wildcard)."""
    for fn, line, why in EQUIVALENT:
        pattern = re.compile(".*".join(re.escape(part) for part in line.split("*")) + r"\Z")
        if fn == function and any(pattern.match(a) for a in added):
            return why
    return None


def run_module(module, jobs, show_survivors):
    patterns, _ = in_scope(module)
    tests = [t for t in MODULES[module][0] if (ROOT / t).exists()]
    work = ROOT / ".mutation" / module
    if not tests:  # mutmut would run the whole suite: report the module as untested instead
        print(f"mutation: {module}: no test file selected", file=sys.stderr)
        return {"module": module, "tests": [], "seconds": 0, "mutants": []}
    prepare(module, work, tests)
    start = time.time()
    proc = mutmut(work, "run", "--max-children", str(jobs), *patterns)
    seconds = time.time() - start
    meta = work / "mutants" / f"{module}.py.meta"
    # mutmut first runs the selected tests unmutated (twice, in one process: once to map tests to functions,
    # once clean); if that fails it stops with "Failed to run clean test" and leaves every mutant unchecked
    # (status None). Stop here with its output instead of reporting a table of unchecked mutants.
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    if proc.returncode or not codes or any(code is None for code in codes.values()):
        log = "\n".join(line.rpartition("\r")[2] for line in (proc.stdout + proc.stderr).splitlines())
        unchecked = sum(code is None for code in codes.values())
        sys.exit(f"error: mutmut run for {module} failed (exit status {proc.returncode}, {len(codes)} mutants, "
                 f"{unchecked} not checked); its output ends:\n{log[-4000:]}")
    mutants = []
    alive = diffs(work, [name for name, code in codes.items() if STATUS.get(code) in ("survived", "no tests")])
    for name, code in sorted(codes.items(), key=lambda kv: (kv[0].partition("__mutmut_")[0],
                                                            int(kv[0].rpartition("_")[2]))):
        status = STATUS.get(code, "suspicious")
        entry = {"name": name, "function": function_of(name), "status": status}
        if status in ("survived", "no tests"):
            removed, added, diff = alive[name]
            entry.update(removed=removed, added=added)
            why = equivalent_reason(entry["function"], added)
            if why:
                entry.update(status="equivalent", why=why)
            elif show_survivors:
                print(f"# {name}: {status}\n{diff}\n", flush=True)
        mutants.append(entry)
    return {"module": module, "tests": tests, "seconds": round(seconds), "mutants": mutants}


def row(result):
    count = lambda s: sum(m["status"] == s for m in result["mutants"])
    n, killed, timeout = len(result["mutants"]), count("killed"), count("timeout")
    equivalent, survived, no_tests = count("equivalent"), count("survived"), count("no tests")
    other = n - killed - timeout - equivalent - survived - no_tests
    if not n:
        return [result["module"]] + ["—"] * 7 + ["no test file", result["seconds"]]
    score = 100.0 * (killed + timeout) / max(1, n - equivalent)
    return [result["module"], n, killed, timeout, survived, equivalent, no_tests, other, f"{score:.1f} %",
            result["seconds"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to test (default: all of {', '.join(MODULES)})")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--out", default="bench/results/mutation.md", help="Markdown table; JSON beside it")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r} (choose from {', '.join(MODULES)})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    results = []
    for module in modules:
        print(f"mutation: {module} ...", file=sys.stderr, flush=True)
        results.append(run_module(module, args.jobs, args.survivors))
        print("mutation: " + " | ".join(map(str, row(results[-1]))), file=sys.stderr, flush=True)
    header = ["module", "mutants", "killed", "timeout", "survived", "equivalent", "no tests", "other",
              "score", "seconds"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(map(str, row(r))) + " |" for r in results]
    text = f"mutmut, commit {commit}{' (+ uncommitted changes)' if dirty else ''}\n\n" + "\n".join(table) + "\n"
    lines = [f"- {m['name']}: {m['status']}" + (f" ({m['why']})" if "why" in m else "")
             for r in results for m in r["mutants"] if m["status"] not in ("killed", "timeout")]
    print(text)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\nNot killed:\n" + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"commit": commit, "results": results}, indent=1))


if __name__ == "__main__":
    main()
