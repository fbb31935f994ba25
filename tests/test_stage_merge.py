"""The merge stage on tiny models: the maths by hand (soups, task arithmetic, TIES, DARE through PEFT), LoRA adapters
combined by PEFT's add_weighted_adapter, greedy soup's decisions, one-line config errors, resuming after a crash,
and sft twice -> merge through the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.core.artifacts import Manifest
from alignkit.core.errors import RecipeError
from alignkit.run.pipeline import run_recipe
from alignkit.run.recipe import parse_recipe
from alignkit.stages import merge
from alignkit.stages.merge import greedy_soup, markdown_table, merge_tensors

ACCURACY = {"source": "arith", "seed": 7, "params": {"n": 3, "steps": 1, "max_operand": 9}}


# ---------------------------------------------------------------- helpers


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def variant(source: Path, out: Path, change) -> Path:
    """A copy of the model in ``source`` whose every parameter ``p`` (tied ones once) becomes ``change(name, p)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(change(name, param.detach().clone()))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def recipe_of(tmp_path: Path, *stages: dict, name: str = "m"):
    return parse_recipe({"name": name, "tracking": {"report_to": "none"}, "stages": list(stages)},
                        file="r.yaml", base_dir=tmp_path, output_dir=str(tmp_path / "runs"))


def run(tmp_path: Path, *stages: dict):
    recipe = recipe_of(tmp_path, *stages)
    run_recipe(recipe, echo=lambda *_: None)
    return recipe


