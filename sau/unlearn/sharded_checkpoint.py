"""Checkpoints of an FSDP2 unlearning run that resume on any number of ranks.

Layout under ``<checkpoint_dir>/sharded/``:

    latest                          the name of the newest complete step directory
    step-000000012/weights-rank<r>.safetensors   rank r's shards of the trainable weights
    step-000000012/optim-rank<r>.pt  rank r's SAUAdamW state in GLOBAL positions
    step-000000012/meta.pt          loop state from rank 0: config, step, RNG, data order,
                                    losses, the world size and the optimizer's groups

Weights: one flat 1-D tensor per parameter, holding the rank's contiguous flat range of
it (FSDP2 shards dim 0); the safetensors header records each range's flat start and the
parameter's global shape. Optimizer state: a planned parameter's entry holds
``positions = index + offset`` (int64) with its moments, a dense one the flat start of its
shard with its flat moments. On load each rank keeps what falls into its own shard,
whatever the saved world size, so a run checkpointed on 2 ranks resumes on 1 or on 3.

Nothing here is unpickled beyond tensors: weights are safetensors (a JSON header and raw
bytes), the two .pt files are read with ``torch.load(weights_only=True)``. ``latest`` must
name a step directory right beside it (``step-`` and digits; no separator, no ``..``, no
symbolic link), and no file of the step is read through a symbolic link. A file that is
missing, truncated, foreign or inconsistent (ranges that overlap or leave a gap, another
shape or dtype) is refused with one SAUError line. Under torchrun every rank reads, the
ranks then agree, and every rank raises rank 0's message (or the first failing rank's).
The optimizer state is loaded (and checked by SAUAdamW.load_state_dict) before any weight
is written, so a refused checkpoint leaves the weights as they were.

Atomicity: every rank writes into ``step-N.tmp``; once every rank has written, rank 0
renames it to ``step-N`` and then replaces ``latest`` (os.replace). A kill at any point
leaves ``latest`` naming a complete directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sau.distributed import local
from sau.errors import SAUError
from sau.unlearn.checkpoint import first_line, load_tensors_only
from sau_kernels.distributed import local_shard

__all__ = ["SHARDED_DIR", "has_sharded_checkpoint", "load_sharded", "save_sharded"]

SHARDED_DIR = "sharded"
_STEP_NAME = re.compile(r"step-[0-9]{9,18}")
_META_KEYS = ("step", "world", "param_groups")  # the loop checks its own (sau.unlearn.loop)
_ADVICE = "start the run over (sau unlearn: --force instead of --resume)"


def has_sharded_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when checkpoint_dir holds a sharded checkpoint's ``latest`` pointer."""
    latest = Path(checkpoint_dir) / SHARDED_DIR / "latest"
    return latest.is_file() or latest.is_symlink()


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _optimizer_pieces(params: dict, optimizer) -> dict:
    """{name: this rank's state of that parameter, in global positions}."""
    out = {}
    for name, p in params.items():
        st = optimizer.state.get(p)
        if not st:
            continue
        _, offset, _ = local_shard(p.detach())
        entry = {k: v for k, v in st.items() if k not in ("index", "exp_avg", "exp_avg_sq")}
        entry["exp_avg"], entry["exp_avg_sq"] = st["exp_avg"].cpu(), st["exp_avg_sq"].cpu()
        if "index" in st:
            entry["positions"] = st["index"].cpu().long() + offset
        else:
            entry["start"] = offset
            entry["exp_avg"], entry["exp_avg_sq"] = (
                entry["exp_avg"].reshape(-1),
                entry["exp_avg_sq"].reshape(-1),
            )
        out[name] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
    return out


