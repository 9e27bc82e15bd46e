"""The loop's stop flag remembers which signal came (sau.unlearn.signals)."""

from __future__ import annotations

import os
import signal

import pytest

from sau.unlearn import UnlearnConfig, unlearn
from sau.unlearn.signals import (
    Stopped,
    last_stop_signal,
    signal_name,
    stop_on_signals,
    stop_signal_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"question": f"Who is {i}?", "answer": f"A painter from town {i}."} for i in range(6)]


def _sender(signum: int, at: int):
    def send(step: int) -> bool:
        if step == at:
            os.kill(os.getpid(), signum)  # handled by the loop: sets the flag only
        return False

    return send


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_loop_reports_which_signal_stopped_it(tiny_lm_adamw, tmp_path, signum):
    # Before: UnlearnResult said interrupted only, and the CLI exited 130 for SIGTERM too.
    model, tok, opt = tiny_lm_adamw
    cfg = UnlearnConfig(method="ga", epochs=2, batch_size=3)
    res = unlearn(model, tok, ROWS, [], opt, cfg, checkpoint_dir=tmp_path, progress=False,
                  should_stop=_sender(signum, 1))  # fmt: skip
    assert res.interrupted and res.steps_done == 2 and res.stop_signal == signum
    assert last_stop_signal() == signum
    # a caller that re-raises a plain KeyboardInterrupt (the sweep) still gets the signal
    assert stop_signal_of(KeyboardInterrupt()) == signum


def test_a_run_to_the_end_or_stopped_by_should_stop_has_no_signal(tiny_lm_adamw):
    model, tok, opt = tiny_lm_adamw
    cfg = UnlearnConfig(method="ga", epochs=2, batch_size=3)
    res = unlearn(model, tok, ROWS, [], opt, cfg, progress=False, should_stop=lambda s: s == 1)
    assert res.interrupted and res.stop_signal is None and last_stop_signal() is None
    assert stop_signal_of(KeyboardInterrupt()) == signal.SIGINT  # Ctrl-C outside a loop
    res = unlearn(model, tok, ROWS, [], opt, cfg, progress=False)
    assert not res.interrupted and res.stop_signal is None


def test_the_first_signal_is_kept_and_a_second_ctrl_c_raises_stopped():
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM
        with pytest.raises(Stopped) as stop:
            os.kill(os.getpid(), signal.SIGINT)
    assert flag.signum == signal.SIGTERM and stop.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stopped_carries_its_signal():
    stop = Stopped(signal.SIGTERM)
    assert isinstance(stop, KeyboardInterrupt) and stop_signal_of(stop) == 15
    assert str(stop) == "SIGTERM" and signal_name(99) == "signal 99"


def test_sigterm_in_the_sweeps_loop_exits_143(make_cli_files, tmp_path, monkeypatch, capsys):
    # The sweep re-raises a plain KeyboardInterrupt when its loop stops; before, main said
    # "interrupted" and exited 130 for SIGTERM too.
    import sau.lab.sweep.run as sweep_run
    from sau.cli import main

    files = make_cli_files("signals-sweep", {})
    real, send = sweep_run.unlearn, _sender(signal.SIGTERM, 0)
    monkeypatch.setattr(sweep_run, "unlearn", lambda *a, **k: real(*a, **k | {"should_stop": send}))
    argv = ["sweep", "--out", str(tmp_path / "s"), "--epochs", "2", "--no-progress"]
    for flag in ("forget", "retain"):
        argv += [f"--{flag}", str(files / f"{flag}.jsonl")]
    argv += ["--model", str(files / "model"), "--sparsity", "0.5", "--variant", "masked"]
    assert main(argv) == 143
    assert capsys.readouterr().err.strip().endswith("sau sweep: terminated (SIGTERM)")
