"""HoE (hoe.py): task-SVD against τ_i and the Eckart-Young bound, model-wide pruning by hand, preference routing
(Eq. 9-10) by hand, the routed module (Eq. 11-12) against a hand computation, one-hot = that expert's adapter
(bit for bit), one STCH update = Eq. (18) by hand, routers learn (trained vs untrained, same run), router
training resumes after kill -9 with the uninterrupted result, and bad preferences are one-line errors."""
import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import hoe
import lora
import t5
from files import InputError, load_safetensors

from test_scst import WORDS, make_tiny  # the tiny T5 and its vocabulary, one definition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = ["reflection", "empathy", "fluency"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_hoe"))


def with_adapters(model, names=OBJECTIVES, scale=0.6):
    """A copy of the model with a seeded random adapter per name (B ≠ 0: each changes the outputs)."""
    model = copy.deepcopy(model)
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        lora.add_adapter(model, name)
        generator = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for p in lora.adapter_parameters(model, name):
                p.add_(scale * torch.randn(p.shape, generator=generator))
    lora.set_adapter(model, None)
    return model.eval()                                      # no LoRA dropout in the comparisons


def prompts(n, seed=1):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(6)) + f" {i}" for i in range(n)]


def greedy(model, tokenizer, texts, max_new_tokens=12):
    import data
    ids, mask = data.encode_prompts(tokenizer, texts)
    return t5.generate(model, ids, mask, max_new_tokens=max_new_tokens)[0]


def experts_from_adapters(model, prune=0.0, rank=8, names=OBJECTIVES):
    """Single-objective experts (rescale 1) installed beside the adapters; -> HoE without routers."""
    experts = []
    for i, name in enumerate(names):
        hoe.install_expert(model, f"expert_{name}", hoe.task_svd(hoe.objective_vectors(model, name), rank, prune))
        experts.append(hoe.Expert(f"expert_{name}", [float(i == j) for j in range(len(names))]))
    return hoe.HoE(list(names), experts)


# ----------------------------------------------------------------------------- §3.1 task-SVD
def test_task_svd_without_pruning_reproduces_the_objective_vector(tiny):
    model = with_adapters(tiny[0])
    tau = hoe.objective_vectors(model, "empathy")
    for rank in (8, 12):                                     # r' = the adapters' rank, and above it (zero padding)
        factors = hoe.task_svd(tau, rank, prune=0.0)
        for path, (A, B) in factors.items():
            assert A.shape[0] == B.shape[1] == rank
            torch.testing.assert_close((B.double() @ A.double()), tau[path], atol=1e-5, rtol=1e-5)
    rescaled = hoe.task_svd(tau, 8, prune=0.0, rescale=1.9)
    path = next(iter(tau))
    torch.testing.assert_close(rescaled[path][1] @ rescaled[path][0], 1.9 * tau[path].float(), atol=1e-5, rtol=1e-5)


def test_task_svd_below_the_rank_is_the_best_low_rank_approximation(tiny):
    """Eckart-Young: keeping r' = 3 directions leaves exactly the norm of the dropped singular values."""
    model = with_adapters(tiny[0])
    tau = hoe.objective_vectors(model, "fluency")
    for path, (A, B) in hoe.task_svd(tau, 3, prune=0.0).items():
        dropped = torch.linalg.svdvals(tau[path])[3:]
        assert math.isclose(float(torch.linalg.norm(tau[path] - B.double() @ A.double())),
                            float(torch.linalg.norm(dropped)), rel_tol=1e-4, abs_tol=1e-6)


def test_pruning_zeroes_the_smallest_entries_over_the_whole_model():
    vectors = {"a": torch.tensor([[0.1, -5.0], [0.3, 2.0]]), "b": torch.tensor([[-0.2, 0.05, 4.0, -0.5, 1.0, 3.0]])}
    pruned = hoe.prune_smallest(vectors, 0.4)                # 10 entries: the 4 smallest |x| (0.05, 0.1, 0.2, 0.3)
    assert pruned["a"].tolist() == [[0.0, -5.0], [0.0, 2.0]]
    assert pruned["b"].tolist() == [[0.0, 0.0, 4.0, -0.5, 1.0, 3.0]]
    assert hoe.prune_smallest(vectors, 0.0)["a"] is vectors["a"]


