"""--stop-at retain: stop unlearning the first time forget ROUGE-L reaches the retain
model's level (checked greedily at each epoch end)."""

from __future__ import annotations

from sau.lab.eval import greedy_answers, rouge_l_recall
from sau.lab.inputs import Inputs
from sau.prompt import format_prompt

__all__ = ["StopAtRetain"]


class StopAtRetain:
    """`unlearn`'s should_stop: at each epoch end, greedy forget ROUGE-L of the model;
    stop the first time it is at or below the retain model's level.

    Args:
        level: the retain model's forget ROUGE-L.
        model: the model being unlearned.
        inputs: the run's rows and tokenizer.
        settings: the sweep's Settings (batch_size, eval_batch_size, max_new_tokens).
    """

    def __init__(self, level: float, model, inputs: Inputs, settings) -> None:
        self.level, self.model, self.inputs, self.settings = level, model, inputs, settings
        self.per_epoch = -(-len(inputs.forget) // settings.batch_size)
        self.trace: list[float] = []
        self.reached = False
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

    def __call__(self, step: int) -> bool:
        if step == 0 or step % self.per_epoch:
            return False
        self.trace.append(self._forget_rouge())
        self.reached = self.trace[-1] <= self.level
        return self.reached

    def summary(self, steps_done: int, total: int) -> dict:
        """epochs_run, reached_retain, the retain level and the per-epoch ROUGE trace."""
        if not self.reached and steps_done == total:  # the loop ends without a last call
            self.trace.append(self._forget_rouge())
            self.reached = self.trace[-1] <= self.level
        return {
            "epochs_run": steps_done // self.per_epoch,
            "reached_retain": self.reached,
            "retain_forget_rouge": self.level,
            "forget_rouge_per_epoch": self.trace,
        }
