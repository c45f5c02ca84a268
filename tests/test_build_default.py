"""data/build_default.py: a reduced build is deterministic (same seed -> same files and metrics) and its
folders load through the project's loaders; the committed data/default/ assets behave as the embedded world
was designed: the policy samples short responses and starts low, each scorer rewards the kinds of response it
was designed for (the trade-off), the autonomy classifier ranks held-out autonomy-labelled responses above
advice far better than the other three."""
import json
import os

import pytest
import torch

import data
import rewards
import t5
from data import build_default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = os.path.join(ROOT, data.DEFAULT_DATA)
EMPATHY = os.path.join(ROOT, data.DEFAULT_EMPATHY)
AUTONOMY = os.path.join(ROOT, data.DEFAULT_AUTONOMY)
ASSETS = os.path.join(ROOT, "data", "default")
FOLDERS = ("policy",) + rewards.OBJECTIVES + ("autonomy",)

needs_data = pytest.mark.skipif(not (os.path.isfile(PAIR) and os.path.isfile(EMPATHY)),
                                reason="data/pair_sample.csv or data/pair_empathy.csv not merged yet")
needs_assets = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "metrics.json")),
                                  reason="data/default/ not built (python emorl.py build-default --force)")


def file_bytes(directory):
    return {os.path.relpath(os.path.join(folder, name), directory): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(directory) for name in names if name != "metrics.json"}


def without_seconds(metrics):
    return {k: v for k, v in metrics.items() if k != "seconds"}


def heldout_examples(count):
    splits = data.split_dataset(data.load_pair(PAIR), build_default.SPLIT_SEED)
    return (splits["aggregation"] + splits["inference"])[:count]


@pytest.fixture(scope="module")
def reduced_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    outs = {name: str(root / name) for name in ("first", "again", "other_seed")}
    metrics = {name: build_default.build(out, seed=1 if name == "other_seed" else 0, scale=0.01)
               for name, out in outs.items()}
    return outs, metrics


@needs_data
def test_reduced_build_is_deterministic(reduced_builds):
    outs, metrics = reduced_builds
    first, again = (json.load(open(os.path.join(outs[n], "metrics.json"))) for n in ("first", "again"))
    assert without_seconds(first) == without_seconds(again) == without_seconds(metrics["first"])
    assert set(first["seconds"]) == {"policy", "reflection", "empathy", "fluency", "autonomy", "evaluate", "total"}
    files = file_bytes(outs["first"])
    assert {path.split(os.sep)[0] for path in files} == set(FOLDERS)
    assert files == file_bytes(outs["again"])
    other = file_bytes(outs["other_seed"])   # the seed is really used
    assert other["policy/model.safetensors"] != files["policy/model.safetensors"]
    assert other["fluency/model.safetensors"] != files["fluency/model.safetensors"]
    assert other["autonomy/model.safetensors"] != files["autonomy/model.safetensors"]
    assert files["autonomy/vocab.txt"] == files["empathy/vocab.txt"]       # the empathy scorer's WordPiece vocabulary
    assert first["bytes"]["total"] == sum(len(b) for b in files.values())


@needs_data
def test_reduced_build_loads_through_the_project_loaders(reduced_builds):
    out = reduced_builds[0]["first"]
    model, tokenizer = t5.load_t5(os.path.join(out, "policy"))
    assert model.config.feed_forward_proj == "relu" and model.config.tie_word_embeddings
    assert tokenizer.sp.piece_to_id("[SEP]") != tokenizer.unk_id          # user-defined piece
    assert "[SEP]" in tokenizer.sp.encode(data.policy_input("I feel tired."), out_type=str)
    scorers = rewards.load_scorers({name: os.path.join(out, name) for name in rewards.OBJECTIVES})
    prompts, responses = ["I can't sleep at night."] * 2, ["You are worried.", "Drink less coffee."]
    for name, scorer in scorers.items():
        scores = scorer(prompts, responses)
        assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all()), name
    for name in FOLDERS:   # Hugging Face layout
        config = json.load(open(os.path.join(out, name, "config.json")))
        assert config["model_type"] == {"policy": "t5", "reflection": "roberta", "empathy": "bert", "fluency": "gpt2",
                                        "autonomy": "bert"}[name]
        assert config["architectures"]
    config = json.load(open(os.path.join(out, "autonomy", "config.json")))
    assert (config["num_labels"], config["id2label"], config["label2id"]) == (2, {"0": "advice", "1": "autonomy"},
                                                                             {"advice": 0, "autonomy": 1})
    scores = build_default.LabelProbability(os.path.join(out, "autonomy"), "autonomy")(prompts, responses)
    assert scores.shape == (2,) and bool(((scores > 0) & (scores < 1)).all())


