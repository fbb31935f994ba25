"""Command line: ``alignkit run | recipes | grade``.

    alignkit run recipes/quickstart.yaml                     # run (finished stages are skipped)
    alignkit run quickstart --set stages.sft.lr=1e-4         # a shipped recipe by name, with an override
    alignkit run recipes/quickstart.yaml --dry-run           # print the resolved plan, run nothing
    alignkit run recipes/quickstart.yaml --from dpo          # rerun from a stage
    accelerate launch -m alignkit run recipes/quickstart.yaml
    alignkit recipes                                         # list shipped recipes
    alignkit init my-project                                 # a starter project: recipe, reward, data
    alignkit grade FILE.jsonl --reward reward/math.py:answer_match
    alignkit eval eval/arith.yaml --model runs/quickstart/sft/model

Shipped names (``quickstart``, ``reward/math.py``, suite ``gsm8k``) resolve from the clone or the installed
package when the working folder has no such file (:mod:`alignkit.run.shipped`); ``--dry-run`` says which was used.
User mistakes print one message and exit with status 2; Ctrl-C exits 130 and a rerun resumes.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
from pathlib import Path

from alignkit.run import shipped
from alignkit.core.errors import AlignkitError, RecipeError

RECIPES_DIR = shipped.shipped_dir("recipes")  # the shipped recipes: the clone's recipes/, or the package's copy


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] == "grade":  # the grader and the evaluator own their flags
        return _guarded(lambda: _grade(argv[1:]))
    if argv and argv[0] == "eval":
        return _guarded(lambda: _eval(argv[1:]))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _guarded(lambda: args.handler(args))


def _parser() -> argparse.ArgumentParser:
    from alignkit import __version__

    parser = argparse.ArgumentParser(prog="alignkit", description="Post-train language models from recipes.")
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a recipe (YAML file or shipped recipe name)")
    run.add_argument("recipe")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. stages.sft.lr=1e-4 (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved plan, check the first rows of each local dataset, and exit")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and all after it")
    run.add_argument("--output-dir", help="root for run folders (default: runs/)")
    run.set_defaults(handler=_run)
    recipes = sub.add_parser("recipes", help="list the shipped recipes")
    recipes.set_defaults(handler=_recipes)
    init = sub.add_parser("init", help="write a starter project (recipe, reward program, data) into DIR")
    init.add_argument("dir")
    init.set_defaults(handler=_init)
    sub.add_parser("grade", help="grade a jsonl of completions with a reward program (see `grade -h`)")
    sub.add_parser("eval", help="run an eval suite on a model (see `eval -h`)")
    return parser


def _guarded(action) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # so a `kill` records the stage as interrupted, not done
    try:
        return action() or 0
    except AlignkitError as exc:
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nalignkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _terminate(signum, frame):
    raise KeyboardInterrupt


def find_recipe(name: str) -> Path:
    """A recipe path as given, or a shipped recipe by name (``quickstart``: ./recipes/quickstart.yaml if there is
    one, else the shipped one); a relative path missing here but shipped (recipes/quickstart.yaml) is shipped."""
    path = Path(name)
    if path.exists():
        return path
    if path.suffix in (".yaml", ".yml"):
        copy = shipped.shipped_root() / path
        if not path.is_absolute() and path.parts[0] == "recipes" and copy.is_file():
            shipped.note("recipes", name, copy)
            return copy
        return path  # the recipe loader names what is missing
    if len(path.parts) == 1 and (found := shipped.find("recipes", name)) is not None:
        return found
    if len(path.parts) > 1 or path.suffix:  # looks like a path: the recipe loader names what is missing
        return path
    names = shipped.shipped_names("recipes")
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(f"no recipe file or shipped recipe named {name!r}; {hint}shipped recipes: {', '.join(names)}")


def _run(args) -> int:
    from alignkit.run.pipeline import format_summary, plan_actions, run_recipe
    from alignkit.run.recipe import load_recipe

    from alignkit.data.check import check_recipe_data

    shipped.reset()
    recipe = load_recipe(find_recipe(args.recipe), args.overrides, output_dir=args.output_dir)
    actions = plan_actions(recipe, args.from_stage)  # an unknown --from stage: one line, before any data is read
    if os.environ.get("RANK", "0") == "0":  # one copy under accelerate launch
        for note in recipe.notes:
            print(f"alignkit: note: {note}", file=sys.stderr)
    # the first rows of every local dataset a stage to run reads, checked against that stage's format: a bad
    # file in stage 3 is one line now, not after stage 1 trained (and before any model is loaded)
    lines = check_recipe_data([stage for stage, action in actions if action != "skip"])
    if args.dry_run:
        print(describe_plan(recipe, actions))
        for line in shipped.describe_used():  # which recipe/reward/suite files came from alignkit itself
            print(line)
        if lines:
            print("data check:\n" + "\n".join(lines))
        return 0
    outcomes = run_recipe(recipe, from_stage=args.from_stage)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"\nalignkit: recipe {recipe.name!r} finished; outputs in {recipe.root}\n")
        print(format_summary(outcomes))
    return 0


def describe_plan(recipe, actions) -> str:
    words = {"skip": "done, will skip", "run": "will run", "resume": "unfinished, will resume"}
    lines = [f"recipe {recipe.name}" + (f": {recipe.description}" if recipe.description else ""),
             f"run folder: {recipe.root}"]
    for stage, action in actions:
        config = stage.config
        lines.append(f"{stage.index + 1}. {stage.name} ({stage.kind}) [{words[action]}]  hash {stage.hash}")
        if getattr(config, "model", None):
            lines.append(f"   model: {config.model}")
            lines += [f"   {line}" for line in _training_lines(config)]
            generation = getattr(config, "generation", None)
            if getattr(generation, "backend", None) == "vllm" and generation.mode == "server":
                lines.append(f"   sampling: TRL's vLLM server; start it first, on other GPUs: "
                             f"{generation.serve_command(config.model)}")
        if getattr(config, "models", None):  # merge: its ingredients and how they are combined
            lines.append(f"   {config.method} merge of: {', '.join(config.models)}"
                         + (f" (base {config.base})" if getattr(config, "base", None) else ""))
        for key, value in config:
            if hasattr(value, "source"):
                lines.append(f"   {key}: {value.source}" + (f" {value.params}" if value.params else ""))
        for key, value in stage.outputs.items():
            lines.append(f"   -> {key}: {value}")
    if recipe.hub:
        lines.append(f"hub: {recipe.hub.repo_id} (push: {recipe.hub.push}, private: {recipe.hub.private})")
    lines.append(_tracking_line(recipe.tracking))
    return "\n".join(lines)


def _training_lines(config) -> list[str]:
    """What to check before a long run: lr, length, effective batch, the full LoRA block, quantization here."""
    import os

    lines = []
    if getattr(config, "lr", None) is not None:
        length = (f"max_steps {config.max_steps}" if getattr(config, "max_steps", -1) > 0
                  else f"epochs {getattr(config, 'epochs', '?')}")
        batch, accum = getattr(config, "batch_size", None), getattr(config, "grad_accum", 1) or 1
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        effective = f", batch {batch} x grad_accum {accum} x {processes} process(es) = {batch * accum * processes}" \
            if isinstance(batch, int) else ""
        lines.append(f"lr {config.lr:g}, {length}{effective}")
    if getattr(config, "lora", None) is not None:
        lines.append(f"lora: {config.lora.model_dump()}")
    quant = getattr(config, "quantization", None)
    if quant is not None:
        applies = "applies"
        if quant.cuda_only:
            applies = "applies: CUDA is available" if _cuda_here() else \
                "not applied here: cuda_only and no CUDA, so it loads unquantized"
        lines.append(f"quantization: {quant.bits}-bit {quant.quant_type if quant.bits == 4 else ''}".rstrip()
                     + f" ({applies})")
    return lines


def _cuda_here() -> bool:
    """``torch.cuda.is_available()``, told without importing torch when it is not loaded yet (the import takes
    seconds, which ``--dry-run`` does not spend): torch is a CUDA or ROCm build (its ``version.py`` says which)
    and the driver shows a GPU that ``CUDA_VISIBLE_DEVICES`` does not hide."""
    import glob
    import importlib.util
    import os
    import re

    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    spec = importlib.util.find_spec("torch")
    version = Path(next(iter(spec.submodule_search_locations or []), "")) / "version.py" if spec else None
    text = version.read_text() if version is not None and version.is_file() else ""
    build = re.search(r"^(cuda|hip)\b[^=\n]*=\s*['\"]", text, re.MULTILINE)  # cuda: Optional[str] = '12.4'
    if build is None or os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    devices = "/dev/nvidia[0-9]*" if build.group(1) == "cuda" else "/dev/kfd"
    return bool(glob.glob(devices))


def _tracking_line(tracking) -> str:
    import os

    from alignkit.core.tracking import wandb_mode

    if tracking.report_to != "wandb":
        return f"tracking: {tracking.report_to}"
    source = ("recipe" if tracking.wandb.mode is not None
              else "environment's WANDB_MODE" if os.environ.get("WANDB_MODE") else "default")
    return f"tracking: wandb, mode {wandb_mode(tracking)} (from the {source}), project {tracking.wandb.project}"


def _recipes(args) -> int:
    import yaml

    folder = shipped.shipped_dir("recipes")
    files = sorted(folder.glob("*.yaml"))
    if not files:
        print(f"no recipes found in {folder}")
        return 1
    width = max(len(f.stem) for f in files)
    for file in files:
        try:
            data = yaml.safe_load(file.read_text()) or {}
            kinds = " -> ".join(str(s.get("name") or s.get("kind")) for s in data.get("stages", []))
            print(f"{file.stem.ljust(width)}  {data.get('description', '')}  [{kinds}]")
        except yaml.YAMLError:
            print(f"{file.stem.ljust(width)}  (unreadable YAML)")
    return 0


def _init(args) -> int:
    from alignkit.run.starter import write_starter

    written = write_starter(args.dir)
    print(f"alignkit: wrote a starter project in {args.dir}: "
          + ", ".join(str(p.relative_to(args.dir)) for p in written))
    print(f"next: cd {args.dir} && alignkit run recipe.yaml --dry-run")
    return 0


def _eval(argv: list[str]) -> int:
    from alignkit.stages.eval import eval_main

    return eval_main(argv)


def _grade(argv: list[str]) -> int:
    from alignkit.rewards.grading import grade_main

    return grade_main(argv)


if __name__ == "__main__":
    sys.exit(main())