def _write_weights(path: Path, params: dict) -> None:
    """This rank's flat shard of every parameter, with its flat start and global shape."""
    tensors, starts, shapes = {}, {}, {}
    for name, p in params.items():
        shard, offset, _ = local_shard(p.detach())
        tensors[name] = shard.detach().reshape(-1).contiguous().cpu()
        starts[name], shapes[name] = int(offset), list(p.shape)
    meta = {"starts": json.dumps(starts), "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=meta)


def _write_rank_files(tmp: Path, dp, params: dict, optimizer, meta: dict) -> None:
    _write_weights(tmp / f"weights-rank{dp.rank}.safetensors", params)
    torch.save(
        {"world": dp.world, "state": _optimizer_pieces(params, optimizer)},
        tmp / f"optim-rank{dp.rank}.pt",
    )
    if dp.is_main:
        groups = optimizer.state_dict()["param_groups"]
        torch.save({**meta, "world": dp.world, "param_groups": groups}, tmp / "meta.pt")


def save_sharded(checkpoint_dir, dp, params: dict, optimizer, meta: dict) -> None:
    """Write one complete sharded checkpoint (collective: every rank calls it).

    Raises SAUError on every rank when any rank could not write its files (disk full,
    permissions): the ranks agree before anything is published.
    """
    root = Path(checkpoint_dir) / SHARDED_DIR
    name = f"step-{meta['step']:09d}"
    tmp = root / f"{name}.tmp"
    if dp.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dp.barrier()
    error = None
    try:
        _write_rank_files(tmp, dp, params, optimizer, meta)
    except OSError as err:
        error = f"cannot write the checkpoint in {tmp}: {err}"
    dp.raise_first(error)  # every file of every rank is on disk, or every rank stops
    if dp.is_main:
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", name)
        for old in root.iterdir():  # older complete steps and abandoned temporaries
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dp.barrier()


def _step_dir(root: Path) -> Path:
    """The step directory `latest` names: a plain sibling directory, never a link."""
    latest = root / "latest"
    if root.is_symlink() or latest.is_symlink():
        raise SAUError(f"{latest}: is a symbolic link; sau never follows one; {_ADVICE}")
    with open(_plain_file(latest), "rb") as fh:  # a regular file: a FIFO would block
        raw = fh.read(64)
    name = raw.decode("ascii", errors="replace").strip()
    if not _STEP_NAME.fullmatch(name):
        raise SAUError(
            f"{latest}: does not name a step directory (step-NNNNNNNNN beside it), "
            f"got {name[:40]!r}; {_ADVICE}"
        )
    step_dir = root / name
    if step_dir.is_symlink() or not step_dir.is_dir():
        raise SAUError(f"{step_dir}: missing or not a plain directory; {_ADVICE}")
    return step_dir


def _plain_file(path: Path) -> Path:
    if path.is_symlink() or not path.is_file():
        raise SAUError(f"{path}: missing or not a plain file; {_ADVICE}")
    return path


def _load_pt(path: Path) -> dict:
    """A .pt file of the checkpoint, tensors and plain containers only."""
    state = load_tensors_only(_plain_file(path))
    if not isinstance(state, dict):
        raise SAUError(f"{path}: not a sau checkpoint file (expected a dict)")
    return state


def _read_meta(step_dir: Path) -> dict:
    meta = _load_pt(step_dir / "meta.pt")
    missing = [k for k in _META_KEYS if k not in meta]
    world = meta.get("world")
    if missing or isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SAUError(f"{step_dir / 'meta.pt'}: not a sau checkpoint (missing or bad fields)")
    if not isinstance(meta["param_groups"], list):
        raise SAUError(f"{step_dir / 'meta.pt'}: param_groups must be a list")
    return meta


def _read_states(step_dir: Path, world: int, params: dict) -> dict[str, list[dict]]:
    """{name: every saved rank's optimizer piece of it}."""
    states: dict[str, list[dict]] = {}
    for r in range(world):
        piece = _load_pt(step_dir / f"optim-rank{r}.pt").get("state")
        if not isinstance(piece, dict) or not all(isinstance(e, dict) for e in piece.values()):
            raise SAUError(f"{step_dir / f'optim-rank{r}.pt'}: not a sau optimizer shard")
        for name, entry in piece.items():
            states.setdefault(name, []).append(entry)
    if not set(states) <= set(params):
        raise SAUError(f"{step_dir}: checkpoint holds other parameters than this model trains")
    return states


def _int_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _weight_header(fh, path: Path, params: dict) -> tuple[dict, dict]:
    """(starts, shapes) of one rank's weights file, checked against `params`."""
    meta = fh.metadata() or {}
    starts, shapes = json.loads(meta.get("starts", "null")), json.loads(meta.get("shapes", "null"))
    if not isinstance(starts, dict) or not isinstance(shapes, dict):
        raise SAUError(f"{path}: not a sau weights shard (no starts / shapes in its header)")
    if set(fh.keys()) != set(starts) or set(starts) != set(shapes) or set(starts) != set(params):
        raise SAUError(f"{path}: holds other parameters than this model trains")
    for name, p in params.items():
        if not _int_list(shapes[name]) or shapes[name] != list(p.shape):
            raise SAUError(
                f"{path}: {name} has shape {shapes[name]}, this model's is {list(p.shape)}"
            )
        if isinstance(starts[name], bool) or not isinstance(starts[name], int):
            raise SAUError(f"{path}: {name} has no integer flat start")
    return starts, shapes


def _weight_shards(step_dir: Path, world: int, params: dict) -> dict[str, torch.Tensor]:
    """{name: this rank's shard of it}, from every saved rank's file (only the overlap
    with this rank's range is read)."""
    with contextlib.ExitStack() as stack:
        pieces: dict[str, list] = {name: [] for name in params}
        for r in range(world):
            path = _plain_file(step_dir / f"weights-rank{r}.safetensors")
            try:
                fh = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
                raise SAUError(
                    f"{path}: not a readable safetensors file (corrupt, truncated or "
                    f"foreign: {first_line(err)}); {_ADVICE}"
                ) from None
            starts, _ = _weight_header(fh, path, params)
            for name in params:
                pieces[name].append((starts[name], fh.get_slice(name)))
        return {name: _assemble(name, p, pieces[name]) for name, p in params.items()}


def _assemble(name: str, p: torch.Tensor, pieces: list) -> torch.Tensor:
    """This rank's shard of `p` from the saved (flat start, safetensors slice) ranges,
    which must be 1-D in p's dtype and tile the whole tensor (no gap, no overlap)."""
    shard = local(p.detach())
    _, lo, _ = local_shard(p.detach())
    hi, pos = lo + shard.numel(), 0
    out = torch.empty(shard.numel(), dtype=shard.dtype)
    for start, values in sorted(pieces, key=lambda x: x[0]):
        shape, dtype = values.get_shape(), values[0:0].dtype
        if len(shape) != 1 or dtype != shard.dtype or start != pos:
            raise SAUError(
                f"checkpoint's {name}: saved ranges do not tile the tensor in {shard.dtype} "
                f"(a range at {start} of {dtype}, expected one at {pos})"
            )
        a, b = max(lo, start), min(hi, start + shape[0])
        if a < b:
            out[a - lo : b - lo] = values[a - start : b - start]
        pos = start + shape[0]
    if pos != p.numel():
        raise SAUError(f"checkpoint's {name}: saved ranges cover {pos} of {p.numel()} entries")
    return out.view(shard.shape)


def _merge_state(name: str, p: torch.Tensor, pieces: list[dict]) -> dict:
    """This rank's optimizer state of `p` from every saved rank's piece of it."""
    shard = local(p.detach())
    _, lo, _ = local_shard(p.detach())
    hi = lo + shard.numel()
    first = pieces[0]
    entry = {k: v for k, v in first.items() if k not in ("positions", "start")}
    entry["nonfinite"] = sum(int(x["nonfinite"]) for x in pieces) if lo == 0 else 0
    entry["nonfinite"] = torch.tensor(entry["nonfinite"], dtype=torch.int64)
    if "positions" in first:
        pos, m, v = [], [], []
        for x in pieces:
            keep = (x["positions"] >= lo) & (x["positions"] < hi)
            pos.append(x["positions"][keep] - lo)
            m.append(x["exp_avg"][keep])
            v.append(x["exp_avg_sq"][keep])
        order = torch.argsort(torch.cat(pos))
        index = torch.cat(pos)[order]
        entry["index"] = index.to(
            first["positions"].dtype if index.numel() >= 2**31 else torch.int32
        )
        entry["exp_avg"], entry["exp_avg_sq"] = torch.cat(m)[order], torch.cat(v)[order]
        return entry
    m = torch.zeros(shard.numel(), dtype=torch.float32)
    v = torch.zeros(shard.numel(), dtype=torch.float32)
    for x in pieces:  # copy the overlap of each saved range with ours
        a, b = max(lo, x["start"]), min(hi, x["start"] + x["exp_avg"].numel())
        if a < b:
            m[a - lo : b - lo] = x["exp_avg"][a - x["start"] : b - x["start"]]
            v[a - lo : b - lo] = x["exp_avg_sq"][a - x["start"] : b - x["start"]]
    entry["exp_avg"], entry["exp_avg_sq"] = m.view(shard.shape), v.view(shard.shape)
    return entry


def _optimizer_state(params: dict, optimizer, meta: dict, states: dict) -> dict:
    """The state_dict to load into `optimizer`: each parameter's merged state, in
    optimizer order, with the saved groups' hyper-parameters."""
    ours = optimizer.state_dict()
    name_of = {id(p): n for n, p in params.items()}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(flat):
        name = name_of.get(id(p))
        if name in states:
            state[i] = _merge_state(name, p, states[name])
    if len(meta["param_groups"]) != len(ours["param_groups"]):
        raise SAUError("checkpoint's optimizer has another number of parameter groups")
    groups = [
        {**saved_g, "params": g["params"]}
        for saved_g, g in zip(meta["param_groups"], ours["param_groups"])
    ]
    return {"state": state, "param_groups": groups}


def _load_here(checkpoint_dir, params: dict, optimizer) -> dict:
    """This rank's part of `load_sharded`; any failure is one SAUError line."""
    root = Path(checkpoint_dir) / SHARDED_DIR
    where = root
    try:
        where = _step_dir(root)
        meta = _read_meta(where)
        states = _read_states(where, meta["world"], params)
        shards = _weight_shards(where, meta["world"], params)
        sd = _optimizer_state(params, optimizer, meta, states)
    except SAUError as err:
        raise SAUError(f"{err}" if str(where) in str(err) else f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - malformed content of a readable file
        raise SAUError(f"{where}: not a sau checkpoint ({first_line(err)}); {_ADVICE}") from None
    try:  # SAUAdamW checks every index, moment and pruned entry before changing anything
        optimizer.load_state_dict(sd)
    except Exception as err:  # noqa: BLE001 - ranks must agree, whatever the loader raised
        raise SAUError(
            f"{where}: checkpoint does not fit this run: {first_line(err, 300)}"
        ) from None
    with torch.no_grad():
        for name, p in params.items():
            local(p.detach()).copy_(shards[name])
    del meta["param_groups"]
    return meta


def load_sharded(checkpoint_dir, params: dict, optimizer, dp=None) -> dict:
    """Load the newest complete sharded checkpoint into params and optimizer.

    Each rank reads every saved rank's files (no collective while reading) and keeps its
    own shard; works for any saved and current world size. With `dp` (a
    sau.distributed.DataParallel) the ranks then agree: when any rank failed, every rank
    raises the same SAUError (the lowest failing rank's message).

    Returns the loop state saved by rank 0 (config, step, rng, order, ref_logp, losses,
    world).

    Raises:
        SAUError: one line naming the file or parameter: a `latest` that names no step
            directory beside it, a missing, linked, truncated or foreign file, weights of
            another shape or dtype, saved ranges with a gap or an overlap, or optimizer
            state that SAUAdamW refuses (bad index, a pruned entry, wrong moments).
    """
    error, meta = None, None
    try:
        meta = _load_here(checkpoint_dir, params, optimizer)
    except SAUError as err:
        if dp is None:
            raise
        error = str(err)
    if dp is not None:
        dp.raise_first(error)
    return meta
