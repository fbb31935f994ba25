"""A model-free stage kind for pipeline tests: writes its message, counts its runs, can fail on demand, and can
hold (wait for a file to appear) so that a test can act while a run is live."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from alignkit.core.config import DataSpec
from alignkit.core.stage import StageResult
from alignkit.core.stage import StageConfig


class Config(StageConfig):
    kind: str = "echo"
    message: str = "hello"
    upstream: str | None = None
    model: str | None = None
    data: DataSpec | None = None
    repeat: int = Field(1, gt=0)
    fail: bool = False
    hold: str | None = None  # wait until this file exists (the manifest already says running)
    main_only_seconds: float = 0.0  # the main rank works this long alone while the others wait at the barrier


def outputs(run_dir: Path) -> dict[str, str]:
    return {"file": str(run_dir / "out.txt"), "model": str(run_dir / "model")}


def run(config: Config, ctx) -> StageResult:
    while config.hold and not Path(config.hold).exists():
        time.sleep(0.05)
    runs_file = ctx.run_dir.parent / f"{ctx.name}.runs"  # outside the stage folder: survives a rerun
    if ctx.is_main:  # ranks of one launch would race on the read-modify-write (one read it half-written)
        runs_file.write_text(str(int(runs_file.read_text()) + 1 if runs_file.exists() else 1))
    text = config.message * config.repeat
    if config.upstream:
        text = Path(config.upstream).read_text() + "|" + text
    if config.fail:
        raise RuntimeError("planned failure")
    if ctx.is_main:
        time.sleep(config.main_only_seconds)
    if ctx.is_main:  # one writer: another rank may be reading it as an upstream
        (ctx.run_dir / "out.txt").write_text(text)
    ctx.log({"echo/length": len(text)})
    return StageResult(metrics={"length": len(text)}, artifacts={"file": str(ctx.run_dir / "out.txt")})
