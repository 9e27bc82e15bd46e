"""SAUAdamW's state on disk and in memory: loading a state_dict, counting state bytes.

Split from sau/optim.py (the step); the entry checks live in sau/_optim_checks.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sau._optim_checks import check_loaded_entry, load_value


def tensor_bytes(state: Mapping) -> int:
    """Bytes of every tensor in an optimizer's `state` ({param: {name: value}})."""
    return sum(
        v.numel() * v.element_size()
        for entry in state.values()
        for v in entry.values()
        if isinstance(v, torch.Tensor)
    )


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in any torch optimizer's state (moments, step counters; for
    SAUAdamW also the selection indices and codes: its state_nbytes())."""
    return tensor_bytes(opt.state)


def load_sau_state_dict(opt: torch.optim.Optimizer, state_dict: Mapping) -> None:
    """SAUAdamW.load_state_dict's body (see its docstring): validate every entry, let
    torch restore the param groups from a copy without per-parameter state, then move
    each entry to its parameter's device keeping its dtypes."""
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(g, Mapping) and "amplify" in g for g in state_dict.get("param_groups", [])
    ):
        raise ValueError(
            "not a SAUAdamW state_dict (its param groups have no 'amplify'; a plain "
            "torch.optim.AdamW state_dict has no selection index and cannot be loaded)"
        )
    state_dict = dict(state_dict)
    saved_state = state_dict["state"]
    state_dict["state"] = {}
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    ours = [p for g in opt.param_groups for p in g["params"]]
    id_map = dict(zip(saved_ids, ours))
    for key, entry in saved_state.items():
        if key in id_map:  # before anything changes: a refused load keeps our state
            check_loaded_entry(id_map[key], entry, f"loaded state of parameter {key}")
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    for key, entry in saved_state.items():
        param = id_map.get(key)
        if param is None:  # torch keeps state of unknown ids as is; so do we
            opt.state[key] = entry
            continue
        opt.state[param] = {name: load_value(param, name, v) for name, v in entry.items()}
        # Older checkpoints had no skip counter; every step expects one.
        opt.state[param].setdefault(
            "nonfinite", torch.zeros((), dtype=torch.int64, device=param.device)
        )
