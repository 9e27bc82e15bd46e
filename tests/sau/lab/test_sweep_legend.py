"""The sweep's figure legend lists every variant drawn in any panel, once."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def test_legend_lists_labels_from_every_panel_once():
    from sau.lab.sweep.plots import _legend_below, _plt

    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2)
    left.plot([0, 1], [0, 1], label="dense")
    right.plot([0, 1], [1, 0], label="dense")
    right.plot([0, 1], [0, 0], label="mask-only")  # only in the second panel
    _legend_below(fig, left)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["dense", "mask-only"]
    plt.close(fig)
