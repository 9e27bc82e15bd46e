"""PipelineConfig: N:M pruning is a setting a config file can give."""

from __future__ import annotations

import json

import pytest

from sau.errors import SAUError
from sau.pipeline import PipelineConfig, load_config_file


def test_config_file_accepts_nm(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nm": [2, 4]}))
    cfg = load_config_file(str(path), PipelineConfig())
    assert cfg.nm == (2, 4)
    cfg.validate()


@pytest.mark.parametrize("nm", [(3, 2), (0, 4), (2,), (2.0, 4)])
def test_bad_nm_is_one_line(nm):
    with pytest.raises(SAUError, match="nm must be"):
        PipelineConfig(nm=nm).validate()


def test_pipeline_prunes_n_of_m(monkeypatch):
    """_prune hands the pattern to prune_model (whose own tests check the pattern)."""
    import sau.pipeline as pipeline
    import sau.prune

    seen = {}
    monkeypatch.setattr(sau.prune, "prune_model", lambda *a, **k: seen.update(k))
    pipeline._prune(object(), PipelineConfig(nm=(2, 4)), None, progress=False)
    assert seen["nm"] == (2, 4)
