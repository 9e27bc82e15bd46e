"""`SAUTrainerMixin`: SAU as the optimizer of a `transformers.Trainer` (or any subclass).

The mixin replaces `Trainer.create_optimizer`, which the Trainer calls once before its
first step, with the SAU pipeline: saliency on the forget data (`compute_saliency`), a
plan (`plan_selection`), and `SAUAdamW` over the trainable parameters with the Trainer's
hyper-parameters and param groups. Everything else (data, loss, schedule, accumulation,
logging, checkpoints) stays the Trainer's.

Forget data: the batches passed as `sau_forget_batches`, else one pass over the train
dataloader taking each batch's ``"forget"`` part (open-unlearning's contract: every batch
is ``{"forget": {...}, "retain": {...}}``). Under DDP each rank scores its own shard of
that data and the ranks average their saliency, so every rank builds the same plan.

Clipping: with `max_grad_norm > 0` the Trainer's clip goes to `SAUAdamW.clip_grad_norm_`
(the norm of what the step applies), so the result does not depend on compact_grads.
docs/integrations.md says what is refused and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.distributed as dist

from sau.distributed import local
from sau.optim import SAUAdamW
from sau.plan import plan_selection
from sau.saliency import compute_saliency, default_saliency_params
from sau.unlearn.objectives import nll

__all__ = ["SAUTrainerMixin"]


class SAUTrainerMixin:
    """Put first in the bases: ``class SAUGradDiff(SAUTrainerMixin, GradDiff): pass``.

    The keyword arguments are prefixed with ``sau_`` so that they never meet a trainer's
    own (open-unlearning's GradDiff has an ``alpha``); all others go to the trainer.

    Args:
        sau_k: fraction of each layer's survivors to select (`plan_selection`'s k).
        sau_alpha: redistribution strength (`plan_selection`'s alpha).
        sau_amplify: "update" (default), "grad" or "saliency" (`SAUAdamW`).
        sau_in_backward, sau_compact_grads, sau_state_bits, sau_rounding: as `SAUAdamW`.
        sau_forget_batches: an iterable of forget batches for the saliency; None: the
            ``"forget"`` part of each batch of the train dataloader (one pass).
        sau_forget_loss: loss_fn(model, batch) -> 0-d loss for the saliency; None: the
            NLL of the batch's answer tokens (labels, -100 elsewhere).

    After `create_optimizer`, `sau_plan` holds the plan (`SelectionPlan`).

    Raises (ValueError, one line, at `create_optimizer`: before the saliency and before
    any step): in_backward with gradient_accumulation_steps > 1 or max_grad_norm > 0;
    in_backward or compact_grads with fp16 (GradScaler); the Trainer's own FSDP; a train
    batch without a "forget" part when no sau_forget_batches are given.
    """

    def __init__(
        self,
        *args,
        sau_k: float | str = 0.3,
        sau_alpha: float = 0.1,
        sau_amplify: str = "update",
        sau_in_backward: bool = False,
        sau_compact_grads: bool = False,
        sau_state_bits: int = 32,
        sau_rounding: str = "kahan",
        sau_forget_batches: Iterable | None = None,
        sau_forget_loss: Callable | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sau_k, self.sau_alpha, self.sau_amplify = sau_k, sau_alpha, sau_amplify
        self.sau_in_backward, self.sau_compact_grads = sau_in_backward, sau_compact_grads
        self.sau_state_bits, self.sau_rounding = sau_state_bits, sau_rounding
        self.sau_forget_batches, self.sau_forget_loss = sau_forget_batches, sau_forget_loss
        self.sau_plan = None

    def create_optimizer(self, model=None):
        """The SAU optimizer (saliency, plan, SAUAdamW); an optimizer passed to the
        Trainer (``optimizers=(opt, None)``) is kept as it is."""
        if self.optimizer is not None:
            return self.optimizer
        self._check_sau_settings()
        model = self.model if model is None else model
        saliency = _mean_over_ranks(self._forget_saliency(model))
        self.sau_plan = plan_selection(
            model.named_parameters(), saliency, k=self.sau_k, alpha=self.sau_alpha
        )
        del saliency
        args = self.args
        self.optimizer = SAUAdamW(
            self._sau_param_groups(model),
            plan=self.sau_plan,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
            amplify=self.sau_amplify,
            in_backward=self.sau_in_backward,
            compact_grads=self.sau_compact_grads,
            state_bits=self.sau_state_bits,
            rounding=self.sau_rounding,
        )
        return self.optimizer

    def _check_sau_settings(self) -> None:
        """Settings the chosen SAUAdamW mode cannot honour, refused before any work."""
        args, name = self.args, type(self).__name__
        hooks = self.sau_in_backward or self.sau_compact_grads
        if self.sau_in_backward and args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"{name}: sau_in_backward=True steps each parameter inside its backward, so "
                "gradients cannot accumulate; set gradient_accumulation_steps=1 in "
                "TrainingArguments (or use sau_compact_grads=True)"
            )
        if self.sau_in_backward and args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"{name}: sau_in_backward=True steps each parameter before a global gradient "
                "norm exists; set max_grad_norm=0 in TrainingArguments (or use "
                "sau_compact_grads=True, which clips)"
            )
        if self.sau_compact_grads and args.max_grad_norm and not _trainer_clips_here(self):
            raise ValueError(
                f"{name}: this transformers Trainer does not clip through "
                "Trainer._clip_grad_norm, so the compact gradients would go unclipped; set "
                "max_grad_norm=0 in TrainingArguments or install transformers >= 5.3"
            )
        if hooks and args.fp16:
            raise ValueError(
                f"{name}: fp16's GradScaler unscales .grad at step(), after the "
                "sau_in_backward / sau_compact_grads hooks consumed it; use bf16=True or "
                "turn those off"
            )
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                f"{name}: the Trainer's FSDP shards the model after the optimizer is built, "
                "so the plan would index unsharded tensors; use DDP here, or FSDP2 through "
                "`sau unlearn` under torchrun"
            )

    def _forget_saliency(self, model):
        """compute_saliency of the forget loss over the forget batches, on the trainable
        plannable weights, each batch moved to the Trainer's device."""
        batches = self.sau_forget_batches
        if batches is None:
            batches = _forget_parts(self.get_train_dataloader(), type(self).__name__)
        loss_fn = self.sau_forget_loss or nll
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        names = [n for n in default_saliency_params(model) if n in trained]
        return compute_saliency(
            model,
            batches,
            lambda m, batch: loss_fn(m, self._prepare_inputs(batch)),
            params=names,
            progress=False,
        )

    def _sau_param_groups(self, model) -> list[dict]:
        """The Trainer's two groups (weight decay, and none for biases and norms), over
        the parameters that require grad; empty groups left out."""
        decay = set(self.get_decay_parameter_names(model))
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in trained if n in decay],
                "weight_decay": self.args.weight_decay,
            },
            {"params": [p for n, p in trained if n not in decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def _clip_grad_norm(self, model):
        """The Trainer's clip, sent to SAUAdamW.clip_grad_norm_ (it sees the compact
        gradients, which torch's clip over model.parameters() would miss); DeepSpeed
        clips inside its engine, as the Trainer expects."""
        opt = _sau_optimizer(self.optimizer)
        if opt is None or getattr(self, "is_deepspeed_enabled", False):
            return super()._clip_grad_norm(model)
        return opt.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The logged gradient norm; None (not logged) when hooks consumed the gradients
        and nothing was clipped: a norm over model.parameters() would leave them out."""
        opt = _sau_optimizer(self.optimizer)
        if grad_norm is None and opt is not None and (opt.in_backward or opt.compact_grads):
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)


def _trainer_clips_here(trainer) -> bool:
    """Whether a class below the mixin defines _clip_grad_norm, the Trainer method that
    the mixin's clipping route overrides (transformers >= 5.3 has it)."""
    below = type(trainer).__mro__[type(trainer).__mro__.index(SAUTrainerMixin) + 1 :]
    return any("_clip_grad_norm" in vars(cls) for cls in below)


def _sau_optimizer(opt) -> SAUAdamW | None:
    """The SAUAdamW inside accelerate's (or another) wrapper, None if there is none."""
    while opt is not None and not isinstance(opt, SAUAdamW):
        opt = getattr(opt, "optimizer", None)
    return opt


def _forget_parts(dataloader, name: str):
    """Each batch's "forget" part (open-unlearning's nested batches), one pass."""
    for batch in dataloader:
        if not isinstance(batch, dict) or "forget" not in batch:
            raise ValueError(
                f"{name}: a training batch has no 'forget' part to score; pass "
                "sau_forget_batches=... (an iterable of forget batches)"
            )
        yield batch["forget"]


def _mean_over_ranks(saliency):
    """DDP (plain tensors on several ranks): the mean of the ranks' saliencies, so that
    every rank plans the same entries. FSDP2 saliency (DTensors) is global already."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return saliency
    world = dist.get_world_size()
    for value in saliency.values():
        if local(value) is value:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value.div_(world)
    return saliency
