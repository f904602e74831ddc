"""FinishedRun: what a finished run holds, prerequisites named in one line, and the context it builds."""

import pytest

from refusalscope.analysis.finished_run import FinishedRun
from refusalscope.errors import RefusalScopeError
from refusalscope.saes.features import Feature


def test_finished_run_reads_stages_and_features(finished_run):
    run, judge = finished_run
    fr = FinishedRun(run, judge=judge)
    assert fr.has("stage1") and fr.has("stage2") and fr.has("stage3")
    assert not fr.has("hydra")
    assert len(fr.records) >= 1
    groups = fr.pipeline_features()
    assert groups and all(isinstance(f, Feature) for f in groups)
    for rec in fr.records:
        for f in fr.stage2_set(rec):
            assert "stage2" in groups[f]
        res = fr.stage3.get(rec.id)
        if res is not None and res.best_k is not None:
            assert set(res.stage2_active) <= set(fr.stage3_set(rec.id))
    ctx = fr.context()
    assert ctx.judge is judge and ctx.max_new_tokens == 6
    assert set(ctx.saes) == {0, 1, 2, 3}


def test_missing_prerequisite_names_the_command(finished_run, tmp_path):
    run, _ = finished_run
    with pytest.raises(RefusalScopeError, match="needs hydra results.*refusalscope analyze hydra"):
        FinishedRun(run).require("clamp", "stage2", "hydra")
    with pytest.raises(RefusalScopeError, match="not a finished"):
        FinishedRun(tmp_path)
