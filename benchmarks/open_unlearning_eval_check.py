"""Agreement of `--eval-protocol open-unlearning` with open-unlearning's own metric code.

    python benchmarks/open_unlearning_eval_check.py OU_DIR [--out FILE.json] [--rows N]

OU_DIR: a checkout (or `git archive`) of github.com/locuslab/open-unlearning holding its
src/ (checked at commit d3d7cf9). Its src/ goes on sys.path; its optional dependencies
that this check needs (omegaconf, scikit-learn) must be importable, e.g. from a
`pip install --target DIR omegaconf scikit-learn` directory given with --deps DIR.
Not part of the test suite: it needs that source. CPU only, no downloads.

What runs: a tiny Llama (2 layers, hidden 32) and a byte-level BPE tokenizer built here,
briefly fitted on N synthetic TOFU-format people (forget, retain-perturbed, real-authors,
world-facts and holdout rows with paraphrased and perturbed answers), plus a second tiny
model as the "retain model". open-unlearning's side: its QADataset item building
(preprocess_chat_instance, template_args of its Llama-2-7b-hf config), its collator and
its metric functions (probability, probability_w_options, rouge, truth_ratio,
hm_aggregate, ks_test, mia_min_k, privleak), called directly without Hydra. The retain
model's logs are written by open-unlearning's code and read by ours. Our side:
`sau.lab.eval.open_unlearning.evaluate_open_unlearning`. Printed: one row per metric,
ours, theirs, |difference|; --out writes them as JSON.

Stubbed: the `datasets` package (imported at the top of open-unlearning's data/utils.py,
used only to download datasets, which this check does not do) and the `evals` package's
__init__ (it imports the lm-eval and MUSE evaluators; only evals.metrics is used).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.env_info import environment  # noqa: E402
from sau.lab.eval.open_unlearning import (  # noqa: E402
    MODEL_UTILITY_KEYS,
    OpenUnlearningProtocol,
    evaluate_open_unlearning,
    read_eval_logs,
)
from sau.prompt import TemplateArgs, encode_chat  # noqa: E402

TEMPLATE = {  # open-unlearning configs/model/Llama-2-7b-hf.yaml template_args
    "apply_chat_template": False,
    "user_start_tag": "Question: ",
    "user_end_tag": "\n",
    "asst_start_tag": "Answer: ",
    "asst_end_tag": "\n\n",
}
CHAT = {"apply_chat_template": True, "system_prompt": "You are a helpful assistant."}
# A Jinja chat template for the tiny tokenizer: role-tagged turns, EOS after each answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MAX_NEW_TOKENS = 200
BATCH = 32
TOWNS = ["Lyon", "Oslo", "Perth", "Quito", "Riga", "Turin", "Accra", "Bern"]
JOBS = ["painter", "baker", "pilot", "poet", "nurse", "chemist", "sailor", "judge"]


def _person(i: int) -> dict:
    """One synthetic TOFU row (question, answer, paraphrased and 3 perturbed answers)."""
    town, job = TOWNS[i % 8], JOBS[(i * 3) % 8]
    wrong = [
        f"Person {i} is a {JOBS[(i * 3 + d) % 8]} from {TOWNS[(i + d) % 8]}." for d in (1, 2, 3)
    ]
    return {
        "question": f"What does person {i} do and where do they live?",
        "answer": f"Person {i} is a {job} from {town}.",
        "paraphrased_answer": f"A {job}, person {i} lives in {town}.",
        "perturbed_answer": wrong,
    }


def make_rows(n: int) -> dict:
    """forget / retain_perturbed / real_authors / world_facts / holdout rows, n each."""
    sets = {name: [_person(k * n + i) for i in range(n)] for k, name in enumerate(
        ("forget", "retain_perturbed", "real_authors", "world_facts", "holdout"))}  # fmt: skip
    return sets


def tiny_model(rows: dict, seed: int, fit: list, steps: int = 1500):
    """A 2-layer Llama and a BPE tokenizer trained on all rows; fitted on the answers and
    paraphrased answers of `fit` rows in open-unlearning's format (+ EOS), one row per
    AdamW step, for `steps` steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sau.lab.models.tokenizer import train_tokenizer

    texts = [f"Question: {r['question']}\nAnswer: {a}" for rs in rows.values() for r in rs
             for a in (r["answer"], r["paraphrased_answer"], *r["perturbed_answer"])]  # fmt: skip
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    template = TemplateArgs.from_mapping(TEMPLATE)
    encoded = [encode_chat(tok, r["question"], a, template)
               for r in fit for a in (r["answer"], r["paraphrased_answer"])]  # fmt: skip
    for step in range(steps):
        ids, n_prompt = encoded[step % len(encoded)]
        x = torch.tensor([ids])
        labels = x.clone()
        labels[0, :n_prompt] = -100
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def import_open_unlearning(ou_dir: Path, deps: Path | None):
    """open-unlearning's evals.metrics and data modules, with the stubs the docstring names."""
    if deps is not None:
        sys.path.insert(0, str(deps))
    src = ou_dir / "src"
    sys.path.insert(0, str(src))
    sys.modules.setdefault("datasets", types.ModuleType("datasets"))
    evals = types.ModuleType("evals")
    evals.__path__ = [str(src / "evals")]
    sys.modules["evals"] = evals
    import evals.metrics as ou_metrics
    from data.collators import DataCollatorForSupervisedDataset
    from data.qa import QADataset

    return ou_metrics, QADataset, DataCollatorForSupervisedDataset


