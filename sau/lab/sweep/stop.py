"""--stop-at retain: stop unlearning the first time forget ROUGE-L reaches the retain
model's level (checked greedily at each epoch end), keeping the weights of the last epoch
above it so the cell can be interpolated to the level exactly."""

from __future__ import annotations

import torch

from sau.lab.eval import greedy_answers, rouge_l_recall
from sau.lab.inputs import Inputs
from sau.prompt import format_prompt

__all__ = ["StopAtRetain"]


class StopAtRetain:
    """`unlearn`'s should_stop: at each epoch end, greedy forget ROUGE-L of the model;
    stop the first time it is at or below the retain model's level.

    The crossing: `prev` holds the trainable weights (name -> tensor clone) at the last
    epoch end whose ROUGE-L was above the level (None: the starting model, epoch 0),
    `prev_epoch` its epoch. With the model at the stop, it brackets the level; the sweep
    evaluates both and interpolates (sau.lab.durability_study).

    A variant with a post-step (sau-durable's push) is judged as it is reported: at each
    check the push is applied, the pushed model is scored (and kept as `prev` when above
    the level), and the optimizer's weights are restored unless it stops. So the
    stopping rule, the crossing and the reported model are all the pushed model.

    Args:
        level: the retain model's forget ROUGE-L.
        model: the model being unlearned.
        inputs: the run's rows and tokenizer.
        settings: the sweep's Settings (batch_size, eval_batch_size, max_new_tokens).
        names: the trainable weights kept for `prev` (default: none; then no crossing is
            kept and the summary has no `prev_epoch`).
        push: the post-step, called with no argument, changes `model` in place and
            returns the number of entries it changed; None: no post-step.
    """

    def __init__(self, level: float, model, inputs: Inputs, settings, names=(), push=None):
        self.level, self.model, self.inputs, self.settings = level, model, inputs, settings
        self.per_epoch = -(-len(inputs.forget) // settings.batch_size)
        self.trace: list[float] = []
        self.reached = False
        self.names, self.push = list(names), push
        if push is not None and not self.names:
            raise ValueError("a push needs the trainable names: its weights are restored")
        self.prev: dict | None = None
        self.prev_epoch = 0
        self.pushed: int | None = None  # the last push's count (None: no push made)
        # Activation checkpointing turns the KV cache off while training: the check
        # generates as evaluation does, with the model's own setting.
        self._use_cache = getattr(model.config, "use_cache", None)

    def _forget_rouge(self) -> float:
        forget, s = self.inputs.forget, self.settings
        prompts = [format_prompt(r["question"]) for r in forget]
        training = self.model.config.use_cache
        self.model.config.use_cache = self._use_cache
        try:
            answers = greedy_answers(
                self.model, self.inputs.tok, prompts, s.max_new_tokens, s.eval_batch_size
            )
        finally:
            self.model.config.use_cache = training
        return float(rouge_l_recall(answers, [r["answer"] for r in forget]).mean())

    def _weights(self) -> dict:
        return {n: self.model.get_parameter(n).detach().clone() for n in self.names}

    def _check(self, final: bool) -> bool:
        """Score the model as reported (pushed, if the variant pushes); keep it as `prev`
        when above the level; restore the optimizer's weights unless it is final."""
        held = None
        if self.push is not None:
            held = self._weights()
            self.pushed = self.push()
        self.trace.append(self._forget_rouge())
        self.reached = self.trace[-1] <= self.level
        if not self.reached and self.names:  # no names: no crossing kept
            self.prev, self.prev_epoch = self._weights(), len(self.trace)
        if held is not None and not (self.reached or final):
            with torch.no_grad():
                for n, value in held.items():
                    self.model.get_parameter(n).copy_(value)
        return self.reached

    def __call__(self, step: int) -> bool:
        if step == 0 or step % self.per_epoch:
            return False
        return self._check(final=False)

    def summary(self, steps_done: int, total: int) -> dict:
        """epochs_run, reached_retain, the retain level, the per-epoch ROUGE trace and
        `prev_epoch` (the crossing's lower end; only when reached)."""
        if not self.reached and steps_done == total:  # the loop ends without a last call
            self._check(final=True)
        out = {
            "epochs_run": steps_done // self.per_epoch,
            "reached_retain": self.reached,
            "retain_forget_rouge": self.level,
            "forget_rouge_per_epoch": self.trace,
        }
        if self.reached and self.names:
            out["prev_epoch"] = self.prev_epoch
        return out
