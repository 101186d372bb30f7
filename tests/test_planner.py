"""Automatic plans: inside runs, never the last FFN by default, split by threshold and width."""

from __future__ import annotations

import json

import pytest

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime.analysis.dependency import DependencyReport
from ffnfusion.runtime.analysis.planner import plan_groups, rank_block_windows


def _report(m: dict[tuple[int, int], float], layers=10, runs=((2, 6),), attention=(0, 1, 7, 8, 9)):
    blocks = [{"index": i, "layer": i, "kind": "layer" if i in attention else "ffn", "width": 100}
              for i in range(layers)]
    dependency = [[None] * layers for _ in range(layers)]
    for i in range(layers):
        for j in range(i + 1, layers):
            dependency[i][j] = m.get((i, j), 0.01)
    return DependencyReport(blocks, [{} for _ in blocks], dependency, [list(r) for r in runs])


def test_whole_run_minus_last_ffn():
    plan = plan_groups(_report({}), threshold=0.2)
    assert plan.groups == ((2, 3, 4, 5),)
    assert plan.reasons[0]["m_max"] == pytest.approx(0.01) and plan.reasons[0]["width"] == 400
    assert plan_groups(_report({}), include_last=True).groups == ((2, 3, 4, 5, 6),)


def test_split_where_dependency_is_high():
    plan = plan_groups(_report({(3, 4): 0.5}), threshold=0.2)
    assert plan.groups == ((2, 3), (4, 5))


def test_width_cap_and_preference_for_low_m():
    # Windows of 3 fit the cap; 2-4 and 3-5 compete, 3-5 has the lower M_max.
    plan = plan_groups(_report({(2, 3): 0.1, (2, 4): 0.1}), threshold=0.2, max_width=300)
    assert plan.groups == ((3, 4, 5),)


def test_never_crosses_attention_or_runs():
    report = _report({}, layers=12, runs=((2, 4), (6, 9)), attention=(0, 1, 5, 10, 11))
    plan = plan_groups(report, threshold=1.0, include_last=True)
    assert plan.groups == ((2, 3, 4), (6, 7, 8, 9))
    for group in plan_groups(report, threshold=1.0).groups:
        assert any(a <= group[0] and group[-1] <= b for a, b in report.runs)


def test_plan_json_round_trip_and_bad_edits(tmp_path):
    plan = plan_groups(_report({}))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert FusionPlan.load(path).groups == plan.groups
    for bad, message in (({"groups": "2-5"}, "'groups' list"), ({"groups": [[2, "3"]]}, "integer layer indices"),
                         ({"groups": [2, 3]}, "every group must be a list"), ([1, 2], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(InvalidArgumentError, match=message):
            FusionPlan.load(path)
    path.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="cannot read plan"):
        FusionPlan.load(path)


def test_block_windows_ranked_like_the_paper():
    """Whole-block units only (kind layer); lowest M_max first, ties by M_sum, no overlap."""
    attention = tuple(range(12))
    m = {(i, j): 0.3 for i in range(12) for j in range(i + 1, 12)}  # high everywhere but in 4-7 and 8-11
    m.update({(i, j): 0.05 for i in range(4, 8) for j in range(i + 1, 8)})
    m.update({(i, j): 0.05 for i in range(8, 12) for j in range(i + 1, 12)})
    m[(8, 9)] = 0.01  # 4-7 and 8-11 tie on M_max (0.05); the later one, 8-11, has the lower M_sum
    report = _report(m, layers=12, runs=(), attention=attention)
    ranked = rank_block_windows(report, size=4)
    assert [w["layers"] for w in ranked[:2]] == [[8, 11], [4, 7]]
    assert ranked[0]["m_max"] == ranked[1]["m_max"] == pytest.approx(0.05)
    assert ranked[0]["m_sum"] == pytest.approx(0.26) and ranked[1]["m_sum"] == pytest.approx(0.30)
    assert [w["layers"] for w in ranked[2:]] == [[0, 3]]  # what is left without overlap
    # attention-free (kind ffn) layers are not whole blocks: 2-6 never start or join a window
    assert all(w["layers"][1] < 2 or w["layers"][0] > 6 for w in rank_block_windows(_report({}), size=2))
