"""`run_sweep`: a resumable grid of pipeline cells with one result file per cell.

Layout of the output directory:

    .sau-sweep.json     the marker: every file this sweep wrote here (sau.lab.outdir)
    sweep.json          the source, settings and grid of the last invocation
    cells/<key>-<fp>.json   one finished cell each, written atomically (temp + rename) the
                        moment it finishes; <fp> fingerprints the source (the SHA-256 of
                        every input file) and the settings, so a changed input or setting
                        never reuses a stale cell
    shared/<key>-<fp>.safetensors   dense-unlearned weights that unlearn-then-prune cells
                        prune, fingerprinted the same way (also in their metadata)
    results.csv, results.json, report.md, *.png   rebuilt from the cell files

A rerun of the same command skips every cell whose file exists: a kill loses at most the
running cell, and a finished grid reruns in seconds without loading a model. Every input
is checked (`Inputs.from_files`, the grid, the settings, the directory) before anything
is written; the directory rules are `sau.lab.outdir.check_sweep_dir`'s.
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
from sau.lab.inputs import Inputs, path_digest
from sau.lab.models.default import build_default, default_cache_dir
from sau.lab.models.presets import PRESETS
from sau.lab.outdir import OutLock, SweepDir, check_sweep_dir, check_writable_dir
from sau.lab.sweep.grid import Cell, expand
from sau.lab.sweep.report import OUTPUTS, write_outputs
from sau.lab.sweep.run import CellRunner, shared_file
from sau.lab.sweep.settings import METRICS, Settings

__all__ = ["Source", "SweepResult", "estimate_memory_bytes", "run_sweep"]

SCHEMA = 3  # bump when a cell's computation or identity changes: old cell files stop matching
_FILES = ("model", "forget", "retain", "holdout", "general", "retain_model")


@dataclass(frozen=True)
class Source:
    """What the sweep unlearns.

    corpus: the embedded default's corpus preset ("default", "quick" or "tofu"; models
    trained or taken from the cache per seed), or None with `model` and the files: a
    local model directory (pruned or not) and TOFU-format QA files; the seed then only
    changes the data order. Without a retain model forget quality is not measured.
    """

    corpus: str | None = "default"
    model: str | None = None
    forget: str | None = None
    retain: str | None = None
    holdout: str | None = None
    general: str | None = None
    retain_model: str | None = None
    cache: str | None = None

    @property
    def has_retain_model(self) -> bool:
        """The embedded default always has one; a model of your own with --retain-model."""
        return self.corpus is not None or bool(self.retain_model)

    def describe(self) -> dict:
        """Where the inputs are (for sweep.json and the report; not the cache)."""
        return {f: getattr(self, f) for f in ("corpus", *_FILES)}

    def reads(self) -> list:
        """Every path the sweep reads: --out may not be, contain or lie inside one."""
        paths = [getattr(self, f) for f in _FILES]
        return [p for p in paths if p] + ([self.cache_dir()] if self.corpus else [])

    def cache_dir(self) -> Path:
        """The embedded default's model cache."""
        return Path(self.cache).expanduser() if self.cache else default_cache_dir()

    def identity(self) -> dict:
        """What the results depend on: the corpus preset, or the SHA-256 of every input
        (`sau.lab.inputs.path_digest`), never the paths."""
        if self.corpus is not None:
            return {"corpus": self.corpus}
        try:
            digests = {
                f: path_digest(getattr(self, f)) if getattr(self, f) else None for f in _FILES
            }
        except OSError as err:
            raise SAUError(f"cannot read an input to fingerprint it: {err}") from None
        return {"corpus": None, "inputs": digests}

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
                    what = "not a regular file" if Path(path).exists() else "no such file"
                    raise SAUError(f"--{label} {path}: {what}")
        else:
            if self.corpus not in PRESETS:
                raise SAUError(f"--corpus must be one of {', '.join(PRESETS)}, got {self.corpus!r}")
            check_writable_dir(self.cache_dir(), "--cache")


@dataclass
class SweepResult:
    """What `run_sweep` did: all rows (one per cell), how many cells ran / were reused."""

    rows: list = field(default_factory=list)
    ran: int = 0
    reused: int = 0
    seconds: float = 0.0
    written: list = field(default_factory=list)