def test_auc_is_the_probability_high_beats_low():
    assert build_default.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert build_default.auc([0.1], [0.9]) == 0.0
    assert build_default.auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


@needs_assets
@needs_data
def test_committed_policy_samples_short_responses_and_starts_low():
    """The warm-started policy was taught every kind of response at once: its top-50 samples are short
    responses that end with </s> (a few may loop to the limit), and its greedy output scores low on
    reflection and empathy (metrics.json), so each objective's adapter has to learn its objective."""
    model, tokenizer = t5.load_t5(os.path.join(ASSETS, "policy"))
    prompts = [e.prompt for e in heldout_examples(16)]
    ids, mask = tokenizer.batch_encode([data.policy_input(p) for p in prompts], max_length=128)
    tokens, _ = t5.generate(model, ids, mask, max_new_tokens=64, do_sample=True, top_k=50,
                            generator=torch.Generator().manual_seed(0))
    ended = [tokenizer.eos_id in row and row.index(tokenizer.eos_id) >= 3 for row in tokens.tolist()]
    assert sum(ended) >= 12, ended
    metrics = json.load(open(os.path.join(ASSETS, "metrics.json")))["policy"]
    assert metrics["greedy_scores"]["empathy"] < 0.6     # (its greedy output opens "You're ...": reflection 0.79 greedy, 0.37 sampled)


@needs_assets
@needs_data
def test_committed_scorers_reward_the_kinds_they_were_designed_for():
    """The embedded world's designed trade-off (README, "The embedded default"), on held-out prompts:
    reflection rates every reflection (hq, mq) far above every other kind; empathy rates the generic
    sympathy (lq1) above the feeling reflection (hq1), and that above the reflections of facts and meaning
    (hq2, mq1): the response empathy wants most is one reflection rates lowest; fluency prefers the stock
    sympathy to the reflections; autonomy rates the advice (lq2) lowest."""
    examples = heldout_examples(24)
    scorers = rewards.load_scorers({name: os.path.join(ASSETS, name) for name in rewards.OBJECTIVES})
    scorers["autonomy"] = build_default.LabelProbability(os.path.join(ASSETS, "autonomy"), "autonomy")
    mean = {name: {c: scorer([e.prompt for e in examples], [e.responses[c] for e in examples]).mean().item()
                   for c in data.RESPONSE_COLUMNS} for name, scorer in scorers.items()}
    reflection, empathy, fluency, autonomy = (mean[n] for n in ("reflection", "empathy", "fluency", "autonomy"))
    assert min(reflection[c] for c in ("hq1", "hq2", "mq1")) > 0.5 > 0.1 > max(reflection[c] for c in build_default.LQ)
    assert empathy["lq1"] > empathy["hq1"] + 0.3 and empathy["hq1"] > max(empathy["hq2"], empathy["mq1"]) + 0.1
    assert reflection["lq1"] < 0.1
    assert fluency["lq1"] > max(fluency[c] for c in ("hq1", "hq2", "mq1"))
    assert autonomy["lq2"] < 0.5 < min(v for c, v in autonomy.items() if c != "lq2")
    metrics = json.load(open(os.path.join(ASSETS, "metrics.json")))
    assert metrics["reflection"]["auc_hq_vs_lq"] > 0.9
    assert metrics["fluency"]["hq_mean"] > 0.1                  # (50 - ppl) / 50 is not 0 everywhere
    assert metrics["bytes"]["total"] <= 25_000_000