def assert_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol), (name, (got[name] - want[name]).abs().max())


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, A, B): the tiny model and two fine-tunes of it with known task vectors (+0.1 and -0.3 everywhere)."""
    folder = tmp_path_factory.mktemp("pair")
    a = variant(tiny_model_dir, folder / "a", lambda _, p: p + 0.1)
    b = variant(tiny_model_dir, folder / "b", lambda _, p: p - 0.3)
    return tiny_model_dir, a, b


# ---------------------------------------------------------------- the maths, by hand


def test_soups_are_weighted_means():
    t1, t2 = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 4.0])
    assert merge_tensors("uniform", [t1, t2], [0.5, 0.5]).tolist() == [2.0, 1.0, 0.0]
    assert merge_tensors("weighted", [t1, t2], [0.75, 0.25]).tolist() == [1.5, 1.5, -2.0]


def test_task_arithmetic_by_hand():
    base = torch.ones(4)
    t1, t2 = base + torch.tensor([1.0, 0.0, 2.0, 0.0]), base + torch.tensor([0.0, 3.0, 0.0, -1.0])
    got = merge_tensors("task_arithmetic", [t1, t2], [0.5, 1.0], base=base)
    assert got.tolist() == [1.5, 4.0, 2.0, 0.0]  # 1 + 0.5 * tau1 + tau2


def test_ties_and_magnitude_prune_by_hand():
    base = torch.zeros(4)
    tau1, tau2 = torch.tensor([4.0, -1.0, 0.5, -2.0]), torch.tensor([-3.0, 2.0, 0.1, -1.0])
    # density 0.5 keeps the 2 largest magnitudes of each: tau1 -> [4, 0, 0, -2], tau2 -> [-3, 2, 0, 0]
    # elected signs (sign of the sum, 0 counts as +): [+, +, +, -]; tau2's -3 disagrees and is dropped;
    # each entry is the mean of the agreeing (weighted) values: [4, 2 * w2, 0, -2]
    got = merge_tensors("ties", [base + tau1, base + tau2], [1.0, 1.0], base=base, density=0.5)
    assert got.tolist() == [4.0, 2.0, 0.0, -2.0]
    got = merge_tensors("ties", [base + tau1, base + tau2], [1.0, 0.5], base=base, density=0.5)
    assert got.tolist() == [4.0, 1.0, 0.0, -2.0]
    # frequency: a tie in sign counts (one + one -) elects +, as the sum does here
    got = merge_tensors("ties", [base + tau1, base + tau2], [1.0, 1.0], base=base, density=0.5,
                        majority_sign_method="frequency")
    assert got.tolist() == [4.0, 2.0, 0.0, -2.0]
    # magnitude_prune: the same trim, then a plain sum (no election): [4 - 3, 2, 0, -2]
    got = merge_tensors("magnitude_prune", [base + tau1, base + tau2], [1.0, 1.0], base=base, density=0.5)
    assert got.tolist() == [1.0, 2.0, 0.0, -2.0]


def test_dare_drops_at_random_and_rescales():
    base = torch.full((64,), 0.5)
    tau1, tau2 = torch.linspace(-1, 1, 64), torch.linspace(2, -2, 64)
    torch.manual_seed(3)
    got = merge_tensors("dare_linear", [base + tau1, base + tau2], [1.0, 0.5], base=base, density=0.25)
    torch.manual_seed(3)  # PEFT draws one Bernoulli(density) mask per task vector, in order
    m1, m2 = torch.bernoulli(torch.full((64,), 0.25)), torch.bernoulli(torch.full((64,), 0.25))
    assert torch.allclose(got, base + tau1 * m1 / 0.25 + 0.5 * tau2 * m2 / 0.25, atol=1e-6)
    torch.manual_seed(3)
    got = merge_tensors("dare_ties", [base + tau1, base + tau2], [1.0, 1.0], base=base, density=0.25)
    p1, p2 = tau1 * m1 / 0.25, tau2 * m2 / 0.25
    sign = torch.where(p1 + p2 >= 0, 1.0, -1.0)
    agree1, agree2 = (p1.sign() == sign).float(), (p2.sign() == sign).float()
    want = (p1 * agree1 + p2 * agree2) / torch.clamp(agree1 + agree2, min=1.0)
    assert torch.allclose(got, base + want, atol=1e-6)
    # density 1 keeps everything: task arithmetic
    with pytest.warns(UserWarning):
        got = merge_tensors("dare_linear", [base + tau1, base + tau2], [1.0, 1.0], base=base, density=1.0)
    assert torch.allclose(got, base + tau1 + tau2)


def test_greedy_soup_decisions():
    scores = {(1, 2): 0.65, (0, 1): 0.75}
    kept, decisions = greedy_soup([1, 2, 0], lambda s: scores[tuple(sorted(s))], 0.7)
    assert kept == [1, 0]
    assert [(d["ingredient"], d["kept"]) for d in decisions] == [(1, True), (2, False), (0, True)]
    assert decisions[1] == {"ingredient": 2, "soup_before": 0.7, "soup_with": 0.65, "kept": False, "soup": [1]}
    # an equal score keeps the ingredient (Wortsman et al.: "if the held-out accuracy does not drop")
    assert greedy_soup([0, 1], lambda s: 0.5, 0.5)[0] == [0, 1]


# ---------------------------------------------------------------- full models through the stage


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")  # PEFT's, for ties without trim
def test_uniform_weighted_and_task_vector_merges_of_full_models(tmp_path, pair):
    base, a, b = pair
    recipe = run(
        tmp_path,
        {"kind": "merge", "name": "uniform", "models": [str(a), str(b)]},
        {"kind": "merge", "name": "weighted", "models": [str(a), str(b)], "method": "weighted", "weights": [3, 1]},
        {"kind": "merge", "name": "arith", "models": [str(a), str(b)], "base": str(base),
         "method": "task_arithmetic", "weights": [1.0, 0.5]},
        # TIES without trimming: +0.1 and -0.3 disagree everywhere, the sum is negative, so only -0.3 is kept
        {"kind": "merge", "name": "ties", "models": [str(a), str(b)], "base": str(base), "method": "ties",
         "density": 1.0},
    )
    w0, wa, wb = weights_of(base), weights_of(a), weights_of(b)
    assert_close(weights_of(recipe.stage("uniform").run_dir / "model"), {k: (wa[k] + wb[k]) / 2 for k in wa})
    assert_close(weights_of(recipe.stage("weighted").run_dir / "model"), {k: 0.75 * wa[k] + 0.25 * wb[k] for k in wa})
    assert_close(weights_of(recipe.stage("arith").run_dir / "model"), {k: w0[k] + 0.1 - 0.15 for k in w0})
    assert_close(weights_of(recipe.stage("ties").run_dir / "model"), {k: w0[k] - 0.3 for k in w0})
    folder = recipe.stage("uniform").run_dir / "model"
    assert {p.name for p in folder.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    manifest = Manifest.read(recipe.stage("weighted").run_dir)
    assert manifest.status == "done" and manifest.metrics["weights"] == [0.75, 0.25]
    assert manifest.artifacts["model"] == str(recipe.stage("weighted").run_dir / "model")
    rows = [json.loads(line) for line in (recipe.stage("weighted").run_dir / "table.jsonl").read_text().splitlines()]
    assert [(r["row"], r["weight"], r["accuracy"]) for r in rows] == [
        ("ingredient 0", 0.75, None), ("ingredient 1", 0.25, None), ("weighted merge", None, None)]


def test_merged_dtype_and_the_nonfinite_guard(tmp_path, pair, monkeypatch):
    base, a, b = pair
    recipe = run(tmp_path, {"kind": "merge", "models": [str(a), str(b)], "merged_dtype": "bfloat16"})
    config = json.loads((recipe.stage("merge").run_dir / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    inf = variant(base, tmp_path / "inf", lambda name, p: p.fill_(float("inf")) if "norm" in name else p)
    from alignkit.core.errors import ModelError

    with pytest.raises(ModelError, match="nan/inf"):
        run(tmp_path / "x", {"kind": "merge", "models": [str(a), str(inf)]})
    assert not list((tmp_path / "x" / "runs" / "m" / "merge").glob("*model*"))  # nothing written, no temp left


# ---------------------------------------------------------------- LoRA adapters: PEFT add_weighted_adapter


def make_adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B: a non-zero update
    get_peft_model(model, config).save_pretrained(out)
    return out


def merged_copy(adapter: Path) -> dict[str, torch.Tensor]:
    from alignkit.modeling.models import load_model

    return {k: v.detach().clone() for k, v in load_model(str(adapter), dtype="float32").named_parameters()}


def test_lora_adapters_are_combined_by_add_weighted_adapter(tmp_path, tiny_model_dir):
    base = tiny_model_dir
    one, two = make_adapter(base, tmp_path / "one", 1), make_adapter(base, tmp_path / "two", 2, r=2)
    recipe = run(
        tmp_path,
        {"kind": "merge", "name": "soup", "models": [str(one), str(two)]},
        {"kind": "merge", "name": "sum", "models": [str(one), str(two)], "method": "task_arithmetic",
         "weights": [1.0, -0.5]},
        {"kind": "merge", "name": "ties", "models": [str(one), str(two)], "method": "ties", "density": 0.5,
         "svd_rank": 32},
    )
    w0, m1, m2 = weights_of(base), merged_copy(one), merged_copy(two)
    # cat: the exact weighted sum of the adapters' updates, so the soup is the mean of the merged models
    assert_close(weights_of(recipe.stage("soup").run_dir / "model"), {k: (m1[k] + m2[k]) / 2 for k in w0}, 1e-5)
    assert_close(weights_of(recipe.stage("sum").run_dir / "model"),
                 {k: w0[k] + (m1[k] - w0[k]) - 0.5 * (m2[k] - w0[k]) for k in w0}, 1e-5)
    adapter = json.loads((recipe.stage("soup").run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 6 and Path(adapter["base_model_name_or_path"]) == base  # cat: ranks add up
    assert Manifest.read(recipe.stage("soup").run_dir).artifacts["adapter"] == str(recipe.stage("soup").run_dir /
                                                                                   "adapter")
    # ties_svd: TIES on each layer's full update (PEFT), then an SVD of rank 32: exact for v_proj (32 x 64)
    from peft.utils.merge_utils import ties

    got = weights_of(recipe.stage("ties").run_dir / "model")
    name = "model.layers.0.self_attn.v_proj.weight"
    want = w0[name] + ties([m1[name] - w0[name], m2[name] - w0[name]], torch.tensor([1.0, 1.0]), 0.5)
    assert torch.allclose(got[name], want, atol=1e-5)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], w0["model.layers.0.self_attn.k_proj.weight"])
    with pytest.raises(RecipeError, match=r"stages\.merge\.svd_rank: 64 is more than an SVD of .*v_proj can keep "
                                          r"\(32 = min\(in, out\)\)"):
        run(tmp_path / "big", {"kind": "merge", "models": [str(one), str(two)], "method": "ties", "density": 0.5,
                               "svd_rank": 64})


def test_lora_adapters_of_different_bases_are_refused(tmp_path, tiny_model_dir):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-base")
    one, two = make_adapter(tiny_model_dir, tmp_path / "one", 1), make_adapter(other, tmp_path / "two", 2)
    with pytest.raises(RecipeError, match=r"stages\.merge\.models\[1\]: .* must share one base") as err:
        run(tmp_path, {"kind": "merge", "models": [str(one), str(two)]})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- greedy soup


def fake_scores(table: dict[str, float], asked: list[str], check=None):
    def score(config, ctx, problems, tag, what, load):
        asked.append(tag)
        if check is not None:
            check(tag, load)
        return table[tag]
    return score


def test_greedy_soup_leaves_out_an_ingredient_that_hurts(tmp_path, pair, monkeypatch):
    base, a, b = pair
    c = variant(base, tmp_path / "c", lambda _, p: p + 5.0)  # far from the others: the soup with it is worse
    wa, wb = weights_of(a), weights_of(b)
    mean_ab = {k: (wa[k] + wb[k]) / 2 for k in wa}

    def check(tag, load):
        if tag == "soup-0-1":  # the candidate greedy scores is the uniform soup of those two, built in memory
            model, _ = load()
            assert_close({k: p.detach() for k, p in model.named_parameters()}, mean_ab, 1e-6)

    asked: list[str] = []
    table = {"ingredient-0": 0.5, "ingredient-1": 0.7, "ingredient-2": 0.6,   # best first: 1, 2, 0
             "soup-1-2": 0.65,                                                 # 2 lowers the soup: left out
             "soup-0-1": 0.75,                                                 # 0 raises it: kept
             "soup-0-1-2": 0.55, "soup": 0.75}
    monkeypatch.setattr(merge, "score", fake_scores(table, asked, check))
    recipe = run(tmp_path, {"kind": "merge", "models": [str(a), str(b), str(c)], "method": "greedy",
                            "accuracy_data": ACCURACY})
    run_dir = recipe.stage("merge").run_dir
    metrics = Manifest.read(run_dir).metrics
    assert metrics["kept"] == [0, 1] and metrics["kept_models"] == [str(a), str(b)]
    assert metrics["weights"] == [0.5, 0.5]
    assert metrics["best_ingredient"] == 1 and metrics["accuracy_soup"] == 0.75
    assert metrics["soup_minus_best"] == pytest.approx(0.05) and metrics["soup_minus_uniform"] == pytest.approx(0.2)
    assert asked == ["ingredient-0", "ingredient-1", "ingredient-2",        # the table's ingredient scores
                     "ingredient-0", "ingredient-1", "ingredient-2",        # greedy's (the same set: files reused)
                     "soup-1-2", "soup-0-1", "soup-0-1-2", "soup"]
    decisions = [json.loads(line) for line in (run_dir / "greedy.jsonl").read_text().splitlines()]
    assert [(d["ingredient"], d["kept"], d["soup_with"]) for d in decisions] == [
        (1, True, 0.7), (2, False, 0.65), (0, True, 0.75)]
    assert decisions[1]["model"] == str(c) and decisions[1]["soup_before"] == 0.7
    assert_close(weights_of(run_dir / "model"), mean_ab, 1e-6)
    rows = [json.loads(line) for line in (run_dir / "table.jsonl").read_text().splitlines()]
    assert [(r["row"], r["accuracy"], r.get("kept")) for r in rows] == [
        ("ingredient 0", 0.5, True), ("ingredient 1", 0.7, True), ("ingredient 2", 0.6, False),
        ("uniform soup", 0.55, None), ("greedy merge", 0.75, None)]
    text = (run_dir / "table.md").read_text()
    assert text == markdown_table(rows) and "| ingredient 2 | `" in text and "| no |" in text


def test_greedy_soup_of_adapters_selects_on_select_data(tmp_path, tiny_model_dir, monkeypatch):
    one, two = make_adapter(tiny_model_dir, tmp_path / "one", 1), make_adapter(tiny_model_dir, tmp_path / "two", 2)
    asked: list[str] = []
    table = {"ingredient-0": 0.4, "ingredient-1": 0.6, "select-ingredient-0": 0.9, "select-ingredient-1": 0.3,
             "select-soup-0-1": 0.5, "soup-0-1": 0.5, "soup": 0.4}
    monkeypatch.setattr(merge, "score", fake_scores(table, asked))
    recipe = run(tmp_path, {"kind": "merge", "models": [str(one), str(two)], "method": "greedy",
                            "accuracy_data": ACCURACY, "select_data": {**ACCURACY, "seed": 8}})
    run_dir = recipe.stage("merge").run_dir
    metrics = Manifest.read(run_dir).metrics
    assert metrics["kept"] == [0] and metrics["select_accuracy_ingredient_0"] == 0.9
    assert metrics["best_ingredient"] == 1 and metrics["soup_minus_best"] == pytest.approx(-0.2)
    assert_close(weights_of(run_dir / "model"), merged_copy(one), 1e-5)  # the soup of one: that adapter merged
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4


# ---------------------------------------------------------------- errors


def _error(tmp_path: Path, **stage) -> str:
    with pytest.raises(RecipeError) as err:
        recipe_of(tmp_path, {"kind": "merge", **stage})
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_configs_are_one_line_errors_naming_the_field(tmp_path, pair):
    base, a, b = pair
    two = [str(a), str(b)]
    cases = [
        ({"models": two, "method": "weighted", "weights": [1, 2, 3]}, "stages.merge.weights: 3 weights for 2 models"),
        ({"models": two, "weights": [1, 2]}, "stages.merge.weights: uniform averages with equal weights"),
        ({"models": two, "method": "weighted"}, "stages.merge.weights: method weighted needs weights"),
        ({"models": two, "method": "weighted", "weights": [1, -1]}, "stages.merge.weights: weighted averages need"),
        ({"models": two, "method": "ties", "base": str(base)}, "stages.merge.density: method ties needs density"),
        ({"models": two, "density": 0.5}, "stages.merge.density: density applies to"),
        ({"models": two, "method": "ties", "density": 0.5}, "stages.merge.base: method ties works on task vectors"),
        ({"models": two, "base": str(base)}, "stages.merge.base: a uniform soup averages the ingredients"),
        ({"models": two, "method": "greedy"}, "stages.merge.accuracy_data: greedy soup keeps"),
        ({"models": two, "select_data": ACCURACY}, "stages.merge.select_data: select_data is what greedy"),
        ({"models": [str(a)]}, "stages.merge.models: a uniform soup needs two or more models"),
        ({"models": [str(a), str(a)]}, "stages.merge.models[1]: "),
        ({"models": two, "svd_rank": 8}, "stages.merge.svd_rank: svd_rank applies to the svd combinations"),
        ({"models": two, "lora_combination": "ties"}, "stages.merge.lora_combination: method uniform combines"),
        ({"models": two, "majority_sign_method": "frequency"}, "stages.merge.majority_sign_method: "),
        ({"models": two, "generation": {"backend": "openai", "base_url": "http://x", "model_name": "m"}},
         "stages.merge.generation.backend: "),
        ({"models": two, "method": "average"}, "stages.merge.method: "),
        ({"models": two, "density": 1.5, "method": "ties", "base": str(base)}, "stages.merge.density: "),
    ]
    for stage, message in cases:
        assert message in _error(tmp_path, **stage), (stage, message)


def test_errors_found_when_the_stage_runs(tmp_path, pair, tiny_model_dir):
    from alignkit.testing import make_tiny_model

    base, a, b = pair
    narrow = make_tiny_model(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(RecipeError, match=r"r\.yaml: stages\.merge\.models\[1\]: .* has hidden_size=32 where "
                                          r"models\[0\] has 64"):
        run(tmp_path / "arch", {"kind": "merge", "models": [str(a), str(narrow)]})
    # ingredients an earlier stage writes do not exist at load: a missing base is found when the stage starts
    later = [str(tmp_path / "later-a"), str(tmp_path / "later-b")]
    recipe = recipe_of(tmp_path / "base", {"kind": "merge", "models": later, "method": "task_arithmetic"})
    shutil.copytree(a, later[0])
    shutil.copytree(b, later[1])
    with pytest.raises(RecipeError, match=r"stages\.merge\.base: method task_arithmetic works on task vectors"):
        run_recipe(recipe, echo=lambda *_: None)
    with pytest.raises(RecipeError, match=r"stages\.merge\.base: .* has hidden_size=32"):
        run(tmp_path / "b2", {"kind": "merge", "models": [str(a), str(b)], "method": "task_arithmetic",
                              "base": str(narrow)})


# ---------------------------------------------------------------- resuming


def test_rerun_after_a_crash_redoes_only_what_is_missing(tmp_path, pair, monkeypatch):
    """Killed while scoring the second ingredient, then while saving the model: each rerun measures only the
    accuracies it has no file for, and a half-saved model never looks complete."""
    import alignkit.evaluation.accuracy as accuracy
    from transformers import PreTrainedModel

    base, a, b = pair
    real, calls = accuracy.greedy_accuracy, []

    def counting(crash_at: int | None):
        def greedy_accuracy(model, *args, **kwargs):
            calls.append(model)
            if len(calls) == crash_at:
                raise KeyboardInterrupt  # as if Ctrl-C
            return real(model, *args, **kwargs)
        return greedy_accuracy

    stage = {"kind": "merge", "models": [str(a), str(b)], "accuracy_data": ACCURACY,
             "accuracy_max_completion_length": 4}
    recipe = recipe_of(tmp_path, stage)
    run_dir = recipe.stage("merge").run_dir
    monkeypatch.setattr(accuracy, "greedy_accuracy", counting(crash_at=2))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, echo=lambda *_: None)
    assert Manifest.read(run_dir).status == "interrupted"
    assert (run_dir / "accuracy_ingredient-0.jsonl").is_file()
    assert not (run_dir / "accuracy_ingredient-1.jsonl").exists()

    save = PreTrainedModel.save_pretrained

    def crash_while_saving(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)  # the files are written, then the process dies before the rename
        raise KeyboardInterrupt

    calls.clear()
    monkeypatch.setattr(accuracy, "greedy_accuracy", counting(crash_at=None))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_while_saving)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe_of(tmp_path, stage), echo=lambda *_: None)
    assert len(calls) == 1  # ingredient 1 only
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model*"))

    calls.clear()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    run_recipe(recipe_of(tmp_path, stage), echo=lambda *_: None)
    assert len(calls) == 1  # the soup only
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done"
    assert set(manifest.metrics) >= {"accuracy_ingredient_0", "accuracy_ingredient_1", "accuracy_soup",
                                     "best_ingredient", "soup_minus_best"}
    wa, wb = weights_of(a), weights_of(b)
    assert_close(weights_of(run_dir / "model"), {k: (wa[k] + wb[k]) / 2 for k in wa})


# ---------------------------------------------------------------- a recipe: sft twice -> merge


def test_sft_twice_with_different_seeds_then_merge(tmp_path, tiny_model_dir):
    sft = {"kind": "sft", "model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"source": "arith", "params": {"n": 16, "steps": 1, "max_operand": 9}},
           "max_steps": 2, "batch_size": 8, "max_length": 96, "lr": 1e-2, "save_steps": 2}
    recipe = run(tmp_path,
                 {**sft, "name": "sft_a", "seed": 1},
                 {**sft, "name": "sft_b", "seed": 2},
                 {"kind": "merge", "models": ["${sft_a.model}", "${sft_b.model}"], "accuracy_data": ACCURACY,
                  "accuracy_max_completion_length": 4},
                 # the adapters, greedy: every check really generates, through PEFT with each adapter active
                 {"kind": "merge", "name": "greedy", "models": ["${sft_a.adapter}", "${sft_b.adapter}"],
                  "method": "greedy", "accuracy_data": ACCURACY, "accuracy_max_completion_length": 4})
    run_dir = recipe.stage("merge").run_dir
    manifest = Manifest.read(run_dir)
    assert manifest.status == "done"
    assert recipe.stage("merge").upstream == ("sft_a", "sft_b")
    metrics = manifest.metrics
    for key in ("accuracy_ingredient_0", "accuracy_ingredient_1", "accuracy_soup"):
        assert 0.0 <= metrics[key] <= 1.0
    best = max(metrics["accuracy_ingredient_0"], metrics["accuracy_ingredient_1"])
    assert metrics["soup_minus_best"] == pytest.approx(metrics["accuracy_soup"] - best)
    wa, wb = weights_of(recipe.stage("sft_a").run_dir / "model"), weights_of(recipe.stage("sft_b").run_dir / "model")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the seeds gave two different models
    assert_close(weights_of(run_dir / "model"), {k: (wa[k] + wb[k]) / 2 for k in wa})
    rows = [json.loads(line) for line in (run_dir / "table.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["ingredient 0", "ingredient 1", "uniform merge"]
    assert all(r["n"] == 3 for r in rows)
    greedy = Manifest.read(recipe.stage("greedy").run_dir)
    assert greedy.status == "done" and greedy.metrics["kept"] in ([0], [1], [0, 1])
    assert set(greedy.metrics) >= {"accuracy_soup", "accuracy_uniform_soup", "soup_minus_uniform", "kept_models"}
    assert (recipe.stage("greedy").run_dir / "adapter" / "adapter_config.json").is_file()
    # a rerun skips the finished stages
    outcomes = run_recipe(recipe, echo=lambda *_: None)
    assert [o.action for o in outcomes] == ["skipped"] * 4