def test_merged_expert_is_task_arithmetic_of_the_vectors():
    one, two = {"m": torch.ones(2, 2), "n": torch.ones(1, 1)}, {"m": 3 * torch.ones(2, 2)}
    merged = hoe.merge_vectors([one, two], [0.25, 0.75])     # Eq. (4), Merge = Σ λ_i τ_i
    assert merged["m"].tolist() == [[2.5, 2.5], [2.5, 2.5]] and merged["n"].tolist() == [[0.25]]


# ----------------------------------------------------------------------------- §3.3 preference routing
def test_nearest_experts_by_euclidean_distance_ties_by_index():
    experts = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]]
    assert hoe.nearest([0.25, 0.25, 0.5], experts, 3) == [3, 2, 0]   # e1 and e2 tie: index order
    assert hoe.nearest([1, 0, 0], experts, 1) == [0]


@pytest.mark.parametrize("target", [[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0]])
def test_convex_coefficients_reproduce_the_preference(target):
    for neighbours in ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1 / 3] * 3, [1, 0, 0], [0, 0, 1], [0, 1, 0]]):
        omega = hoe.convex_coefficients(target, neighbours)
        assert min(omega) >= 0 and math.isclose(sum(omega), 1.0)
        mix = [sum(w * p[j] for w, p in zip(omega, neighbours)) for j in range(3)]
        assert all(math.isclose(m, t, abs_tol=1e-9) for m, t in zip(mix, target))
    assert hoe.convex_coefficients([0.6, 0.2, 0.2], [[1, 0, 0], [0, 1, 0], [0, 0, 1]]) == pytest.approx([0.6, 0.2, 0.2])


def test_outside_the_hull_the_nearest_point_of_the_hull_is_served():
    # the segment e1-e2: the nearest point to (0.5, 0.3, 0.2) is (0.6, 0.4, 0), by hand
    assert hoe.convex_coefficients([0.5, 0.3, 0.2], [[1, 0, 0], [0, 1, 0]]) == pytest.approx([0.6, 0.4])
    # beyond an end: the end itself
    assert hoe.convex_coefficients([0.0, 0.0, 1.0], [[1, 0, 0], [0.5, 0.5, 0]]) == pytest.approx([0.0, 1.0])
    # an exact neighbour gets all the weight even when a mixture would also reproduce it
    assert hoe.convex_coefficients([0.5, 0.5, 0], [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0]]) == pytest.approx([0, 1, 0])


# ----------------------------------------------------------------------------- §3.4 the routed module
def test_routed_module_computes_eq_12_with_the_router_vote_of_eq_11(tiny):
    """One LoRALinear, two LoRA experts, a router (random W, b) with ω_r = 0.7 and a LoRA expert with ω_r = 0.3:
    O(x) = W x + Σ_i ω_l,i(x) s_i B_i A_i x, ω_l = 0.7 softmax(W_rᵀx + b_r) + 0.3 e_2, computed by hand per token."""
    torch.manual_seed(0)
    module = lora.LoRALinear(torch.nn.Linear(6, 5))
    for name in ("e1", "e2"):
        module.add(name, 2, 4, 0.0)
        torch.nn.init.normal_(module.lora_B[name])
    module.eval()
    router = hoe.Router([0.5, 0.5], ["e1", "e2"], {"m": 6}, [0.0, 0.0])
    torch.nn.init.normal_(router.layers[0].weight), torch.nn.init.normal_(router.layers[0].bias)
    plan = [(0.7, hoe.Expert("r", [0.5, 0.5], router)), (0.3, hoe.Expert("e2", [0, 1]))]
    names = ["e1", "e2"]
    x = torch.randn(3, 4, 6)
    model = torch.nn.Sequential(module)
    with lora.routed_adapters(model, names, hoe.gate(plan, names, {module: "m"})):
        out = module(x)
    vote = 0.7 * torch.softmax(x @ router.layers[0].weight.T + router.layers[0].bias, -1) + 0.3 * torch.tensor([0.0, 1.0])
    expected = x @ module.weight.T + module.bias
    for i, n in enumerate(names):
        expected = expected + vote[..., i:i + 1] * (2.0 * x @ module.lora_A[n].T @ module.lora_B[n].T)
    torch.testing.assert_close(out, expected)