@needs_assets
@needs_data
def test_committed_autonomy_model_ranks_autonomy_above_advice():
    """On the 40 held-out prompts: P(autonomy-labelled response scores above an advice-labelled one) is high,
    equals metrics.json, and stays high among the poor (lq) responses alone, where reflection, empathy
    and fluency do not separate the two (the fourth objective measures something the three do not)."""
    splits = data.split_dataset(data.load_pair(PAIR), build_default.SPLIT_SEED)
    heldout = {e.prompt for e in splits["aggregation"] + splits["inference"]}
    rows = [row for row in data.load_autonomy_labels(AUTONOMY, PAIR) if row[0] in heldout]
    poor = {e.responses[c] for e in splits["aggregation"] + splits["inference"] for c in build_default.LQ}
    autonomy = build_default.LabelProbability(os.path.join(ASSETS, "autonomy"), "autonomy")
    scorers = {**rewards.load_scorers({name: os.path.join(ASSETS, name) for name in rewards.OBJECTIVES}), "autonomy": autonomy}

    def auc(scorer, subset):
        scores = scorer([p for p, _, _ in subset], [r for _, r, _ in subset])
        return build_default.auc(scores[[label == 1 for *_, label in subset]], scores[[label == 0 for *_, label in subset]])
    metrics = json.load(open(os.path.join(ASSETS, "metrics.json")))
    assert auc(autonomy, rows) == pytest.approx(metrics["autonomy"]["auc_autonomy_vs_advice"], abs=1e-6)
    assert metrics["autonomy"]["auc_autonomy_vs_advice"] > 0.85
    assert metrics["autonomy"]["heldout_advice"] == sum(label == 0 for *_, label in rows) > 30
    lq_rows = [row for row in rows if row[1] in poor]
    lq_auc = {name: auc(scorer, lq_rows) for name, scorer in scorers.items()}
    assert lq_auc["autonomy"] > 0.8 and lq_auc["autonomy"] > max(lq_auc[name] for name in rewards.OBJECTIVES) + 0.15, lq_auc
    assert metrics["bytes"]["autonomy"] <= 1_000_000


@needs_assets
def test_committed_folders_load_in_hugging_face_with_the_same_outputs():
    """Oracle: transformers reads each folder (config.json, weights, tokenizer) and computes what ours does."""
    transformers = pytest.importorskip("transformers")
    prompts, responses = ["I can't sleep at night, my head keeps spinning."] * 2, ["You are worried about work.", "Drink less coffee."]
    empathy = rewards.EmpathyScorer.from_dir(os.path.join(ASSETS, "empathy"))
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(os.path.join(ASSETS, "empathy"))
    hf_model = transformers.BertForSequenceClassification.from_pretrained(os.path.join(ASSETS, "empathy")).eval()
    with torch.no_grad():
        logits = hf_model(**hf_tokenizer(prompts, responses, return_tensors="pt", padding=True)).logits[:, 0]
    torch.testing.assert_close(logits.clamp(0, 1), empathy(prompts, responses), atol=1e-5, rtol=1e-5)

    fluency = rewards.FluencyScorer.from_dir(os.path.join(ASSETS, "fluency"))
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(ASSETS, "fluency")).eval()
    ids = torch.tensor([fluency.tokenizer.encode(prompts[0]) + fluency.tokenizer.encode(responses[0])])
    with torch.no_grad():
        perplexity = hf_model(ids, labels=ids).loss.exp()
    torch.testing.assert_close(perplexity[None], fluency.perplexity(prompts[:1], responses[:1]), atol=1e-3, rtol=1e-4)

    reflection = rewards.ReflectionScorer.from_dir(os.path.join(ASSETS, "reflection"))
    hf_model = transformers.RobertaModel.from_pretrained(os.path.join(ASSETS, "reflection"), add_pooling_layer=False).eval()
    with torch.no_grad():
        cls = hf_model(**reflection.tokenizer.batch_encode_roberta(prompts, responses)).last_hidden_state[:, 0]
        scores = torch.sigmoid(reflection.model.head(cls)).squeeze(-1)
    torch.testing.assert_close(scores, reflection(prompts, responses), atol=1e-5, rtol=1e-5)

    autonomy = build_default.LabelProbability(os.path.join(ASSETS, "autonomy"), "autonomy")
    hf_model = transformers.BertForSequenceClassification.from_pretrained(os.path.join(ASSETS, "autonomy")).eval()
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(os.path.join(ASSETS, "autonomy"))
    with torch.no_grad():
        probability = hf_model(**hf_tokenizer(prompts, responses, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert hf_model.config.id2label == {0: "advice", 1: "autonomy"}
    torch.testing.assert_close(probability[:, 1], autonomy(prompts, responses), atol=1e-5, rtol=1e-5)

    model, tokenizer = t5.load_t5(os.path.join(ASSETS, "policy"))
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(os.path.join(ASSETS, "policy")).eval()
    ids, mask = tokenizer.batch_encode([data.policy_input(p) for p in prompts[:1]])
    decoder_input = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input).logits
        torch.testing.assert_close(model(ids, mask, decoder_input), expected, atol=1e-4, rtol=1e-4)
