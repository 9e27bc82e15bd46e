"""Repro: on the CPU, SAUAdamW(in_backward=True) on a transformers Llama with a GradDiff
loss from TWO forwards does not lower the peak: the post-accumulate-grad hooks fire late.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/repro/in_backward_late_hooks.py inb  # 2 fwd
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/repro/in_backward_late_hooks.py joint  # 1
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/repro/in_backward_late_hooks.py normal

Prints RSS above the pre-step base after the forward, after the backward, and at each
hook. Cause: -NLL(forget) + NLL(retain) from two forwards uses every weight twice;
autograd runs ready nodes in decreasing sequence number, so the whole retain pass's
backward runs before any forget-pass node, and every weight's AccumulateGrad (and hook)
waits for its forget contribution while all retain-pass partial gradients stay buffered
in the engine. With "inb", at the FIRST hook nearly all gradient bytes are resident.
"joint" computes the same loss from one forward over the rows [forget; retain]
(sau.unlearn.objectives.objective_loss with joint=True): each weight
is used once and its hook fires as soon as the backward has passed its layer (measured
on the 2-core CPU VM, torch 2.13.0, transformers 5.24.0, hidden 1024 x 8 layers,
464 MiB of gradients, checkpointing: see README "Memory").
"""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import memory_child as mc  # noqa: E402
from sau import SAUAdamW  # noqa: E402
from sau.unlearn.objectives import objective_loss  # noqa: E402


def rss():
    return mc._proc_status("VmRSS") / 2**20


def hwm():
    return mc._proc_status("VmHWM") / 2**20


dims = dict(hidden=1024, intermediate=4096, heads=16, kv_heads=4, vocab=2048)
model, names = mc.build_model(dims, 8, torch.float32, torch.device("cpu"))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
params = [model.get_parameter(n) for n in names]
print("trainable MiB", sum(p.numel() * 4 for p in params) / 2**20)
plan = mc.make_plan(model, names, k=0.3)
mode = sys.argv[1]
opt = SAUAdamW(params, plan=plan, lr=1e-5, in_backward=mode != "normal")
ids = torch.randint(0, 2048, (1, 64))
b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
mc.graddiff_step(model, opt, b, b)
opt.zero_grad()
gc.collect()
base = rss()
Path("/proc/self/clear_refs").write_text("5")
alive = []
rs = []


def probe(p):
    alive.append(sum(q.grad.nbytes for q in params if q.grad is not None) / 2**20)
    rs.append(round(rss() - base))


for p in params:
    p.register_post_accumulate_grad_hook(probe)
opt.zero_grad(set_to_none=True)
r_ids = torch.randint(0, 2048, (1, 64))
r = {"input_ids": r_ids, "attention_mask": torch.ones_like(r_ids), "labels": r_ids}
loss = objective_loss("graddiff", model, b, r, joint=mode == "joint")
print("after forward: hwm above", round(hwm() - base), "rss above", round(rss() - base))
loss.backward()
print("after backward: hwm above", round(hwm() - base), "rss above", round(rss() - base))
print("rss at hooks", rs[:8], rs[-8:])
opt.step()
print(
    mode,
    "base",
    round(base),
    "peak above",
    round(hwm() - base),
    "max live .grad MiB",
    round(max(alive)),
)
