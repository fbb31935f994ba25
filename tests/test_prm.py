"""PRM: token alignment on several tokenizers, the step loss, step metrics, the scorer, and the prm stage."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from alignkit.rewards.prm import (
    IGNORE,
    PRMScorer,
    encode_steps,
    ranking_pairs,
    read_prm_config,
    separator_ids,
    solution_logits,
    solution_ranking_loss,
    split_steps,
    step_loss,
    step_metrics,
    step_targets,
    token_labels,
)

PROMPT = "Mia has 12 marbles. She gets 7 more, then gives away 5. How many marbles does Mia have now?\n"
STEPS = ["Add 7: 12 + 7 = 19.", "Subtract 5: 19 - 5 = 14.", "The answer is 14."]
SEPARATORS = ["\n", "\n\n", " ки"]


# ------------------------------------------------------------------------------------------- tokenizers


def char_tokenizer():
    """One token per character (a WordLevel vocabulary over single characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(PROMPT + "".join(STEPS) + "".join(SEPARATORS) + "abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<unk>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def metaspace_tokenizer():
    """A sentencepiece-style Unigram with a ``▁`` prefix on every piece tokenized on its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted(set(PROMPT + "".join(STEPS) + "".join(SEPARATORS)))
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>"], unk_token="<unk>",
                                      initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator([PROMPT + "\n".join(STEPS)] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")


def tiny_bpe():
    from alignkit.testing import make_tokenizer

    return make_tokenizer()


def check_alignment(tokenizer, separator: str) -> None:
    """Labels land on the last token of each separator, every step is kept, prefixes are consistent."""
    sep = separator_ids(tokenizer, separator)
    encoded = encode_steps(tokenizer, PROMPT, STEPS, separator)
    ids, ends = encoded.input_ids, encoded.step_ends
    assert len(ends) == len(STEPS) and ends[-1] == len(ids) - 1
    prompt_len = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    starts = [prompt_len] + [e + 1 for e in ends[:-1]]
    for i, (start, end) in enumerate(zip(starts, ends)):
        assert ids[end - len(sep) + 1: end + 1] == sep  # the scored token ends a separator
        assert ids[start: end + 1 - len(sep)] == tokenizer(STEPS[i], add_special_tokens=False)["input_ids"]
        assert encoded.step_spans[i] == (start, end + 1 - len(sep))  # what the lm-logprob head sums over
        # A prefix of the solution lays out exactly as the start of the whole: a causal PRM's score of
        # step i cannot depend on later steps, and label-stage prefixes score like the full solution.
        assert encode_steps(tokenizer, PROMPT, STEPS[: i + 1], separator).input_ids == ids[: end + 1]
    labels = token_labels(encoded, [1.0, 0.0, 0.0])
    assert [i for i, v in enumerate(labels) if v != IGNORE] == ends
    assert [labels[e] for e in ends] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("separator", SEPARATORS)
@pytest.mark.parametrize("make", [tiny_bpe, char_tokenizer, metaspace_tokenizer])
def test_labels_land_on_separator_tokens(make, separator):
    check_alignment(make(), separator)


def test_multi_token_separators_exist_in_the_tested_tokenizers():
    # The alignment test would be weak if every separator were one token: check that it is not.
    assert len(separator_ids(char_tokenizer(), "\n\n")) == 2
    assert len(separator_ids(metaspace_tokenizer(), "\n")) >= 2  # "▁" prefix + newline


@pytest.mark.e2e
@pytest.mark.parametrize("separator", SEPARATORS)
def test_labels_land_on_separator_tokens_smollm2(smollm2_dir, separator):
    from alignkit.modeling.models import load_tokenizer

    check_alignment(load_tokenizer(str(smollm2_dir)), separator)


@pytest.mark.e2e
def test_searching_the_merged_text_would_miss_the_separator(smollm2_dir):
    # Why encode_steps tokenizes piece by piece: SmolLM2 spells "\n\n" alone as one token (1116) but as
    # two "\n" tokens between steps ("19.\n\nSubtract"), so a search for the separator's ids in the merged
    # text finds only the final one: 1 of 3 step ends.
    from alignkit.modeling.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    sep = separator_ids(tokenizer, "\n\n")
    merged = tokenizer(PROMPT + "\n\n".join(STEPS) + "\n\n", add_special_tokens=False)["input_ids"]
    assert sep == [1116] and merged.count(1116) == 1
    assert len(encode_steps(tokenizer, PROMPT, STEPS, "\n\n").step_ends) == 3


def test_truncation_keeps_whole_steps_only():
    tokenizer = char_tokenizer()
    full = encode_steps(tokenizer, PROMPT, STEPS, "\n")
    cut = encode_steps(tokenizer, PROMPT, STEPS, "\n", max_length=full.step_ends[1] + 3)
    assert cut.step_ends == full.step_ends[:2] and cut.input_ids == full.input_ids[: full.step_ends[1] + 1]
    none = encode_steps(tokenizer, PROMPT, STEPS, "\n", max_length=len(PROMPT) + 2)  # 1 char per token
    assert none.step_ends == [] and none.input_ids == full.input_ids[: len(PROMPT)]
    assert len(encode_steps(tokenizer, PROMPT, STEPS, "\n", max_length=50).input_ids) == 50


def test_split_steps_and_targets():
    assert split_steps("a\n\n b \n", "\n") == ["a", "b"]
    assert split_steps("a ки b ки", " ки") == ["a", "b"]
    assert step_targets([True, False, False]) == [1.0, 0.0, 0.0]
    assert step_targets([True, True], [0.25, 0.5]) == [0.25, 0.5]
    assert step_targets([True, True, False], last_step_only=True) == [None, None, 0.0]


# ------------------------------------------------------------------------------------------------- maths


def test_step_loss_hard_targets_equal_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 2)
    targets = torch.tensor([[IGNORE, 1, IGNORE, 0, IGNORE], [IGNORE, IGNORE, 1, IGNORE, IGNORE]]).float()
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 2), targets.view(-1).long(), ignore_index=IGNORE)
    assert torch.allclose(step_loss(logits, targets), expected, atol=1e-6)
    # with the Trainer's count over an accumulated batch of 6 labelled positions: sum / 6
    assert torch.allclose(step_loss(logits, targets, num_items=6), expected * 3 / 6, atol=1e-6)


def test_step_loss_soft_targets_equal_bce_on_logit_difference():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 2)
    targets = torch.tensor([[0.25, IGNORE, 0.9, 0.0]])
    mask = targets != IGNORE
    diff = logits[..., 1] - logits[..., 0]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(diff[mask], targets[mask])
    assert torch.allclose(step_loss(logits, targets), expected, atol=1e-6)
    # a hand-worked position: logits (0, 0) -> p = 0.5 -> loss log 2 whatever the target
    assert math.isclose(step_loss(torch.zeros(1, 1, 2), torch.tensor([[0.3]])).item(), math.log(2), rel_tol=1e-6)


def test_step_loss_with_nothing_labelled_is_zero():
    loss = step_loss(torch.randn(1, 3, 2, requires_grad=True), torch.full((1, 3), float(IGNORE)))
    assert loss.item() == 0.0 and loss.requires_grad


def margins_to_logits(margins):
    """[B, T] step margins z -> [B, T, 2] logits (0, z), so z_good - z_bad = z."""
    z = torch.tensor(margins, dtype=torch.float32)
    return torch.stack([torch.zeros_like(z), z], dim=-1)


def test_solution_logits_by_hand():
    logits = margins_to_logits([[9.0, 1.0, 9.0, -2.0, 3.0], [5.0, 4.0, 9.0, 9.0, 9.0]])
    targets = torch.tensor([[IGNORE, 1, IGNORE, 0, 1], [0, IGNORE, IGNORE, IGNORE, IGNORE]]).float()
    # row 0 labels z = (1, -2, 3) at positions 1, 3, 4; row 1 labels z = 5 at position 0
    assert solution_logits(logits, targets, "min").tolist() == [-2.0, 5.0]
    assert solution_logits(logits, targets, "last").tolist() == [3.0, 5.0]
    assert torch.allclose(solution_logits(logits, targets, "mean"), torch.tensor([2 / 3, 5.0]))
    logsig = torch.nn.functional.logsigmoid
    expected_prod = torch.tensor([logsig(torch.tensor(1.0)) + logsig(torch.tensor(-2.0)) + logsig(torch.tensor(3.0)),
                                  logsig(torch.tensor(5.0))])
    assert torch.allclose(solution_logits(logits, targets, "prod"), expected_prod)
    # the ordering matches aggregate_steps on p_good = sigmoid(z), which is what PRMScorer ranks by
    from alignkit.maths.selection import aggregate_steps
    for how in ("min", "last", "prod"):
        by_prob = [aggregate_steps(torch.sigmoid(torch.tensor(z)).tolist(), how) for z in ([1.0, -2.0, 3.0], [5.0])]
        assert (by_prob[0] < by_prob[1]) == bool(solution_logits(logits, targets, how)[0] < solution_logits(
            logits, targets, how)[1])
    nothing = torch.full((1, 5), float(IGNORE))
    assert solution_logits(logits[:1], nothing, "min").tolist() == [0.0]
    with pytest.raises(ValueError, match="aggregation must be one of"):
        solution_logits(logits, targets, "max")


def test_ranking_pairs_within_groups_only():
    assert ranking_pairs([[True, False, False], [False], [False, True]]) == [(0, 1), (0, 2), (5, 4)]
    assert ranking_pairs([[True, True], [False, False]]) == []  # no mixed group, no pair


def test_solution_ranking_loss_by_hand_and_its_gradient():
    # min-aggregated scores: row 0 (right) -> 1.0, row 1 (wrong) -> 3.0, row 2 (wrong) -> -1.0
    logits = margins_to_logits([[1.0, 4.0], [3.0, 5.0], [-1.0, 2.0]]).requires_grad_()
    targets = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    pairs = torch.tensor([[0, 1], [0, 2]])
    loss = solution_ranking_loss(logits, targets, pairs, "min")
    # mean of -log sigmoid(1 - 3) and -log sigmoid(1 - (-1))
    expected = (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    grad_z = logits.grad[..., 1]  # d loss / d z (the good logit moves z one for one)
    assert grad_z[0, 0] < 0 and grad_z[1, 0] > 0 and grad_z[2, 0] > 0  # descent lifts right, lowers wrong
    assert grad_z[0, 1] == 0 and grad_z[1, 1] == 0  # only each row's minimum step carries the gradient
    empty = solution_ranking_loss(logits, targets, torch.zeros((0, 2), dtype=torch.long), "min")
    assert empty.item() == 0.0 and empty.requires_grad


def test_step_metrics_by_hand():
    probs = [[0.9, 0.2, 0.1], [0.8, 0.7], [0.6, 0.4], [0.9, 0.9]]
    labels = [[True, False, False], [True, True], [False, False], [True, True]]
    m = step_metrics(probs, labels)
    # predicted bad: row0 steps 1,2 (right); row1 none (right); row2 step 1 only (step 0 wrong); row3 none
    assert m["step_accuracy"] == pytest.approx(8 / 9)
    assert m["step_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # tp 3, fp 0, fn 1
    assert m["first_error_found"] == pytest.approx(1 / 2)  # row0 found at 1; row2 flagged at 1, truth 0
    assert m["no_error_kept"] == 1.0


# ------------------------------------------------------------------------------------------------ scorer


@pytest.fixture(scope="module")
def scorer(tiny_tokencls_dir):
    return PRMScorer(str(tiny_tokencls_dir), batch_size=2)


def test_scorer_reads_scores_at_step_ends(scorer):
    encoded = scorer.encode("What is 3 + 4?", ["Add 4: 3 + 4 = 7.", "The answer is 7."])
    with torch.no_grad():
        logits = scorer.model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
    expected = torch.softmax(logits, -1)[encoded.step_ends, 1].tolist()
    scores = scorer.score_steps("What is 3 + 4?", ["Add 4: 3 + 4 = 7.", "The answer is 7."])
    assert scores == pytest.approx(expected, abs=1e-6) and all(0.0 < s < 1.0 for s in scores)


def test_scorer_batches_like_one_by_one(scorer):
    prompts = ["What is 3 + 4?", "Tom has 3 apples. He buys 4 more. How many apples does he have?", "Q?"]
    steps = [["Add 4: 3 + 4 = 7.", "The answer is 7."], ["Start with 3.", "Add 4: 3 + 4 = 7.", "The answer is 7."],
             []]
    batched = scorer.score_batch(prompts, steps)  # batch_size 2: padding and sorting are exercised
    assert batched[2] == []
    for prompt, solution, scores in zip(prompts[:2], steps[:2], batched[:2]):
        assert scores == pytest.approx(scorer.score_steps(prompt, solution), abs=1e-5)
    # causal model: the score of a prefix's steps equals the first scores of the whole solution
    assert scorer.score_steps(prompts[1], steps[1][:2]) == pytest.approx(batched[1][:2], abs=1e-5)


def test_scorer_aggregates_and_serves_as_a_reward_function(scorer):
    prompt, steps = "What is 3 + 4?", ["Add 4: 3 + 4 = 7.", "The answer is 7."]
    scores = scorer.score_steps(prompt, steps)
    assert scorer.score_solution(prompt, steps) == pytest.approx(min(scores))  # default: min
    assert scorer.score_solution(prompt, steps, how="prod") == pytest.approx(scores[0] * scores[1])
    rewards = scorer(["Add 4: 3 + 4 = 7.\nThe answer is 7.", [{"role": "assistant", "content": ""}]],
                     prompts=[prompt, [{"role": "user", "content": prompt}]], answer=["7", "7"])
    assert rewards[0] == pytest.approx(min(scores), abs=1e-5) and rewards[1] == 0.0
    assert scorer.__name__ == "prm"
    with pytest.raises(ValueError, match="prompts"):
        scorer(["x"])


# ----------------------------------------------------------------------------------------------- stage

RECIPE = """
name: prm-test
tracking: {report_to: none}
stages:
  - kind: prm
    model: MODEL
    # eval on the training rows: a 2-layer random model can memorise 8 rows but not generalise
    data: {source: arith, params: {n: 8, steps: 2, max_operand: 9}}
    eval_data: {source: arith, params: {n: 8, steps: 2, max_operand: 9}}
    lr: 3.0e-3
    max_steps: 20
    batch_size: 8
    logging_steps: 1
    save_steps: 10
    max_length: 160
  - kind: prm
    name: orm
    model: MODEL
    data: {source: arith, params: {n: 24, steps: 2, max_operand: 9}, eval_size: 8}
    train_on_last_step_only: true
    lora: {r: 4, alpha: 8, dropout: 0.0}
    max_steps: 2
    batch_size: 8
    max_length: 160
"""


def test_prm_stage_trains_saves_and_scores(tmp_path, tiny_model_dir):
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    path = tmp_path / "prm.yaml"
    path.write_text(textwrap.dedent(RECIPE).replace("MODEL", str(tiny_model_dir)))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    prm, orm = (o.metrics for o in run_recipe(recipe, echo=lambda *_: None))

    # 8 rows of 3 steps (2 operations + the answer line), every step labelled; memorised in 20 steps
    assert prm["train_rows"] == 8 and prm["train_labelled_steps"] == 24 and prm["rows_dropped"] == 0
    assert prm["train_steps"] == 20 and prm["last_logged_loss"] < 0.2 * prm["first_logged_loss"]
    assert prm["step_accuracy_before"] < 0.8 and prm["step_accuracy"] == 1.0 and prm["first_error_found"] == 1.0
    assert orm["train_labelled_steps"] == 16  # the ORM sees one label per row: the final step's

    model_dir = recipe.stage("prm").run_dir / "model"
    assert read_prm_config(model_dir) == {"separator": "\n", "chat": True, "aggregation": "min",
                                          "train_on_last_step_only": False, "head": "token-cls-2"}
    orm_dir = recipe.stage("orm").run_dir
    assert json.loads((orm_dir / "model" / "alignkit_prm.json").read_text())["aggregation"] == "last"
    assert (orm_dir / "adapter" / "adapter_config.json").is_file()
    scores = PRMScorer(str(orm_dir / "model")).score_steps("What is 1 + 2?", ["Add 2: 1 + 2 = 3.", "The answer is 3."])
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_soft_labels_are_the_targets_and_need_the_column():
    from alignkit.core.errors import DataError
    from alignkit.stages import prm as stage

    config = stage.Config(model="m", data={"source": "arith"}, soft_labels=True)
    row = {"prompt": "Q?", "completions": ["a", "b"], "labels": [True, False], "soft_labels": [0.75, 0.0]}
    (example,), _ = stage.encode_dataset([row], tiny_bpe(), config)
    assert [v for v in example["labels"] if v != IGNORE] == [0.75, 0.0]
    assert example["step_labels"] == [True, False]  # eval compares with the hard labels
    with pytest.raises(DataError, match="row 1: soft_labels: true needs a 'soft_labels' column"):
        stage.encode_dataset([row, {k: v for k, v in row.items() if k != "soft_labels"}], tiny_bpe(), config)


def test_orm_target_is_the_solutions_own_correctness():
    """train_on_last_step_only: the one target is solution_correct (hard or soft labels alike), else, for
    rows without that column (public Math-Shepherd, TRL), the last step's label; the PRM keeps every step's."""
    from alignkit.stages import prm as stage

    cut_off = {"prompt": "Q?", "completions": ["3 + 4 = 7", "7 * 2 = 14", "So the total"], "answer": "14",
               "labels": [True, True, True], "soft_labels": [1.0, 1.0, 0.5], "solution_correct": False}
    lucky = dict(cut_off, labels=[True, False], soft_labels=[1.0, 0.0], completions=["a", "The answer is 14."],
                 solution_correct=True)  # not a case the label stage writes, but the column wins
    unlabelled = {k: v for k, v in cut_off.items() if k != "solution_correct"}

    def targets(row, **options):
        config = stage.Config(model="m", data={"source": "arith"}, **options)
        (example,), _ = stage.encode_dataset([row], tiny_bpe(), config)
        return [v for v in example["labels"] if v != IGNORE]

    for soft in (False, True):
        assert targets(cut_off, train_on_last_step_only=True, soft_labels=soft) == [0.0]
        assert targets(lucky, train_on_last_step_only=True, soft_labels=soft) == [1.0]
    assert targets(unlabelled, train_on_last_step_only=True) == [1.0]
    assert targets(unlabelled, train_on_last_step_only=True, soft_labels=True) == [0.5]
    assert targets(cut_off) == [1.0, 1.0, 1.0] and targets(cut_off, soft_labels=True) == [1.0, 1.0, 0.5]
    assert step_targets([True, True], last_step_only=True, solution_correct=False) == [None, 0.0]


def test_stage_reads_math_shepherd_prm800k_and_trl_rows(tmp_path):
    from alignkit.data import load_dataset, split_eval
    from alignkit.stages import prm as stage

    shepherd = "Q? Step 1: 1+1=2 ки\nStep 2: 2*3=6 ки\nStep 3: The answer is 7 ки"
    files = {
        "shepherd.jsonl": {"input": shepherd, "label": shepherd.replace("2 ки", "2 +").replace("6 ки", "6 +")
                           .replace("7 ки", "7 -")},
        "prm800k.jsonl": {"prompt": "Q?", "steps": ["a", "b", "c"], "ratings": [1, 0, -1]},
        "trl.jsonl": {"prompt": "Q?", "completions": ["a", "b", "c"], "labels": [True, True, False]},
    }
    tokenizer = tiny_bpe()
    for name, row in files.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        params = {"neutral": "positive"} if name.startswith("prm800k") else {}
        config = stage.Config(model="m", data={"source": str(tmp_path / name), "params": params})
        rows, held_out = stage._load_rows(config, load_dataset, split_eval)
        assert held_out is None and rows[0]["labels"] == [True, True, False]
        (example,), dropped = stage.encode_dataset(rows, tokenizer, config)
        labelled = [v for v in example["labels"] if v != IGNORE]
        assert dropped == 0 and labelled == [1.0, 1.0, 0.0] and example["step_labels"] == [True, True, False]


def two_solutions_per_prompt(path, n: int = 12):
    """Stepwise rows, two per prompt: the right solution and one whose result is one too high or too low."""
    rows = []
    for i in range(n):
        a, b = 2 + i % 7, 3 + (5 * i) % 6
        for right in (True, False):
            c = a + b if right else a + b + (1 if i % 2 else -1)
            rows.append({"prompt": f"What is {a} + {b}?", "completions": [f"{a} + {b} = {c}.", f"The answer is {c}."],
                         "labels": [right, right], "solution_correct": right})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_collator_flattens_prompt_groups_and_pairs_their_solutions():
    from alignkit.stages import prm as stage

    rows = [{"prompt": "Q1", "completions": ["a"], "labels": [True]},
            {"prompt": "Q2", "completions": ["b"], "labels": [True], "solution_correct": False},
            {"prompt": "Q1", "completions": ["c"], "labels": [False]},
            {"prompt": "Q1", "completions": ["d"], "labels": [True]}]
    config = stage.Config(model="m", data={"source": "arith"}, ranking_loss_weight=1.0)
    examples, _ = stage.encode_dataset(rows, tiny_bpe(), config)
    assert [e["correct"] for e in examples] == [True, False, False, True]  # solution_correct wins over labels
    groups = stage.group_by_prompt(examples)
    assert [[e["input_ids"] for e in g["solutions"]] for g in groups] == [
        [examples[0]["input_ids"], examples[2]["input_ids"], examples[3]["input_ids"]], [examples[1]["input_ids"]]]
    batch = stage.Collator(pad_id=0)(list(reversed(groups)))  # Q2 first: its one row is row 0
    assert batch["input_ids"].shape[0] == 4 and batch["ranking_pairs"].tolist() == [[1, 2], [3, 2]]
    assert "ranking_pairs" not in stage.Collator(pad_id=0)(examples)


def test_prm_trainer_adds_the_weighted_ranking_term(tmp_path, tiny_tokencls_dir):
    from transformers import AutoModelForTokenClassification, TrainingArguments

    from alignkit.stages import prm as stage

    rows = two_solutions_per_prompt(tmp_path / "rows.jsonl", n=2)
    tokenizer = tiny_bpe()
    config = stage.Config(model="m", data={"source": "arith"}, ranking_loss_weight=0.5)
    examples, _ = stage.encode_dataset(rows, tokenizer, config)
    batch = stage.Collator(tokenizer.pad_token_id)(stage.group_by_prompt(examples))
    model = AutoModelForTokenClassification.from_pretrained(tiny_tokencls_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), gradient_accumulation_steps=2, report_to=[])
    trainer = stage.prm_trainer(ranking_loss_weight=0.5, aggregation="min", head="token-cls", logprob_offset=0.0,
                                model=model, args=args, compute_loss_func=stage.loss_func)
    trainer.current_gradient_accumulation_steps = 2
    pairs, labels = batch["ranking_pairs"], batch["labels"]
    assert pairs.tolist() == [[0, 1], [2, 3]]
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(16))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = step_loss(logits, labels, 16) + 0.5 * solution_ranking_loss(logits, labels, pairs, "min") / 2
    assert torch.allclose(loss, expected, atol=1e-5)


RANKING_RECIPE = """
name: prm-ranking
tracking: {report_to: none}
stages:
  - kind: prm
    model: MODEL
    data: {source: ROWS}
    eval_data: {source: ROWS}
    lora: {r: 8, alpha: 16, dropout: 0.0}
    ranking_loss_weight: 1.0
    lr: 5.0e-3
    max_steps: 40
    batch_size: 4
    logging_steps: 1
    save_steps: 12
    max_length: 64
"""


def test_prm_stage_with_ranking_loss_learns_to_order_a_prompts_solutions(tmp_path, tiny_model_dir):
    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe

    two_solutions_per_prompt(tmp_path / "rows.jsonl")
    path = tmp_path / "prm.yaml"
    path.write_text(RANKING_RECIPE.replace("MODEL", str(tiny_model_dir)).replace("ROWS", str(tmp_path / "rows.jsonl")))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    (result,) = run_recipe(recipe, echo=lambda *_: None)
    metrics = result.metrics
    # 12 prompts x 2 solutions; batch_size counts prompts: 4 prompts = 8 rows, one right/wrong pair each
    assert metrics["train_rows"] == 24 and metrics["train_prompts"] == 12 and metrics["train_ranking_pairs"] == 12
    assert metrics["ranking_pairs"] == 12 and metrics["train_steps"] == 40
    # the seeded random head ranks half the pairs right; training ranks 11 of 12 right
    assert metrics["ranking_accuracy_before"] <= 0.6 and metrics["ranking_accuracy"] >= 0.9
    assert metrics["last_logged_loss"] < 0.5 * metrics["first_logged_loss"]


def test_logprob_step_logits_by_hand():
    from alignkit.rewards.prm import EncodedSteps, logprob_step_logits, pad_index, step_token_index

    torch.manual_seed(0)
    lm_logits = torch.randn(1, 6, 5)
    ids = torch.tensor([[3, 1, 4, 0, 2, 0]])
    # prompt [3], step 1 = [1, 4] then separator [0], step 2 = [2] then separator [0]
    encoded = EncodedSteps([3, 1, 4, 0, 2, 0], [3, 5], [(1, 3), (4, 5)])
    index = pad_index([step_token_index(encoded)])
    assert index.tolist() == [[-1, 3, 3, -1, 5, -1]]
    logps = torch.log_softmax(lm_logits, -1)
    step1 = logps[0, 0, 1] + logps[0, 1, 4]  # log P(1 | 3) + log P(4 | 3 1)
    step2 = logps[0, 3, 2]  # log P(2 | 3 1 4 0); separators and the prompt add nothing
    out = logprob_step_logits(lm_logits, ids, index, offset=0.5)
    assert out.shape == (1, 6, 2) and torch.all(out[..., 0] == 0)
    assert torch.allclose(out[0, [3, 5], 1], torch.stack([step1, step2]) + 0.5, atol=1e-6)


LOGPROB_RECIPE = """
name: prm-logprob
tracking: {report_to: none}
stages:
  - kind: prm
    model: MODEL
    head: lm-logprob
    logprob_offset: 40.0               # a random tiny LM gives a step log P of about -40
    data: {source: arith, params: {n: 8, steps: 2, max_operand: 9}}
    eval_data: {source: arith, params: {n: 8, steps: 2, max_operand: 9}}
    lr: 3.0e-3
    max_steps: 40
    batch_size: 8
    logging_steps: 1
    save_steps: 20
    max_length: 160
"""


def test_prm_stage_lm_logprob_head_trains_saves_and_scores_by_step_likelihood(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alignkit.run.pipeline import run_recipe
    from alignkit.run.recipe import load_recipe
    from alignkit.rewards.prm import EncodedSteps, logprob_step_logits, pad_index, step_token_index

    path = tmp_path / "prm.yaml"
    path.write_text(LOGPROB_RECIPE.replace("MODEL", str(tiny_model_dir)))
    recipe = load_recipe(path, output_dir=str(tmp_path / "runs"))
    (result,) = run_recipe(recipe, echo=lambda *_: None)
    metrics = result.metrics
    # full fine-tuning: the LM learns to make the planted-error steps unlikely and the right ones likely
    assert metrics["train_steps"] == 40 and metrics["last_logged_loss"] < 0.1 * metrics["first_logged_loss"]
    assert metrics["step_accuracy_before"] < 0.6 and metrics["step_accuracy"] == 1.0

    model_dir = recipe.stage("prm").run_dir / "model"
    layout = read_prm_config(model_dir)
    assert layout["head"] == "lm-logprob" and layout["logprob_offset"] == 40.0
    scorer = PRMScorer(str(model_dir))
    steps = ["Add 2: 1 + 2 = 3.", "The answer is 3."]
    scores = scorer.score_steps("What is 1 + 2?", steps)
    # the saved folder is a plain causal LM; its step score is sigmoid(log P(step) + offset)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = scorer.encode("What is 1 + 2?", steps)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        z = logprob_step_logits(lm(input_ids=ids).logits, ids, pad_index([step_token_index(encoded)]), 40.0)
    assert isinstance(encoded, EncodedSteps)
    assert scores == pytest.approx(torch.sigmoid(z[0, encoded.step_ends, 1]).tolist(), abs=1e-5)


def test_scorer_refuses_an_unknown_head(tmp_path, tiny_tokencls_dir):
    import shutil

    from alignkit.core.errors import ModelError

    folder = tmp_path / "prm"
    shutil.copytree(tiny_tokencls_dir, folder)
    (folder / "alignkit_prm.json").write_text(json.dumps({"head": "value-head"}))
    with pytest.raises(ModelError, match="names head 'value-head'; known"):
        PRMScorer(str(folder))


@pytest.mark.parametrize("head", ["token-cls-2", "lm-logprob"])
def test_a_shared_prefix_is_read_once_and_scores_as_if_read_per_row(head, tiny_tokencls_dir, tiny_model_dir,
                                                                    monkeypatch):
    """A search scores many candidates of one problem: the prompt (and a common first step) is read once, its KV
    cache serves every row, and each row's scores equal those of the row read alone (no prefix shared)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from alignkit.modeling.models import load_tokenizer
    from alignkit.rewards import prm as prm_module
    from alignkit.rewards.prm import MIN_SHARED_PREFIX, encode_steps, first_output, score_encoded, shared_prefix

    folder = tiny_tokencls_dir if head == "token-cls-2" else tiny_model_dir
    model = (AutoModelForTokenClassification if head == "token-cls-2" else AutoModelForCausalLM).from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder), padding_side="right")
    prompt = "Tom has 3 apples. He buys 4 more apples at the shop. How many apples does he have now?\n"
    solutions = [["Start with 3.", "Add 4: 3 + 4 = 7.", "The answer is 7."], ["Start with 3.", "Add 5: 3 + 5 = 8."],
                 ["Tom has 3.", "The answer is 7."], ["The answer is 7."]]
    encoded = [encode_steps(tokenizer, prompt, steps, "\n") for steps in solutions]
    shared = shared_prefix([e.input_ids for e in encoded], [first_output(e, head) for e in encoded])
    assert shared >= MIN_SHARED_PREFIX
    read: list[int] = []
    forward = prm_module._forward
    monkeypatch.setattr(prm_module, "_forward", lambda m, b, prefix, d: read.append(len(prefix)) or forward(m, b,
                                                                                                           prefix, d))
    together = score_encoded(model, encoded, tokenizer.pad_token_id, batch_size=8, head=head, offset=1.0)
    assert read == [shared]  # one forward over the batch, after the prefix was read once
    alone = [score_encoded(model, [e], tokenizer.pad_token_id, head=head, offset=1.0)[0] for e in encoded]
    assert read[1:] == [0, 0, 0, 0]
    for mine, reference, steps in zip(together, alone, solutions, strict=True):
        assert len(mine) == len(steps) and mine == pytest.approx(reference, abs=1e-5)
    # and the two candidates that also share their first step get its one score
    assert together[0][0] == pytest.approx(together[1][0], abs=1e-5)
