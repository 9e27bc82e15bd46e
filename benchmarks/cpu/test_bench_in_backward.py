"""A whole training step (forward, backward, update) with SAUAdamW(in_backward=True) against
the normal mode, on a 50%-pruned Llama-architecture model (hidden 1024, 2 layers,
k = 0.3, batch 1 x 128). The update moves into backward, so the two are timed end to end."""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sau.optim import SAUAdamW
from sau.plan import plan_selection
from sau.prune import target_linear_names


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg)
    names = target_linear_names(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                p.masked_fill_(torch.rand(p.shape, generator=gen) < 0.5, 0)
    sal = {n: torch.rand(model.get_parameter(n).shape, generator=gen) ** 3 for n in names}
    return model, names, plan_selection(model.named_parameters(), sal, k=0.3)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# The two modes run interleaved (normal, in-backward, normal, ...) inside each round, so a
# busy machine slows both alike; the ratio of their medians goes to extra_info and
# summarize_cpu.py. One thread: libgomp's spin-wait distorts 2-thread timings on a shared
# 2-core VM. The benchmark's own time is that of one pair of steps.
@pytest.mark.parametrize("impl", ["sau"])
def test_train_step_in_backward_vs_normal(benchmark, impl):
    benchmark.group = "train step pair (normal + in_backward), hidden=1024 x2, 1x128 tokens"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = torch.randint(0, 4096, (1, 128), generator=torch.Generator().manual_seed(2))
    runs = {}
    for mode in ("normal", "in_backward"):
        model, names, plan = _model()
        params = [model.get_parameter(n) for n in names]
        opt = SAUAdamW(params, plan=plan, lr=1e-5, backend="torch", in_backward=mode != "normal")
        runs[mode] = (model, opt)
    times = {mode: [] for mode in runs}

    def step(mode):
        model, opt = runs[mode]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        times[mode].append(time.perf_counter() - t0)

    def pair():
        for mode in runs:
            step(mode)

    try:
        pair()  # create the state outside the timing
        times = {mode: [] for mode in runs}
        benchmark.pedantic(pair, rounds=15, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    normal, inside = _median(times["normal"]), _median(times["in_backward"])
    benchmark.extra_info["interleaved"] = {
        "normal_median_s": normal,
        "in_backward_median_s": inside,
        "ratio": inside / normal,
        "rounds": len(times["normal"]),
        "threads": 1,
    }
    # Same weights, same batches: the two modes must also agree bitwise.
    for p, q in zip(runs["normal"][0].parameters(), runs["in_backward"][0].parameters()):
        assert torch.equal(p, q)
