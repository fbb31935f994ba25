"""The wheel works outside a clone: build it, install it with --no-deps into a fresh venv that borrows this
environment's packages, and use what alignkit ships from an empty folder.

The fresh venv is made with ``--without-pip`` and gets a ``.pth`` file listing this environment's
site-packages folders: their packages (torch, trl, pip...) are importable, but the ``.pth`` files inside
them are not run, so the editable alignkit of a development install (its finder hook lives in such a
``.pth``) stays invisible, and the venv's own site-packages, where the wheel goes, comes first on
``sys.path``. The test checks that ``import alignkit`` really is the wheel's copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "alignkit", "recipes", "reward", "eval")  # what the build reads
SHIPPED_GLOBS = ("recipes/*.yaml", "recipes/accelerate/*.yaml", "reward/*.py", "reward/constitutions/*.yaml",
                 "eval/*.yaml")


def _cannot_build() -> bool:
    """No pip, no setuptools, or a setuptools without bdist_wheel (< 70.1) and no `wheel` package."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        return True
    from importlib.metadata import version

    major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    return (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None


pytestmark = pytest.mark.skipif(_cannot_build(), reason="building the wheel with --no-build-isolation needs pip "
                                "and setuptools >= 70.1 in the test environment (the dev extra has them)")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 180) -> str:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the sources (no build/ litter in the clone)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp, env=env)
    (built,) = (tmp / "dist").glob("alignkit-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed (--no-deps) and this environment's packages borrowed."""
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=tmp, env=env)
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp, env=env).strip())
    borrowed = [p for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]
    (purelib / "_borrowed_test_env.pth").write_text("".join(f"{p}\n" for p in borrowed))
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
         cwd=tmp, env=env)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return bindir, env


def test_wheel_carries_the_package_and_the_shipped_folders(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "alignkit").rglob("__init__.py")
                      if "__pycache__" not in p.parts)
    missing = [f"{package}/" for package in packages if f"{package}/__init__.py" not in names]
    assert not missing, f"subpackages not in the wheel (add them to [tool.setuptools] packages): {missing}"
    modules = {str(p.relative_to(REPO)) for p in (REPO / "alignkit").rglob("*.py") if "__pycache__" not in p.parts}
    assert not modules - names, sorted(modules - names)
    shipped = {str(p.relative_to(REPO)) for pattern in SHIPPED_GLOBS for p in REPO.glob(pattern)}
    assert {"recipes/quickstart.yaml", "reward/math.py", "eval/gsm8k.yaml"} <= shipped
    assert not {f"alignkit/_shipped/{f}" for f in shipped} - names, sorted({f"alignkit/_shipped/{f}" for f in shipped}
                                                                          - names)
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "bench/", "recipes/", "reward/"))]


def test_installed_wheel_works_from_an_empty_folder(venv, tmp_path):
    bindir, env = venv
    alignkit = str(bindir / "alignkit")
    python = str(bindir / "python")
    work = tmp_path / "empty"
    work.mkdir()
    started = time.monotonic()

    where = json.loads(_run([python, "-c", "import alignkit, json, alignkit.run.shipped as s; "
                             "print(json.dumps([alignkit.__file__, str(s.shipped_root())]))"], work, env))
    package = Path(where[0]).parent
    assert REPO not in package.parents and package.parent.name == "site-packages", where
    assert Path(where[1]) == package / "_shipped"

    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    listing = _run([alignkit, "recipes"], work, env)
    assert sorted(line.split()[0] for line in listing.splitlines()) == recipes, listing

    plan = _run([alignkit, "run", "quickstart", "--dry-run"], work, env)
    assert f"recipe: quickstart (shipped: {package}/_shipped/recipes/quickstart.yaml)" in plan, plan

    _run([alignkit, "init", "proj"], work, env)
    # every shipped recipe, a stage naming the shipped suite and the starter recipe, in one process (the
    # imports a dry-run needs take ~10 s)
    (work / "suite.yaml").write_text(textwrap.dedent("""\
        name: suite
        tracking: {report_to: none}
        stages:
          - {kind: eval, model: smollm2-135m-instruct, suite: gsm8k}
    """))
    script = textwrap.dedent(f"""\
        import contextlib, io, json
        from alignkit.cli import main
        plans = {{}}
        for name in {recipes + ["suite.yaml", "proj/recipe.yaml"]!r}:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(["run", name, "--dry-run", "--output-dir", "runs"])
            plans[name] = [code, out.getvalue()]
        print(json.dumps(plans))
    """)
    plans = json.loads(_run([python, "-c", script], work, env).splitlines()[-1])
    for name, (code, out) in plans.items():
        assert code == 0, (name, out)
        if name in recipes:
            assert f"recipe: {name} (shipped: {package}/_shipped/recipes/{name}.yaml)" in out, out
    assert f"reward program: reward/math.py (shipped: {package}/_shipped/reward/math.py)" in plans["rlvr-arith"][1]
    assert f"(shipped: {package}/_shipped/reward/constitutions/harmless.yaml)" in plans["constitutional"][1]
    assert f"suite: gsm8k (shipped: {package}/_shipped/eval/gsm8k.yaml)" in plans["suite.yaml"][1]
    starter = plans["proj/recipe.yaml"][1]
    assert "1. sft (sft)" in starter and "2. grpo (grpo)" in starter and "shipped" not in starter, starter

    rows = work / "rows.jsonl"
    rows.write_text('{"completion": "The answer is 4.", "answer": "4"}\n{"completion": "5", "answer": "4"}\n')
    graded = _run([alignkit, "grade", "rows.jsonl", "--reward", "reward/math.py:answer_match"], work, env)
    assert "mean score 0.5000 over 2 rows" in graded, graded

    assert "usage: alignkit eval" in _run([alignkit, "eval", "--help"], work, env)

    graded = _run([alignkit, "grade", "data/train.jsonl", "--reward", "reward/my_reward.py:my_reward",
                   "--out", str(tmp_path / "graded.jsonl")], work / "proj", env)
    assert "mean score 1.0000" in graded, graded

    # the user's own reward/math.py wins over the shipped one
    (work / "reward").mkdir()
    (work / "reward" / "math.py").write_text("def answer_match(completions, **kw):\n"
                                             "    return [0.25] * len(completions)\n")
    graded = _run([alignkit, "grade", "rows.jsonl", "--reward", "reward/math.py:answer_match"], work, env)
    assert "mean score 0.2500" in graded, graded
    assert sorted(p.name for p in work.iterdir()) == ["proj", "reward", "rows.graded.jsonl", "rows.jsonl",
                                                       "suite.yaml"], "a dry-run wrote into the folder"
    print(f"installed-wheel checks took {time.monotonic() - started:.0f} s")