def _fingerprint(identity: dict, settings: Settings) -> str:
    """The cells' fingerprint: the schema, the source's identity (input contents) and
    the settings that change numbers (`Settings.identity`)."""
    blob = json.dumps(
        {"schema": SCHEMA, "source": identity, "settings": settings.identity()},
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


def _loader(source: Source, progress: bool, dtype: str = "float32", max_new_tokens=None):
    """(seed, dtype) -> sau.lab.inputs.Inputs for the source, its models in that dtype.

    The user's model and rows are loaded and checked here, in `dtype` (the first cell's),
    as `sau unlearn` checks them (the seed then only changes the data order), and again
    only when a cell asks for another dtype (one dtype's copy held at a time); the
    embedded default is built per seed when a cell needs it. `max_new_tokens`: the
    evaluation's generation length, checked against the models' context."""
    if source.corpus is None:
        held = {dtype: _user_inputs(source, dtype, max_new_tokens)}

        def load_user(seed: int, dtype: str):
            if dtype not in held:
                held.clear()  # free the other dtype's models first
                held[dtype] = _user_inputs(source, dtype, max_new_tokens)
            return held[dtype]

        return load_user

    def load_default(seed: int, dtype: str):
        cache = source.cache_dir()
        art = build_default(cache, seed=seed, preset=source.corpus, progress=progress)
        return Inputs.from_default(art, dtype=dtype, max_new_tokens=max_new_tokens)

    return load_default


def _user_inputs(source: Source, dtype: str, max_new_tokens=None) -> Inputs:
    """The user's model, retain model and rows, loaded in `dtype` and checked."""
    return Inputs.from_files(
        source.model,
        source.forget,
        source.retain,
        source.holdout,
        source.general,
        source.retain_model,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
    )


def _check_fits(source: Source) -> None:
    need, have = estimate_memory_bytes(source), available_memory_bytes()
    if need > have:
        raise SAUError(
            f"the sweep needs about {need / 2**30:.1f} GiB of memory (9 copies of the model "
            f"+ 0.6 GiB) but {have / 2**30:.1f} GiB are available"
        )


def _cell_file(cell: Cell, fp: str) -> str:
    """Where a finished cell is kept, relative to the sweep's directory."""
    return f"cells/{cell.key()}-{fp}.json"


def _is_number(value) -> bool:
    # NaN and inf included: json writes a metric that is NaN as NaN, and reads it back
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell_problem(data, cell: Cell, fp: str, bits) -> str | None:
    """Why `data` (a parsed cell file) is not `cell`'s result under `fp`, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("fingerprint") != fp or data.get("key") != cell.key():
        return f"its key or fingerprint is not {cell.key()}, {fp}"
    for name, value in cell.to_dict().items():
        if name in data and data[name] != value:  # absent: a file from before the setting
            return f"{name} is {data[name]!r}, not {value!r}"
    metrics = [*METRICS, *(f"q{b}_{m}" for b in bits for m in METRICS)]
    for name in (*metrics, "seconds", "eval_seconds"):
        value = data.get(name)
        if value is not None and not _is_number(value):
            return f"{name} is {value!r}, not a number"
    tr = data.get("forget_truth_ratio")
    if tr is not None and not (isinstance(tr, list) and all(map(_is_number, tr))):
        return "forget_truth_ratio is not a list of numbers"
    return None


class _Cells:
    """The sweep's cell files: read (and checked) once, written as cells finish."""

    def __init__(self, store: SweepDir, cells: list, fp: str, bits) -> None:
        self.store, self.fp, self.bits = store, fp, bits
        self.rel = {c: _cell_file(c, fp) for c in cells}
        self.rows: dict = {}
        for cell in cells:
            row = self._read(cell)
            if row is not None:
                self.rows[cell] = row

    def _read(self, cell: Cell) -> dict | None:
        rel = self.rel[cell]
        path = self.store.out / rel
        if not (path.exists() or path.is_symlink()):
            return None
        if not self.store.owns(rel):
            raise SAUError(f"{path}: not a file this sweep wrote; move it away")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))  # JSON only, never pickle
        except (OSError, UnicodeDecodeError, ValueError) as err:
            msg = f"{path}: unreadable cell file ({err}); delete it to rerun the cell"
            raise SAUError(msg) from None
        problem = _cell_problem(data, cell, self.fp, self.bits)
        if problem:
            raise SAUError(f"{path}: not this cell's result ({problem}); delete it to rerun it")
        # The cell's settings first: a file written before a setting existed (dtype,
        # rounding, state_bits) gets the value its key stands for.
        return {**cell.to_dict(), **data}

    def lookup(self, cell: Cell) -> dict | None:
        """The finished row of `cell`, or None."""
        return self.rows.get(cell)

    def write(self, cell: Cell, row: dict) -> None:
        """Record a finished cell: its file (atomically), then its row."""
        row = {**row, "fingerprint": self.fp}
        self.store.write_text(self.rel[cell], json.dumps(row, indent=1) + "\n")
        self.rows[cell] = {**cell.to_dict(), **row}


