"""Checkpoints of an FSDP2 unlearning run that resume on any number of ranks.

Layout under ``<checkpoint_dir>/sharded/``:

    latest                 the name of the newest complete step directory (one line)
    step-000012/model/     the trainable weights, torch.distributed.checkpoint (DCP)
    step-000012/optim-rank<r>.pt   rank r's SAUAdamW state in GLOBAL positions
    step-000012/meta.pt    loop state from rank 0: config, step, RNG, data order, losses

Optimizer state is written per rank with global positions: a planned parameter's entry
holds ``positions = index + offset`` (int64) with its moments, a dense one the flat start
of its shard with its flat moments. On load each rank keeps the entries that fall into its
own shard, whatever the saved world size, so a run checkpointed on 2 ranks resumes on 1
or on 3. Files are loaded with weights_only=True.

Atomicity: every rank writes into ``step-N.tmp``; after a barrier rank 0 renames it to
``step-N`` and then replaces ``latest`` (os.replace). A kill at any point leaves
``latest`` naming a complete directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from sau.distributed import local
from sau.errors import SAUError
from sau_kernels.distributed import local_shard

__all__ = ["SHARDED_DIR", "has_sharded_checkpoint", "load_sharded", "save_sharded"]

SHARDED_DIR = "sharded"


def has_sharded_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """True when checkpoint_dir holds a complete sharded checkpoint."""
    return (Path(checkpoint_dir) / SHARDED_DIR / "latest").is_file()


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


def save_sharded(checkpoint_dir, dp, params: dict, optimizer, meta: dict) -> None:
    """Write one complete sharded checkpoint (collective: every rank calls it)."""
    root = Path(checkpoint_dir) / SHARDED_DIR
    name = f"step-{meta['step']:09d}"
    tmp = root / f"{name}.tmp"
    if dp.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dp.barrier()
    dcp.save({n: p.detach() for n, p in params.items()}, checkpoint_id=str(tmp / "model"))
    torch.save(
        {"world": dp.world, "state": _optimizer_pieces(params, optimizer)},
        tmp / f"optim-rank{dp.rank}.pt",
    )
    if dp.is_main:
        groups = optimizer.state_dict()["param_groups"]
        torch.save({**meta, "world": dp.world, "param_groups": groups}, tmp / "meta.pt")
    dp.barrier()  # every file of every rank is on disk
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


def load_sharded(checkpoint_dir, params: dict, optimizer) -> dict:
    """Load the newest complete sharded checkpoint into params and optimizer.

    Collective (DCP reads in every rank). Works for any saved and current world size.
    Returns the loop state saved by rank 0 (config, step, rng, order, ref_logp, losses).
    Raises SAUError for a checkpoint whose parameters differ from `params`.
    """
    root = Path(checkpoint_dir) / SHARDED_DIR
    step_dir = root / (root / "latest").read_text().strip()
    meta = torch.load(step_dir / "meta.pt", map_location="cpu", weights_only=True)
    saved = [
        torch.load(step_dir / f"optim-rank{r}.pt", map_location="cpu", weights_only=True)
        for r in range(meta["world"])
    ]
    states = {}
    for piece in saved:
        for name, entry in piece["state"].items():
            states.setdefault(name, []).append(entry)
    if not set(states) <= set(params):
        raise SAUError(f"{step_dir}: checkpoint holds other parameters than this model trains")
    with torch.no_grad():
        dcp.load({n: p.detach() for n, p in params.items()}, checkpoint_id=str(step_dir / "model"))
    ours = optimizer.state_dict()
    name_of = {id(p): n for n, p in params.items()}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(flat):
        name = name_of.get(id(p))
        if name in states:
            state[i] = _merge_state(name, p, states[name])
    groups = [
        {**saved_g, "params": g["params"]}
        for saved_g, g in zip(meta["param_groups"], ours["param_groups"])
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    del meta["param_groups"]
    return meta