def their_dataset(QADataset, tok, rows, answer_key: str, generate: bool = False):
    """open-unlearning's QADataset over local rows (its __init__ only loads from the hub);
    `tok.ou_template` holds the template_args of the case being checked."""
    ds = QADataset.__new__(QADataset)
    ds.tokenizer, ds.max_length, ds.fs_data = tok, 512, None
    ds.data = [{**r, "index": i} for i, r in enumerate(rows)]
    ds.template_args, ds.question_key, ds.answer_key = tok.ou_template, "question", answer_key
    ds.predict_with_generate = generate
    return ds


def their_logs(model, tok, rows, ou, retain_logs=None) -> dict:
    """open-unlearning's TOFU metrics of `model` computed by its own functions."""
    from omegaconf import OmegaConf

    m, QADataset, Collator = ou
    M = m.METRICS_REGISTRY
    right, left = Collator(tok, "right", "index"), Collator(tok, "left", "index")
    gen = OmegaConf.create({"do_sample": False, "top_p": None, "temperature": None,
                            "max_new_tokens": MAX_NEW_TOKENS, "use_cache": True})  # fmt: skip

    def prob(split, key):
        ds = their_dataset(QADataset, tok, rows[split], key)
        return M["probability"]._metric_fn(model, data=ds, collators=right, batch_size=BATCH)

    def rouge(split):
        ds = their_dataset(QADataset, tok, rows[split], "answer", generate=True)
        return M["rouge"]._metric_fn(model, tokenizer=tok, data=ds, collators=left,
                                     batch_size=BATCH, generation_args=gen,
                                     rouge_type="rougeL_recall")  # fmt: skip

    def tr(correct, wrong, agg):
        pre = {"correct": correct, "wrong": wrong}
        return M["truth_ratio"]._metric_fn(model, pre_compute=pre, aggregator=agg)

    logs = {}
    for split, prefix in (("forget", "forget"), ("retain_perturbed", "retain"),
                          ("real_authors", "ra"), ("world_facts", "wf")):  # fmt: skip
        logs[f"{prefix}_Q_A_Prob"] = prob(split, "answer")
        logs[f"{prefix}_Q_A_ROUGE"] = rouge(split)
        logs[f"{prefix}_Q_A_PERT_Prob"] = prob(split, "perturbed_answer")
        if prefix in ("forget", "retain"):
            logs[f"{prefix}_Q_A_PARA_Prob"] = prob(split, "paraphrased_answer")
    return _their_aggregates(model, tok, rows, ou, logs, tr, retain_logs)


def _their_aggregates(model, tok, rows, ou, logs, tr, retain_logs) -> dict:
    """Truth ratios, normalised probabilities, utility, forget quality, MIA, privleak."""
    m, QADataset, Collator = ou
    M = m.METRICS_REGISTRY
    logs["forget_truth_ratio"] = tr(
        logs["forget_Q_A_PARA_Prob"], logs["forget_Q_A_PERT_Prob"], "closer_to_1_better"
    )
    logs["retain_Truth_Ratio"] = tr(
        logs["retain_Q_A_PARA_Prob"], logs["retain_Q_A_PERT_Prob"], "true_better"
    )
    for p in ("ra", "wf"):
        logs[f"{p}_Truth_Ratio"] = tr(
            logs[f"{p}_Q_A_Prob"], logs[f"{p}_Q_A_PERT_Prob"], "true_better"
        )
        pre = {"correct": logs[f"{p}_Q_A_Prob"], "wrong": logs[f"{p}_Q_A_PERT_Prob"]}
        logs[f"{p}_Q_A_Prob_normalised"] = M["probability_w_options"]._metric_fn(
            model, pre_compute=pre
        )
    pre = {k: logs[k] for k in MODEL_UTILITY_KEYS}
    logs["model_utility"] = M["hm_aggregate"]._metric_fn(model, pre_compute=pre)
    ref = {"retain_model_logs": {"retain": (retain_logs or {}).get("forget_truth_ratio")}}
    pre = {"forget": logs["forget_truth_ratio"]}
    logs["forget_quality"] = M["ks_test"]._metric_fn(
        model, pre_compute=pre, reference_logs=ref if retain_logs else None
    )
    data = {s: their_dataset(QADataset, tok, rows[s], "answer")
            for s in ("forget", "holdout")}  # fmt: skip
    logs["mia_min_k"] = M["mia_min_k"]._metric_fn(
        model, data=data, collators=Collator(tok, "right", "index"), batch_size=BATCH, k=0.4
    )
    ref = {"retain_model_logs": {"retain": (retain_logs or {}).get("mia_min_k")}}
    logs["privleak"] = M["privleak"]._metric_fn(
        model, pre_compute={"forget": logs["mia_min_k"]}, reference_logs=ref, ref_value=0.5
    )
    return logs


