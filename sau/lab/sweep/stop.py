"""--stop-at retain: stop unlearning the first time forget ROUGE-L reaches the retain
model's level (checked greedily at each epoch end)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sau.errors import SAUError
from sau.lab.sweep.grid import Cell

if TYPE_CHECKING:
    from sau.lab.sweep.run import CellRunner

__all__ = ["StopAtRetain"]


class StopAtRetain:
    """`unlearn`'s should_stop: at each epoch end, greedy forget ROUGE-L of the model;
    stop the first time it is at or below the retain model's level."""

    def __init__(self, runner: CellRunner, cell: Cell, model, n_forget: int) -> None:
        ref = runner.lookup(Cell(seed=cell.seed, variant="retain"))
        if ref is None:
            raise SAUError("--stop-at retain needs the retain model's row first")
        self.level = float(ref["forget_rouge"])
        self.runner, self.model, self.seed = runner, model, cell.seed
        self.per_epoch = -(-n_forget // runner.settings.batch_size)
        self.trace: list[float] = []
        self.reached = False

    def _forget_rouge(self) -> float:
        from sau.lab.eval import greedy_answers, rouge_l_recall
        from sau.prompt import format_prompt

        inputs, s = self.runner.seeded(self.seed).inputs, self.runner.settings
        prompts = [format_prompt(r["question"]) for r in inputs.forget]
        answers = greedy_answers(
            self.model, inputs.tok, prompts, s.max_new_tokens, s.eval_batch_size
        )
        return float(rouge_l_recall(answers, [r["answer"] for r in inputs.forget]).mean())

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
