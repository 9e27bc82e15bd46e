"""`run_sweep`: a resumable grid of pipeline cells with one result file per cell.

Layout of the output directory:

    sweep.json          the source, settings and grid of the last invocation
    cells/<key>-<fp>.json   one finished cell each, written atomically (temp + rename) the
                        moment it finishes; <fp> fingerprints the source and settings, so
                        a changed setting never reuses a stale cell
    shared/             dense-unlearned weights that unlearn-then-prune cells prune
    results.csv, results.json, report.md, *.png   rebuilt from the cell files

A rerun of the same command skips every cell whose file exists: a kill loses at most the
running cell, and a finished grid reruns in seconds without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from sau.errors import SAUError
from sau.lab.inputs import Inputs
from sau.lab.models.default import build_default
from sau.lab.models.presets import PRESETS
from sau.lab.outdir import OutLock, check_out_dir, write_atomic
from sau.lab.sweep.grid import Cell, expand
from sau.lab.sweep.report import write_outputs
from sau.lab.sweep.run import CellRunner
from sau.lab.sweep.settings import Settings

__all__ = ["Source", "SweepResult", "estimate_memory_bytes", "run_sweep"]

SCHEMA = 1  # bump when a cell's computation changes: old cell files stop matching


@dataclass(frozen=True)
class Source:
    """What the sweep unlearns.

    corpus: the embedded default's corpus preset ("default", "quick" or "tofu"; models
    trained or taken from the cache per seed), or None with `model` and the files: a
    local model directory (pruned or not) and TOFU-format QA files; the seed then only
    changes the data order.
    """

    corpus: str | None = "default"
    model: str | None = None
    forget: str | None = None
    retain: str | None = None
    holdout: str | None = None
    general: str | None = None
    retain_model: str | None = None
    cache: str | None = None

    def identity(self) -> dict:
        """What the results depend on (not where the cache lives)."""
        fields = ("corpus", "model", "forget", "retain", "holdout", "general", "retain_model")
        return {f: getattr(self, f) for f in fields}

    def check(self) -> None:
        """One line for a source no sweep can use (before any work)."""
        if self.corpus is None:
            if not self.model or not self.forget or not self.retain:
                raise SAUError("a sweep on your model needs --model, --forget and --retain")
            for label, path in (("--model", self.model), ("--retain-model", self.retain_model)):
                if path and not Path(path).is_dir():
                    raise SAUError(f"{label} {path}: not a directory")
            for label in ("forget", "retain", "holdout", "general"):
                path = getattr(self, label)
                if path and not Path(path).is_file():
                    raise SAUError(f"--{label} {path}: no such file")
        else:
            if self.corpus not in PRESETS:
                raise SAUError(f"--corpus must be one of {', '.join(PRESETS)}, got {self.corpus!r}")


@dataclass
class SweepResult:
    """What `run_sweep` did: all rows (one per cell), how many cells ran / were reused."""

    rows: list = field(default_factory=list)
    ran: int = 0
    reused: int = 0
    seconds: float = 0.0
    written: list = field(default_factory=list)


def _fingerprint(source: Source, settings: Settings) -> str:
    blob = json.dumps(
        {"schema": SCHEMA, "source": source.identity(), "settings": settings.to_dict()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _model_bytes(source: Source) -> int:
    """Bytes of one copy of the model's weights, from the files or the preset's shape."""
    if source.corpus is None:
        files = [p for p in Path(source.model).iterdir() if p.suffix in (".safetensors", ".bin")]
        return sum(p.stat().st_size for p in files)
    m = PRESETS[source.corpus].model
    h, i, layers = m.hidden_size, m.intermediate_size, m.num_hidden_layers
    params = m.vocab_size * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    return 4 * params


def estimate_memory_bytes(source: Source) -> int:
    """Peak resident bytes of a sweep, estimated before anything is loaded.

    Models held at once: target, retain model, the pruned start, the working copy, its
    quantized copy, a saliency map (fp32) and, while unlearning, gradients and two Adam
    moments: about 9 model-sizes, plus ~0.6 GiB for torch, transformers and activations.
    """
    return 9 * _model_bytes(source) + int(0.6 * 2**30)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere, physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_out(out: Path, source: Source) -> None:
    """An earlier sweep's directory is continued (if no input lies in it); anything else
    goes through the project's output-directory rules (sau.lab.outdir.check_out_dir: empty or
    absent, not a symbolic link, not overlapping an input)."""
    names = ("model", "forget", "retain", "holdout", "general", "retain_model")
    inputs = [Path(p).expanduser().resolve() for p in map(source.__getattribute__, names) if p]
    if (out / "sweep.json").is_file() and not out.is_symlink():
        real = out.resolve()
        for path in inputs:
            if path == real or real in path.parents or path in real.parents:
                raise SAUError(f"--out {out}: overlaps the input {path}; choose another directory")
        return
    try:
        check_out_dir(out, inputs=inputs)
    except SAUError as err:
        raise SAUError(str(err).replace("is not a sau output", "is not a sau sweep")) from None


def _loader(source: Source, progress: bool, dtype: str = "float32"):
    """(seed, dtype) -> sau.lab.inputs.Inputs for the source, its models in that dtype.

    The user's model and rows are loaded and checked here, in `dtype` (the first cell's),
    as `sau unlearn` checks them (the seed then only changes the data order), and again
    only when a cell asks for another dtype (one dtype's copy held at a time); the
    embedded default is built per seed when a cell needs it."""
    if source.corpus is None:
        held = {dtype: _user_inputs(source, dtype)}

        def load_user(seed: int, dtype: str):
            if dtype not in held:
                held.clear()  # free the other dtype's models first
                held[dtype] = _user_inputs(source, dtype)
            return held[dtype]

        return load_user

    def load_default(seed: int, dtype: str):
        art = build_default(source.cache, seed=seed, preset=source.corpus, progress=progress)
        return Inputs.from_default(art, dtype=dtype)

    return load_default


def _user_inputs(source: Source, dtype: str) -> Inputs:
    """The user's model, retain model and rows, loaded in `dtype` and checked."""
    return Inputs.from_files(
        source.model,
        source.forget,
        source.retain,
        source.holdout,
        source.general,
        source.retain_model,
        dtype=dtype,
    )


def _run_cells(runner: CellRunner, todo: list, paths: dict, fp: str, progress: bool) -> int:
    """Run `todo` in order, each result written atomically the moment it is done."""
    with tqdm(total=len(todo), desc="sweep", unit="cell", disable=not progress) as bar:
        for cell in todo:
            bar.set_postfix_str(cell.key(), refresh=True)
            row = runner.run(cell)
            row["fingerprint"] = fp
            write_atomic(paths[cell], json.dumps(row, indent=1) + "\n")
            bar.update(1)
    return len(todo)


def _check_fits(source: Source) -> None:
    need, have = estimate_memory_bytes(source), available_memory_bytes()
    if need > have:
        raise SAUError(
            f"the sweep needs about {need / 2**30:.1f} GiB of memory (9 copies of the model "
            f"+ 0.6 GiB) but {have / 2**30:.1f} GiB are available"
        )


def _sweep_locked(cells, out: Path, meta: dict, loader, settings, progress, run_missing, log):
    """Under the output lock: record the sweep, run the missing cells (unless not
    run_missing), and collect every finished cell's row; meta["missing"] is set."""
    fp = meta["fingerprint"]
    paths = {c: out / "cells" / f"{c.key()}-{fp}.json" for c in cells}

    def lookup(cell: Cell):
        path = paths.get(cell) or out / "cells" / f"{cell.key()}-{fp}.json"
        if not path.is_file():
            return None
        # The cell's settings first: a file written before a setting existed (dtype,
        # rounding, state_bits) gets the value its key stands for.
        return {**cell.to_dict(), **json.loads(path.read_text(encoding="utf-8"))}

    result = SweepResult()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep.json", json.dumps(meta, indent=2, default=list) + "\n")
    todo = [c for c in cells if not paths[c].is_file()]
    result.reused = len(cells) - len(todo)
    if todo and run_missing:
        log(f"sweep: {len(todo)} of {len(cells)} cells to run ({result.reused} done before)")
        runner = CellRunner(loader, settings, out / "shared", lookup)
        result.ran = _run_cells(runner, todo, paths, fp, progress)
    result.rows = [row for row in map(lookup, cells) if row is not None]
    meta["missing"] = len(cells) - len(result.rows)
    return result


def run_sweep(
    blocks: list[dict],
    out_dir,
    *,
    source: Source | None = None,
    settings: Settings | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    report: bool = True,
    run_missing: bool = True,
    log=print,
) -> SweepResult:
    """Run every cell of the grid not finished yet in `out_dir`, then write the outputs.

    Args:
        blocks: the grid (`sau.lab.sweep.PRESETS[name]` or a list of {axis: values}).
        out_dir: output directory (created; a non-empty non-sweep directory is refused).
        source: Source (default: the embedded default corpus).
        settings: Settings (epochs, evaluation sizes, quantization widths).
        overrides: {axis: values} replacing those axes in every block.
        progress: a tqdm bar over cells with an ETA.
        report: write results.csv/json, report.md and plots.
        run_missing: False only reports the cells finished so far (the report says how
            many are missing).
        log: one-line messages.

    Returns:
        SweepResult with one row (dict) per cell of the grid, references included.

    Raises:
        SAUError: bad axis values, an empty grid, a source that cannot be used, a grid
            that would not fit in memory, or an output directory in use.
    """
    t_start = time.perf_counter()
    source, settings = source or Source(), settings or Settings()
    cells = expand(blocks, overrides)
    source.check()
    _check_fits(source)
    out = Path(out_dir).expanduser()
    _check_out(out, source)
    loader = _loader(source, progress, cells[0].dtype) if run_missing else None
    fp = _fingerprint(source, settings)
    meta = {
        "source": source.identity(),
        "settings": settings.to_dict(),
        "fingerprint": fp,
        "grid": blocks,
        "overrides": overrides or {},
    }
    with OutLock(out):
        result = _sweep_locked(cells, out, meta, loader, settings, progress, run_missing, log)
        if report and (result.ran or not run_missing or not (out / "results.json").is_file()):
            result.written = write_outputs(result.rows, out, meta)
    result.seconds = time.perf_counter() - t_start
    return result
