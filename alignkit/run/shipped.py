"""Where the files alignkit ships are: ``recipes/``, ``reward/`` (with ``reward/constitutions/``) and ``eval/``.

In a clone (an editable install, or the source tree on ``sys.path``) they are the repository's top-level
folders, the ones users read and copy. An installed wheel carries the same folders inside the package, as
``alignkit/_shipped/{recipes,reward,eval}`` (pyproject.toml maps them there). :func:`shipped_root` is
whichever applies; every lookup of a shipped file goes through this module.

A shipped name (``quickstart``, ``reward/math.py``, suite ``gsm8k``, constitution ``harmless``) is looked up
in the user's folders first (the recipe's directory, then the working directory: ``recipes/quickstart.yaml``,
``reward/math.py``, ``eval/gsm8k.yaml``, ``reward/constitutions/harmless.yaml``), then in the shipped copy:
the user's own file wins. A file that came from the shipped copy is recorded (:func:`note`) so that
``alignkit run --dry-run`` can say which one was used.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the alignkit package (this file is alignkit/run/shipped.py)
#: the folder of each kind of shipped file, relative to :func:`shipped_root`
FOLDERS = {"recipes": "recipes", "reward": "reward", "eval": "eval", "constitutions": "reward/constitutions"}

_used: dict[tuple[str, str], Path] = {}  # (kind, name asked for) -> the shipped file used, since reset()


def shipped_root() -> Path:
    """The folder holding ``recipes/``, ``reward/`` and ``eval/``: the clone's top level when alignkit runs
    from a clone, else ``alignkit/_shipped`` inside the installed package."""
    clone = PACKAGE_DIR.parent
    if (clone / "pyproject.toml").is_file() and all((clone / f).is_dir() for f in ("recipes", "reward", "eval")):
        return clone
    return PACKAGE_DIR / "_shipped"


def shipped_dir(kind: str) -> Path:
    """The shipped folder of ``kind``: recipes, reward, eval or constitutions."""
    return shipped_root() / FOLDERS[kind]


def shipped_names(kind: str) -> list[str]:
    """The names (file stems) of the shipped YAML files of ``kind`` (recipes, eval, constitutions)."""
    return sorted(p.stem for p in shipped_dir(kind).glob("*.yaml"))


def shipped(kind: str, name: str) -> Path:
    """The shipped file ``name`` of ``kind`` (``shipped("recipes", "quickstart")``); it may not exist."""
    path = Path(name)
    return shipped_dir(kind) / (path if path.suffix else path.with_suffix(".yaml"))


def find(kind: str, name: str, roots: list[Path] | tuple[Path, ...] = ()) -> Path | None:
    """The file a shipped name means: ``<folder>/<name>`` in each of the user's ``roots`` and the working
    directory, else the shipped copy (recorded with :func:`note`); None when neither has it."""
    relative = Path(FOLDERS[kind]) / Path(shipped(kind, name).name)
    for root in [*roots, Path.cwd()]:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    path = shipped(kind, name)
    if path.is_file():
        note(kind, name, path)
        return path
    return None


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is inside one of the shipped folders."""
    path = Path(path).resolve()
    return any(path.is_relative_to(shipped_dir(kind)) for kind in ("recipes", "reward", "eval"))


def note(kind: str, name: str, path: Path) -> None:
    """Record that ``name`` (a recipe, reward program file, suite, constitution) came from the shipped copy."""
    _used[(kind, str(name))] = Path(path)


def used() -> list[tuple[str, str, Path]]:
    """What came from the shipped copy since the last :func:`reset`: (kind, name asked for, file used)."""
    return [(kind, name, path) for (kind, name), path in _used.items()]


def describe_used() -> list[str]:
    """One line per shipped file used: ``recipe: quickstart (shipped: .../recipes/quickstart.yaml)``."""
    words = {"recipes": "recipe", "reward": "reward program", "eval": "suite", "constitutions": "constitution"}
    return [f"{words.get(kind, kind)}: {name} (shipped: {path})" for kind, name, path in used()]


def reset() -> None:
    _used.clear()