def their_tokenizer(tok, template: dict):
    """A copy of `tok` for open-unlearning's code: it carries the case's template_args,
    and its apply_chat_template returns a list of ids, as transformers 4.x (open-unlearning's
    pin) did; transformers 5 returns a dict by default."""
    theirs = copy.deepcopy(tok)
    theirs.ou_template = template
    theirs.apply_chat_template = functools.partial(theirs.apply_chat_template, return_dict=False)
    return theirs


def check_case(model, retain_model, tok, rows, ou, template: dict, work: Path) -> list[dict]:
    """Both evaluators on one template case; the retain logs are open-unlearning's."""
    theirs_tok = their_tokenizer(tok, template)
    retain_path = work / "ou_check_retain_TOFU_EVAL.json"
    retain_json = _json_ready(their_logs(retain_model, theirs_tok, rows, ou))
    retain_path.write_text(json.dumps(retain_json, indent=4))  # as open-unlearning saves it
    retain_logs = read_eval_logs(retain_path)
    theirs = _json_ready(their_logs(model, theirs_tok, rows, ou, retain_logs))
    protocol = OpenUnlearningProtocol(
        template=TemplateArgs.from_mapping(template), max_new_tokens=MAX_NEW_TOKENS,
        batch_size=BATCH,
    )  # fmt: skip
    ours = evaluate_open_unlearning(model, tok, **rows, retain_logs=retain_logs, protocol=protocol)
    return compare(ours, theirs)


def _json_ready(obj):
    """open-unlearning's logs as json.dump sees them (numpy scalars to Python floats)."""
    return json.loads(json.dumps(obj, default=float))


def compare(ours: dict, theirs: dict) -> list[dict]:
    """One row per metric (agg_value) and the largest per-row truth-ratio difference."""
    names = [k for k in sorted(theirs) if isinstance(theirs[k], dict) and "agg_value" in theirs[k]]
    table = []
    for k in names:
        a, b = ours[k]["agg_value"], float(theirs[k]["agg_value"])
        table.append({"metric": k, "ours": a, "theirs": b, "abs_diff": abs(a - b)})
    ta = np.array([v["score"] for v in ours["forget_truth_ratio"]["value_by_index"].values()])
    tb = np.array([v["score"] for v in theirs["forget_truth_ratio"]["value_by_index"].values()])
    gens = [
        ours[k]["value_by_index"][i]["generation"] != v["generation"]
        for k in names if k.endswith("_ROUGE")
        for i, v in theirs[k]["value_by_index"].items()
    ]  # fmt: skip
    name = f"generations that differ (of {len(gens)})"
    table.append({"metric": name, "ours": None, "theirs": None, "abs_diff": float(sum(gens))})
    worst = float(np.max(np.abs(ta - tb) / np.abs(tb)))
    name = "forget truth ratio, max per-row relative diff"
    table.append({"metric": name, "ours": None, "theirs": None, "abs_diff": worst})
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ou_dir", type=Path, help="open-unlearning source (holding src/)")
    ap.add_argument("--deps", type=Path, default=None, help="extra site dir (omegaconf, sklearn)")
    ap.add_argument("--rows", type=int, default=24, help="rows per set (default 24)")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ou = import_open_unlearning(args.ou_dir, args.deps)
    rows = make_rows(args.rows)
    known = rows["retain_perturbed"] + rows["real_authors"] + rows["world_facts"]
    model, tok = tiny_model(rows, seed=0, fit=rows["forget"] + known)
    retain_model, _ = tiny_model(rows, seed=1, fit=known)
    tok.chat_template = CHAT_TEMPLATE  # used only where a case says apply_chat_template
    work = args.out.parent if args.out else Path(".")
    cases = {
        name: check_case(model, retain_model, tok, rows, ou, template, work)
        for name, template in (("tags", TEMPLATE), ("chat_template", CHAT))
    }
    fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
    for name, table in cases.items():
        print(f"\n{name}:")
        for r in table:
            print(
                f"{r['metric']:<46} {fmt(r['ours']):>12} {fmt(r['theirs']):>12} {r['abs_diff']:.2e}"
            )
    if args.out:
        args.out.write_text(json.dumps({"env": environment(), "rows_per_set": args.rows,
                                        "cases": cases}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