def test_one_hot_preference_without_routers_decodes_exactly_as_that_expert(tiny):
    model, tokenizer = tiny
    model = with_adapters(model)
    experts = experts_from_adapters(model, prune=0.4)
    texts = prompts(6)
    import data
    ids, mask = data.encode_prompts(tokenizer, texts)
    decoder_input = torch.full((len(texts), 5), 3)
    for i, name in enumerate(OBJECTIVES):
        preference = [float(i == j) for j in range(3)]
        assert hoe.routing_plan(experts, preference) == [(1.0, experts.lora[i])]
        with hoe.at_preference(model, experts, preference):
            routed_logits = model(ids, mask, decoder_input)
            routed_tokens = greedy(model, tokenizer, texts)
        lora.set_adapter(model, f"expert_{name}")
        assert torch.equal(routed_logits, model(ids, mask, decoder_input))         # bit for bit
        assert torch.equal(routed_tokens, greedy(model, tokenizer, texts))
        lora.set_adapter(model, None)
        assert hoe.decode_at(model, tokenizer, texts, preference, experts, max_new_tokens=12) == \
            tokenizer.batch_decode(routed_tokens)


def test_unpruned_full_rank_experts_decode_as_the_original_adapters(tiny):
    model, tokenizer = tiny
    model = with_adapters(model)
    experts = experts_from_adapters(model, prune=0.0, rank=8)
    texts = prompts(6)
    for i, name in enumerate(OBJECTIVES):
        lora.set_adapter(model, name)
        original = greedy(model, tokenizer, texts)
        lora.set_adapter(model, None)
        with hoe.at_preference(model, experts, [float(i == j) for j in range(3)]):
            assert torch.equal(greedy(model, tokenizer, texts), original)
    with hoe.at_preference(model, experts, [0.5, 0.3, 0.2]):   # Eq. (3): the linear mixture of the experts
        mixed = greedy(model, tokenizer, texts)
    with lora.weighted_adapters(model, {"reflection": 0.5, "empathy": 0.3, "fluency": 0.2}):
        assert torch.equal(greedy(model, tokenizer, texts), mixed)


# ----------------------------------------------------------------------------- §3.2 router training
def test_one_stch_update_is_eq_18_by_hand():
    log_w = [math.log(0.2), math.log(0.3), math.log(0.5)]
    preference, rewards, alpha = [0.25, 0.25, 0.5], [0.6, 0.9, 0.3], 0.1
    by_hand = [math.log(0.2) + 0.1 * 0.25 * 0.4, math.log(0.3) + 0.1 * 0.25 * 0.1, math.log(0.5) + 0.1 * 0.5 * 0.7]
    total = sum(math.exp(v) for v in by_hand)
    updated = hoe.stch_update(log_w, preference, rewards, alpha)
    assert hoe.stch_weights(updated).tolist() == pytest.approx([math.exp(v) / total for v in by_hand], abs=1e-12)
    assert updated.tolist() == pytest.approx([v - math.log(total) for v in by_hand], abs=1e-12)
    ideal = hoe.stch_update(log_w, preference, rewards, alpha, ideal=[0.6, 0.9, 0.3])   # R = z*: no change
    assert ideal.tolist() == pytest.approx(log_w, abs=1e-12)


def response_length(prompt_list, responses):
    """A reward the two experts disagree on: the response's length, 16 characters or more = 1."""
    return torch.tensor([min(1.0, len(r) / 16) for r in responses])


