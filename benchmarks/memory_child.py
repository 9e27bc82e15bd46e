"""One configuration of benchmarks/memory.py, run in a fresh process (its own peak).

    python benchmarks/memory_child.py '<spec json>'     # prints one line: RESULT <json>

The spec names a configuration, the model's dimensions, the depths (decoder layers) to
build, the tokens per batch, dtype and device. For each depth the child builds a
Llama-architecture model from a transformers config with random weights, prunes every
decoder Linear weight 50% by magnitude (or, with spec["cache"], reads that model from the
files the `prepare` child wrote: benchmarks/memory_cache.py), records the memory in use,
resets the peak, runs the configuration and records the peak. Only the decoder Linear
weights are trainable (embeddings, norms and lm_head are frozen), as in the pipeline.

Memory meters: on CUDA torch.cuda.max_memory_allocated (reset per depth); on the CPU the
resident set's high-water mark VmHWM, reset per depth by writing 5 to
/proc/self/clear_refs (Linux >= 4.0), plus getrusage's ru_maxrss of the whole child.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import PreTrainedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages below

from benchmarks.memory_cache import PLAN_JSON, load_model_into, load_plan, save_model, save_plan  # noqa: E402,E501
from sau import SAUAdamW, compute_saliency, plan_selection  # noqa: E402
from sau.optim import optimizer_state_bytes  # noqa: E402
from sau.prune import target_linear_names  # noqa: E402
from sau.unlearn.objectives import nll, objective_loss  # noqa: E402


class Meter:
    """Bytes in use and peak bytes since reset(), on CUDA (allocator) or CPU (RSS)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def settle(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return _proc_status("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status("VmHWM")

    def extra(self) -> dict:
        if self.cuda:
            return {"max_reserved": torch.cuda.max_memory_reserved()}
        return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def _skeleton(dims: dict, layers: int, dtype: torch.dtype, device: torch.device, init: bool):
    """LlamaForCausalLM from a transformers config, parameters in `dtype`, without the
    Linear and Embedding initializers (init=False: without any initializer, for a model
    whose every tensor is then read from the cache)."""
    cfg = LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`, never in float32
    try:
        with torch.device(device), _cheap_init(skip_all=not init):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)


def _trainable(model, names) -> None:
    """Only the decoder Linear weights train (embeddings, norms and lm_head are frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        model.get_parameter(n).requires_grad_(True)
    model.train()


def build_model(dims: dict, layers: int, dtype: torch.dtype, device: torch.device):
    """Random-weight Llama, decoder Linear weights pruned 50% by magnitude.

    The magnitude threshold of each weight is the median |w| of a 2**20-entry random
    sample: a deliberate speed bypass of sau.prune.prune_model, whose exact per-layer
    sort of a billion entries would dominate the run (the sparsity lands within ~0.1% of
    50%). Returns (model, names of the decoder Linear weights).
    """
    model = _skeleton(dims, layers, dtype, device, init=True)
    names = target_linear_names(model)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):  # std 0.02, like transformers' init
                m.weight.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=gen)
        for n in names:
            w = model.get_parameter(n)
            flat = w.view(-1)
            pick = torch.randint(0, flat.numel(), (2**20,), generator=gen, device=device)
            tau = flat[pick].abs().float().median()
            w.masked_fill_(w.abs() <= tau, 0)
    _trainable(model, names)
    return model, names


def load_model(dims: dict, layers: int, dtype: torch.dtype, cache: Path):
    """build_model's model, bitwise, read from the files a `prepare` child wrote
    (benchmarks/memory_cache.py). Returns (model, names, sparsity)."""
    model = _skeleton(dims, layers, dtype, torch.device("cpu"), init=False)
    with torch.no_grad():
        names, sparsity = load_model_into(model, cache)
    _trainable(model, names)
    return model, names, sparsity


@contextlib.contextmanager
def _cheap_init(skip_all: bool = False):
    """Skip the Linear/Embedding initializers (torch's and transformers'); build_model
    fills those weights with one uniform_ pass instead (the default init runs two passes
    of normal_/kaiming per weight: a minute for a 1B model on 2 cores). Everything else
    (norms, rotary buffers) is initialized as usual, unless skip_all.

    transformers calls the `_init_weights` of every PreTrainedModel it meets (the
    LlamaModel inside LlamaForCausalLM has its own), hence the patch on the base class."""
    original = PreTrainedModel._init_weights

    def init_weights(self, module):
        if not skip_all and not isinstance(module, (nn.Linear, nn.Embedding)):
            original(self, module)

    with (
        mock.patch.object(nn.Linear, "reset_parameters", lambda self: None),
        mock.patch.object(nn.Embedding, "reset_parameters", lambda self: None),
        mock.patch.object(PreTrainedModel, "_init_weights", init_weights),
    ):
        yield


def layerwise_saliency(names, params, seed: int = 5):
    """(name, bfloat16 saliency shaped like its weight), one layer at a time: uniform,
    continuous before the cast (as compute_saliency(dtype=bfloat16) returns), made 1024
    rows at a time so no float32 copy of a whole weight is ever alive."""
    gen = torch.Generator().manual_seed(seed)
    for n, p in zip(names, params):
        s = torch.empty(p.shape, dtype=torch.bfloat16)
        for row in s.view(-1, p.shape[-1]).split(1024):
            row.copy_(torch.rand(row.shape, generator=gen))
        yield n, s.to(p.device)


def random_saliency(names, params, seed: int = 5) -> dict:
    """{name: bfloat16 saliency}: every layer of layerwise_saliency at once."""
    return dict(layerwise_saliency(names, params, seed))


def make_plan(model, names, k: float = 0.3):
    """The SAU step rows' plan: sau.plan_selection at k from random_saliency (the saliency
    is dropped before returning; the plan keeps each layer's index and codes)."""
    params = [model.get_parameter(n) for n in names]
    sal = random_saliency(names, params)
    plan = plan_selection(model.named_parameters(), sal, k=k)
    del sal
    return plan


def step_plan(model, names, spec: dict):
    """The plan of a SAU step row: the one `prepare` made with plan_selection and cached
    beside the model (CPU runs), else plan_selection in this process (GPU, tests)."""
    cache = spec.get("plan_cache")
    if cache and (Path(cache) / PLAN_JSON).exists():
        return load_plan(model, Path(cache))
    return make_plan(model, names)


def batches(vocab: int, tokens: int, device, n: int, seed: int) -> list[dict]:
    """n one-row batches of random token ids [1, tokens] with every token scored: the
    keys of sau.batching.collate (input_ids, attention_mask all 1, labels = input_ids)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def graddiff_step(model, opt, forget, retain, masks=None) -> float:
    """One GradDiff step, -NLL(forget) + NLL(retain), with the library's objective from
    ONE forward over the rows [forget; retain] (sau.unlearn.objectives, joint=True): with
    two forwards autograd holds every weight's partial gradient until the end of
    backward, which defeats in_backward. forget, retain: `batches` of 1 x T each."""
    opt.zero_grad(set_to_none=True)
    loss = objective_loss("graddiff", model, forget, retain, joint=True)
    loss.backward()
    opt.step()
    if masks is not None:  # masked AdamW: re-zero the pruned entries after the step
        with torch.no_grad():
            for p, m in masks:
                p.masked_fill_(m, 0)
    return float(loss.detach())


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# SAUAdamW keyword arguments of each SAU step configuration (a "-8bit" suffix adds
# state_bits=8, a "-ckpt" suffix activation checkpointing per decoder layer).
SAU_MODES = {
    "sau": {},
    "sau-in-backward": dict(in_backward=True),
    "sau-compact": dict(compact_grads=True),
}


def run_config(name: str, model, names, spec: dict, meter: Meter) -> dict:
    """Run configuration `name`; returns the bytes it counted (grads, state, saliency,
    plan) and the selected entries.

    Step rows: the optimizer (and plan) is built and one warm-up step at 8 tokens creates
    its state, then the peak is reset and one GradDiff step at `tokens` is measured: the
    steady-state step, state alive through forward and backward. Saliency rows measure
    the pass; the plan row measures sau.plan_selection from a bfloat16 saliency made
    inside the measured window; e2e rows measure everything (saliency, plan, `steps`
    in-backward steps).
    """
    if name.endswith("-ckpt"):  # activation (gradient) checkpointing per decoder layer
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        name = name.removesuffix("-ckpt")
    params = [model.get_parameter(n) for n in names]
    meter.reset()
    if name.startswith("saliency-") or name.startswith("e2e-"):
        return _saliency_config(name, model, names, params, spec)
    if name == "plan":
        return _plan_config(model, names, params, spec)
    opt, masks = _optimizer(name, model, names, params, spec)
    device, vocab, tokens = model.device, spec["dims"]["vocab"], spec["tokens"]
    if isinstance(opt, SAUAdamW):
        # The state exactly as SAUAdamW's first step creates it (its own _init_state),
        # without that step's arithmetic: on the CPU a warm-up step of a SAU row costs as
        # much as the measured one and changes no byte of what is alive afterwards.
        for group in opt.param_groups:
            for p in group["params"]:
                opt._init_state(p, opt.state[p], group)
    else:
        warm = batches(vocab, 8, device, 2, seed=4)
        graddiff_step(model, opt, warm[0], warm[1], masks)
    opt.zero_grad(set_to_none=True)
    meter.settle()
    meter.reset()  # the peak from here: the state is alive, the step is measured
    forget, retain = batches(vocab, tokens, device, 2, seed=2)
    graddiff_step(model, opt, forget, retain, masks)
    return _step_counts(name, opt, params, masks)


def _optimizer(name: str, model, names, params, spec: dict):
    """(optimizer, masks or None) of a step configuration (suffixes: "-8bit" state_bits=8,
    "-sr" stochastic rounding instead of kahan; "-ckpt" was taken off by run_config)."""
    bits = 8 if "-8bit" in name else 32
    rounding = "stochastic" if "-sr" in name else "kahan"
    name = name.replace("-8bit", "").replace("-sr", "")
    if name in ("adamw", "masked"):
        # fused: torch's smallest-memory AdamW on a GPU (no foreach temporaries); the CPU
        # default is the for-loop implementation. Its moments have the param's dtype.
        kind = dict(fused=True) if model.device.type == "cuda" else dict(foreach=False)
        opt = torch.optim.AdamW(params, lr=1e-5, **kind)
        return opt, ([(p, p == 0) for p in params] if name == "masked" else None)
    if name in ("adamw-fp32", "masked-fp32"):  # AdamW with float32 moments whatever the
        # param dtype (as paged_adamw_32bit holds them): SAUAdamW without a plan steps
        # every parameter with dense_adamw_ (torch's math).
        opt = SAUAdamW(params, plan=None, lr=1e-5, rounding="nearest")
        return opt, ([(p, p == 0) for p in params] if name == "masked-fp32" else None)
    if name in SAU_MODES:
        plan = step_plan(model, names, spec)
        kw = dict(state_bits=bits, rounding=rounding, **SAU_MODES[name])
        return SAUAdamW(params, plan=plan, lr=1e-5, **kw), None
    raise ValueError(f"unknown configuration {name!r}")


def _step_counts(name: str, opt, params, masks) -> dict:
    """The bytes a step row counted: gradients alive at once, optimizer state, plan."""
    largest = max(p.numel() * p.element_size() for p in params)
    sel = _selected(opt)
    grads = _bytes(params)
    if "in-backward" in name:
        grads = largest  # one layer's gradient at a time
    elif "compact" in name:  # grad[G] per planned weight (param dtype) + one dense gradient
        grads = largest + sel * params[0].element_size()
    state = optimizer_state_bytes(opt) + (_bytes(m for _, m in masks) if masks else 0)
    plan = opt._plan if isinstance(opt, SAUAdamW) else {}
    codes = sum(e.entry_scale.numel() for e in plan.values() if e.entry_scale is not None)
    return dict(grads=grads, state=state, saliency=0, plan=codes, n_selected=sel)


def _selected(opt) -> int:
    """Selected entries |G| summed over the planned parameters of a SAUAdamW (else 0)."""
    return sum(s["index"].numel() for s in opt.state.values() if "index" in s)


class DiskSaliency(Mapping):
    """A saliency kept in a scratch file, as a GPU run keeps it in host memory: each
    access reads one layer with readinto into a fresh tensor (memory this process owns
    only while the caller holds it; the file's pages are never mapped)."""

    def __init__(self, folder: Path, tensors: Iterable[tuple[str, torch.Tensor]]):
        self.path = folder / "saliency.bin"
        self.meta, offset = {}, 0
        with open(self.path, "wb") as f:
            for name, t in tensors:  # one layer alive at a time when `tensors` is lazy
                raw = t.detach().reshape(-1).view(torch.uint8).numpy()
                raw.tofile(f)
                self.meta[name] = (offset, t.shape, t.dtype)
                offset += raw.nbytes

    def __getitem__(self, name: str) -> torch.Tensor:
        offset, shape, dtype = self.meta[name]
        out = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            f.readinto(out.view(-1).view(torch.uint8).numpy())
        return out

    def __iter__(self):
        return iter(self.meta)

    def nbytes(self) -> int:
        """Bytes of the saliency in the file (none of them resident)."""
        return sum(shape.numel() * dtype.itemsize for _, shape, dtype in self.meta.values())

    def __len__(self) -> int:
        return len(self.meta)


@contextlib.contextmanager
def groups_to_disk(folder: Path):
    """compute_saliency(max_accumulator_bytes=N) moves each finished group to host memory;
    on a GPU that frees the device, on the CPU the host copy is the same RSS. Here each
    finished accumulator goes to a file instead and comes back as an untouched private
    mapping (torch.from_file, shared=False: not resident until read), so RSS holds what a
    GPU's memory would. The values are the library's own (a test compares them)."""
    import sau.saliency as lib

    written = iter(range(10**9))

    def to_disk(acc: dict) -> dict:
        out = {}
        for name in list(acc):
            t = acc.pop(name)  # one accumulator at a time, freed before the next
            shape, dtype, path = t.shape, t.dtype, folder / f"acc-{next(written)}.bin"
            t.reshape(-1).view(torch.uint8).numpy().tofile(path)
            del t
            mapped = torch.from_file(str(path), shared=False, size=shape.numel(), dtype=dtype)
            out[name] = mapped.view(shape)
        return out

    with mock.patch.object(lib, "_to_host", to_disk):
        yield


def _saliency_config(name: str, model, names, params, spec: dict) -> dict:
    """saliency-fp32 / saliency-bf16 (/ -bounded: max_accumulator_bytes, finished groups
    kept in a file as a GPU keeps them in host memory) and e2e rows."""
    device, vocab, tokens = model.device, spec["dims"]["vocab"], spec["tokens"]
    largest = max(p.numel() * p.element_size() for p in params)
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    bound = spec.get("max_accumulator_bytes") if name.endswith("-bounded") else None
    sal_batches = batches(vocab, tokens, device, spec["saliency_batches"], seed=3)
    with contextlib.ExitStack() as stack:
        if bound is not None and device.type == "cpu":
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=spec.get("cache"))))
            stack.enter_context(groups_to_disk(folder))
        sal = compute_saliency(
            model, sal_batches, nll, params=names, progress=False, dtype=dtype,
            max_accumulator_bytes=bound,
        )  # fmt: skip
        counted = dict(saliency=_bytes(sal.values()), grads=largest, state=0, plan=0)
        counted["passes"] = sal.passes
        if name.startswith("saliency-"):
            if spec.get("keep_saliency") is not None:  # tests: the values, read back
                spec["keep_saliency"].update({n: t.clone() for n, t in sal.items()})
            return counted
    plan = plan_selection(model.named_parameters(), sal, k=0.3)
    del sal  # the plan keeps only each layer's index
    opt = SAUAdamW(params, plan=plan, lr=1e-5, in_backward=True)
    data = batches(vocab, tokens, device, 2 * spec["steps"], seed=2)
    for i in range(spec["steps"]):
        graddiff_step(model, opt, data[2 * i], data[2 * i + 1])
    counted.update(state=optimizer_state_bytes(opt), n_selected=_selected(opt))
    return counted


def _plan_config(model, names, params, spec: dict) -> dict:
    """sau.plan_selection at k = 0.3 from a bfloat16 saliency of every trainable weight
    (random, continuous before the cast, as compute_saliency(dtype=bfloat16) returns)
    kept in a scratch file (DiskSaliency), as an 8B run on one GPU keeps it in host
    memory: the window holds the plan, one layer's scores and the selection's
    temporaries, as the device does in the pipeline's plan phase."""
    with tempfile.TemporaryDirectory(dir=spec.get("cache")) as folder:
        return _plan_from_disk(model, names, params, Path(folder))


def _plan_from_disk(model, names, params, folder: Path) -> dict:
    sal = DiskSaliency(folder, layerwise_saliency(names, params))
    t0 = time.perf_counter()
    plan = plan_selection(model.named_parameters(), sal, k=0.3)
    plan_s = time.perf_counter() - t0
    sel = sum(lp.selection.index.numel() for lp in plan.values())
    held = [t for lp in plan.values() for t in (lp.selection.index, lp.entry_scale)]
    counted = dict(grads=0, state=0, saliency=sal.nbytes(), plan=_bytes(held))
    return dict(counted, n_selected=sel, plan_s=plan_s)


def measure(spec: dict, layers: int) -> dict:
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    meter = Meter(device)
    t0 = time.perf_counter()
    if spec.get("cache"):
        cache = model_cache(Path(spec["cache"]), layers)
        model, names, sparsity = load_model(spec["dims"], layers, dtype, cache)
        spec = dict(spec, plan_cache=str(cache))
    else:
        model, names = build_model(spec["dims"], layers, dtype, device)
        sparsity = _sparsity(model, names)  # before AdamW rows move the pruned entries
    meter.settle()
    base = meter.current()
    t1 = time.perf_counter()
    counted = run_config(spec["config"], model, names, spec, meter)
    peak = meter.peak()
    row = {
        "layers": layers,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(model.get_parameter(n).numel() for n in names),
        "weight_bytes": _bytes(model.parameters()),
        "base": base,
        "peak": peak,
        **{f"{k}_bytes": counted.pop(k) for k in ("grads", "state", "saliency", "plan")},
        **counted,  # n_selected, passes, plan_s where the configuration has them
        **meter.extra(),
        "build_s": t1 - t0,
        "run_s": time.perf_counter() - t1,
        "sparsity": sparsity,
    }
    del model
    meter.settle()
    return row


def _sparsity(model, names) -> float:
    # count_nonzero: one pass, no bool temporary to fault in (13.5 s -> 5.4 s for the
    # 0.7B weights on the loaded VM); the same count as (w == 0).sum().
    weights = [model.get_parameter(n) for n in names]
    total = sum(w.numel() for w in weights)
    return (total - sum(int(torch.count_nonzero(w)) for w in weights)) / total


def model_cache(cache: Path, layers: int) -> Path:
    """Where `prepare` wrote the model of `layers` decoder layers: cache/layers-L when it
    built several depths, else cache itself."""
    deep = cache / f"layers-{layers}"
    return deep if deep.is_dir() else cache


def prepare(spec: dict) -> dict:
    """The `prepare` child (CPU): build the model once per depth and write it for the
    rows' children (benchmarks/memory_cache.py): to spec["cache"] for one depth, to
    spec["cache"]/layers-L (the deepest last) for several or with spec["layered"] (one
    prepare child per depth, running side by side)."""
    t0 = time.perf_counter()
    dtype = getattr(torch, spec["dtype"])
    depths = spec["depths"]
    layered = len(depths) > 1 or spec.get("layered", False)
    for layers in sorted(depths):
        model, names = build_model(spec["dims"], layers, dtype, "cpu")
        cache = Path(spec["cache"]) / (f"layers-{layers}" if layered else "")
        sparsity = _sparsity(model, names)
        if spec.get("plan"):  # before save_model: model.json means model and plan are ready
            save_plan(make_plan(model, names), cache)
        save_model(model, names, sparsity, cache)
        del model
        gc.collect()
    return {"config": "prepare", "model_s": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    if spec["config"] == "prepare":
        print("RESULT " + json.dumps(prepare(spec)), flush=True)
        return 0
    rows = []
    for layers in spec["depths"]:
        try:
            rows.append(measure(spec, layers))
        except torch.OutOfMemoryError as err:  # a row that does not fit says so
            rows.append({"layers": layers, "error": f"out of memory: {str(err)[:200]}"})
            gc.collect()
            torch.cuda.empty_cache()
    print("RESULT " + json.dumps({"config": spec["config"], "depths": rows}), flush=True)
    return 0 if all(math.isfinite(r.get("peak", 0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