def _run_cells(runner: CellRunner, todo: list, files: _Cells, progress: bool) -> int:
    """Run `todo` in order, each result written atomically the moment it is done."""
    with tqdm(total=len(todo), desc="sweep", unit="cell", disable=not progress) as bar:
        for cell in todo:
            bar.set_postfix_str(cell.key(), refresh=True)
            files.write(cell, runner.run(cell))
            bar.update(1)
    return len(todo)


def _writes(cells: list, fp: str) -> list[str]:
    """Every file (relative path) the sweep over `cells` may write."""
    shared = [shared_file(c, fp) for c in cells]
    cell_files = [_cell_file(c, fp) for c in cells]
    return ["sweep.json", *OUTPUTS, *cell_files, *(f for f in shared if f)]


@dataclass
class _Plan:
    """A checked sweep, ready to run: its cells, fingerprint, meta and input loader."""

    cells: list
    fp: str
    meta: dict
    loader: object
    writes: list


def _check_generation(source: Source, settings: Settings) -> None:
    """The embedded model's context must leave room for a question before max_new_tokens
    (every question is checked too, when the corpus is built: `Inputs.from_default`)."""
    if source.corpus is None:
        return  # checked with every question by Inputs.from_files
    context = PRESETS[source.corpus].model.max_position_embeddings
    if settings.max_new_tokens >= context:
        raise SAUError(
            f"max_new_tokens {settings.max_new_tokens} leaves no room for a question in the "
            f"{source.corpus} model's context of {context}"
        )


def _prepare(
    blocks, out: Path, source: Source, settings: Settings, overrides, run_missing, progress
) -> _Plan:
    """Every check, cheapest first, before anything is written: settings, source, grid,
    memory, the directory, then the inputs themselves (loaded as `sau unlearn` loads
    them) and their fingerprint."""
    settings.check()
    source.check()
    _check_generation(source, settings)
    cells = expand(blocks, overrides, retain=source.has_retain_model)
    _check_fits(source)
    fp = _fingerprint(source.identity(), settings)
    writes = _writes(cells, fp)
    check_sweep_dir(out, inputs=source.reads(), writes=writes)
    loader = None
    if run_missing:
        loader = _loader(source, progress, cells[0].dtype, settings.max_new_tokens)
    meta = {
        "source": source.describe(),
        "settings": settings.to_dict(),
        "fingerprint": fp,
        "grid": blocks,
        "overrides": overrides or {},
    }
    return _Plan(cells, fp, meta, loader, writes)


def _sweep_locked(plan: _Plan, store: SweepDir, settings, progress, run_missing, log):
    """Under the output lock: read the finished cells, record the sweep, run the missing
    cells (unless not run_missing) and collect every finished row; meta["missing"] is set."""
    files = _Cells(store, plan.cells, plan.fp, settings.bits)  # refuses a bad file first
    store.open(plan.writes)
    store.write_text("sweep.json", json.dumps(plan.meta, indent=2, default=list) + "\n")
    result = SweepResult()
    todo = [c for c in plan.cells if files.lookup(c) is None]
    result.reused = len(plan.cells) - len(todo)
    if todo and run_missing:
        log(f"sweep: {len(todo)} of {len(plan.cells)} cells to run ({result.reused} done before)")
        runner = CellRunner(plan.loader, settings, store, files.lookup, plan.fp)
        result.ran = _run_cells(runner, todo, files, progress)
    result.rows = [row for row in map(files.lookup, plan.cells) if row is not None]
    plan.meta["missing"] = len(plan.cells) - len(result.rows)
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
        out_dir: output directory: new, empty, or a sweep's (`check_sweep_dir`).
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
        SAUError: bad axis values or settings, an empty grid, a source that cannot be
            used (inputs as `sau unlearn` refuses them), a grid that would not fit in
            memory, an output directory the sweep may not write or one in use, or a cell
            file that is not this sweep's; all before anything is written.
    """
    t_start = time.perf_counter()
    source, settings = source or Source(), settings or Settings()
    out = Path(out_dir).expanduser()
    plan = _prepare(blocks, out, source, settings, overrides, run_missing, progress)
    with OutLock(out):
        store = SweepDir(out)
        result = _sweep_locked(plan, store, settings, progress, run_missing, log)
        if report and (result.ran or not run_missing or not store.owns("results.json")):
            result.written = write_outputs(result.rows, store, plan.meta)
    result.seconds = time.perf_counter() - t_start
    return result
