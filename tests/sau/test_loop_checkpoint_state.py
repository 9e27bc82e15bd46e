"""The loop refuses a checkpoint whose loop state does not fit the run, in one line.

The file is edited with tensors and plain containers only (what torch.load(weights_only)
reads), so each edit reaches the loop's own checks.
"""

from __future__ import annotations

import pytest
import torch

from sau.errors import SAUError
from sau.unlearn.loop import CHECKPOINT_NAME, UnlearnConfig, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"question": f"Who is {i}?", "answer": f"A painter from town {i}."} for i in range(6)]


def _swap_first_two(order: torch.Tensor) -> torch.Tensor:
    order = order.clone()
    order[0, [0, 1]] = order[0, [1, 0]]
    return order


EDITS = {
    # Before: resumed at step 99 of 4 (nothing ran, "done"), or crashed with a traceback.
    "step past the end": (lambda s: s.update(step=99), "step"),
    "negative step": (lambda s: s.update(step=-1), "step"),
    "step as text": (lambda s: s.update(step="1"), "step"),
    "short loss log": (lambda s: s.update(losses=[]), "loss log"),
    "loss log of text": (lambda s: s.update(losses=["x"] * s["step"]), "loss log"),
    "other data order": (
        lambda s: s["order"].update(forget=_swap_first_two(s["order"]["forget"])),
        "data order",
    ),
    "order not a dict": (lambda s: s.update(order=[1, 2]), "data order"),
    "reference log-probs for GA": (lambda s: s.update(ref_logp=torch.zeros(6)), "reference"),
    "config not a dict": (lambda s: s.update(config=[1]), "config"),
    "no rng": (lambda s: s.pop("rng"), "missing"),
    "rng of junk": (lambda s: s.update(rng={"torch": torch.zeros(3), "python": [1]}), "RNG"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_a_loop_state_that_does_not_fit_is_refused(tiny_lm_adamw, tmp_path, case):
    model, tok, opt = tiny_lm_adamw
    cfg = UnlearnConfig(method="ga", epochs=2, batch_size=3)
    unlearn(model, tok, ROWS, [], opt, cfg, checkpoint_dir=tmp_path, progress=False,
            should_stop=lambda s: s == 1)  # fmt: skip
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    edit, words = EDITS[case]
    edit(state)
    torch.save(state, path)
    with pytest.raises(SAUError, match=words) as err:
        unlearn(model, tok, ROWS, [], opt, cfg, checkpoint_dir=tmp_path, resume=True,
                progress=False)  # fmt: skip
    assert "\n" not in str(err.value) and CHECKPOINT_NAME in str(err.value)