def router_args(**overrides):
    args = dict(seed=0, device="cpu", batch_size=4, samples_per_prompt=3, max_new_tokens=8, lr=0.1, beta=0.0,
                grad_clip=2.0, alpha=0.1, top_k=0, ideal=None, steps=6, save_every=2, neighbours=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def learning_setup(tiny):
    """Two experts with random weights: 'one' mostly ends at once, 'two' writes; both objectives reward length,
    which the untrained router's 50/50 mixture rarely writes: the router should learn to route to 'two'."""
    model, tokenizer = tiny
    model = with_adapters(model, ["one", "two"], scale=1.0)
    experts = experts_from_adapters(model, names=["one", "two"])
    return model, tokenizer, experts, prompts(8), {"one": response_length, "two": response_length}


def weighted_greedy_score(model, tokenizer, router, texts, scorers, preference):
    """Σ λ_i R_i of the greedy responses of HoE with this router alone."""
    with hoe.routed(model, [(1.0, hoe.Expert("r", preference, router))]):
        responses = tokenizer.batch_decode(greedy(model, tokenizer, texts, 8))
    return hoe.weighted_score(hoe.evaluate.metrics(scorers, texts, responses, ["one", "two"]), ["one", "two"], preference)


def test_trained_router_beats_the_untrained_one_on_the_weighted_objective(tiny, tmp_path):
    model, tokenizer, experts, texts, scorers = learning_setup(tiny)
    preference = [0.5, 0.5]
    before = weighted_greedy_score(model, tokenizer, hoe.new_router(model, experts, preference, 2), texts, scorers, preference)
    summary = hoe.train_router(model, tokenizer, scorers, experts, preference, texts, router_args(steps=12),
                               str(tmp_path / "router"))
    trained = hoe.load_router(model, experts, str(tmp_path / "router"), summary)
    after = weighted_greedy_score(model, tokenizer, trained, texts, scorers, preference)
    print("weighted score untrained", before, "trained", after)
    assert after > before, (before, after)
    assert summary["trainable_parameters"] == sum(p.numel() for p in trained.parameters())
    rows = [json.loads(line) for line in (tmp_path / "router" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


RUN_ROUTER = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import pathlib, torch
torch.set_num_threads(1)
import hoe, test_hoe as T
folder, out, kill_at = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model, tokenizer, experts, texts, scorers = T.learning_setup(T.make_tiny(folder))
calls = [0]
def dying(prompts, responses):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)     # kill -9: no clean-up runs
    return T.response_length(prompts, responses)
scorers = dict(scorers, one=dying)
hoe.train_router(model, tokenizer, scorers, experts, [0.5, 0.5], texts, T.router_args(steps=7, save_every=2), out)
"""


def run_router(tmp_path, out, kill_at=0):
    script = RUN_ROUTER.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    (tmp_path / out).mkdir(exist_ok=True)
    folder = tmp_path / f"tiny-{out}-{kill_at}"
    folder.mkdir()
    return subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / out), str(kill_at)],
                          capture_output=True, text=True, timeout=300)


def test_router_training_resumes_after_kill_9_with_the_uninterrupted_result(tmp_path):
    assert run_router(tmp_path, "straight").returncode == 0
    killed = run_router(tmp_path, "resumed", kill_at=6)          # the scorer's 6th call: step 6, after step 4's checkpoint
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "summary.json").exists()
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = run_router(tmp_path, "resumed")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr
    straight, again = (load_safetensors(str(tmp_path / d / "router.safetensors")) for d in ("straight", "resumed"))
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)

    def curve(d):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / d / "train.jsonl").read_text().splitlines()]
    assert curve("straight") == curve("resumed") and len(curve("straight")) == 7
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["data_points"] == 28


def test_resume_refuses_another_preference(tiny, tmp_path):
    model, tokenizer, experts, texts, scorers = learning_setup(tiny)
    hoe.train_router(model, tokenizer, scorers, experts, [0.5, 0.5], texts, router_args(steps=2), str(tmp_path / "r"))
    with pytest.raises(InputError, match="preference"):
        hoe.train_router(model, tokenizer, scorers, experts, [0.4, 0.6], texts, router_args(steps=4), str(tmp_path / "r"))


# ----------------------------------------------------------------------------- bad preferences
@pytest.mark.parametrize("text, needle", [("0.5,0.5", "expected 3"), ("0.5,-0.2,0.7", "negative"), ("0,0,0", "zero"),
                                          ("nan,1,1", "nan"), ("a,1,1", "'a' is not a number"), ("inf,0,1", "finite")])
def test_bad_preferences_are_input_errors(text, needle):
    with pytest.raises(InputError, match=needle):
        hoe.parse_preference(text, 3)


def test_preferences_are_points_of_the_simplex():
    assert hoe.parse_preference("3,1,0", 3) == [0.75, 0.25, 0.0]
    assert len(hoe.parse_preferences(["e5"], 3)) == 13 and hoe.parse_preferences(None, 2) == [[0.5, 0.5]]
    with pytest.raises(InputError, match="3 objectives"):
        hoe.parse_preferences(["e5"], 2)


@pytest.mark.parametrize("text, needle", [("0.5,0.5", "expected 3"), ("0.5,-0.2,0.7", "negative"), ("0,0,0", "zero"),
                                          ("nan,1,1", "nan")])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_preference_on_the_command_line_is_one_error_line(tmp_path, capsys, command, text, needle):
    import emorl
    (tmp_path / "hoe").mkdir()
    (tmp_path / "hoe" / "hoe.json").write_text("{}")          # never read: the preference is refused first
    argv = (["hoe", "train", "--out", str(tmp_path / "hoe")] if command == "train" else
            ["evaluate", "--hoe", str(tmp_path / "hoe"), "--out", str(tmp_path / "ev"), "--runs", str(tmp_path / "runs"),
             "--search", str(tmp_path / "none.json")])
    assert emorl.main(argv + ["--preference", text]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


# ----------------------------------------------------------------------------- build, load, evaluate
def test_build_writes_experts_that_load_back_and_the_rescale_is_chosen_on_the_given_prompts(tiny, tmp_path):
    model, tokenizer = tiny
    model = with_adapters(model, ["one", "two"], scale=1.0)
    reference = copy.deepcopy(model)
    texts = prompts(6)
    scorers = {"one": response_length, "two": lambda p, r: 1 - response_length(p, r)}
    manifest = hoe.build_experts(model, tokenizer, scorers, ["one", "two"], texts, str(tmp_path / "hoe"), [[0.5, 0.5]],
                                 rank=8, prune=0.4, candidates=(0.5, 1.0, 2.0), sources=[str(tmp_path / "runs" / "one-0")])
    assert [e["name"] for e in manifest["experts"]] == ["expert_one", "expert_two", "expert_merged_0p5_0p5"]
    assert lora.adapter_names(model) == ["expert_one", "expert_two", "expert_merged_0p5_0p5"]   # sources dropped
    for e in manifest["experts"]:                           # the chosen factor is the best of the candidates tried
        assert e["rescale_scores"][f"{e['rescale']:g}"] == max(e["rescale_scores"].values())
    merged = manifest["experts"][2]
    tau = hoe.merge_vectors([hoe.objective_vectors(reference, n) for n in ("one", "two")], [0.5, 0.5])
    expected = hoe.task_svd(tau, 8, 0.4, merged["rescale"])
    loaded = copy.deepcopy(tiny[0])
    experts = hoe.load_hoe(loaded, str(tmp_path / "hoe"))
    assert [e.preference for e in experts.lora] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]] and experts.routers == []
    for path, m in hoe.lora_modules(loaded).items():
        A, B = expected[path]
        torch.testing.assert_close(m.lora_B["expert_merged_0p5_0p5"] @ m.lora_A["expert_merged_0p5_0p5"], B @ A)
    rows, report = hoe.evaluate_hoe(lambda: (copy.deepcopy(tiny[0]), tokenizer), scorers, texts, str(tmp_path / "hoe"),
                                    [[1.0, 0.0], [0.3, 0.7]], ["one", "two"])
    assert list(rows) == ["hoe 1,0", "hoe 0.3,0.7"]
    assert [p["plan"] for p in report["preferences"]][0] == [[1.0, "expert_one"]]
    assert report["preferences"][1]["plan"] == [[pytest.approx(0.6), "expert_merged_0p5_0p5"], [pytest.approx(0.4), "expert_two"]]
    assert report["consumption"]["trainable parameters"] == 0 and rows["hoe 1,0"][0]["decoding"] == "greedy"
