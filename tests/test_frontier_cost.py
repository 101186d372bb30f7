"""The frontier_cost benchmark on the tiny Llama: every variant runs, the default search takes the
unscreened one's path at less cost, and the table says so."""

from __future__ import annotations

import json

import numpy as np

from ffnfusion.benchmarks import frontier_cost


def test_variants_side_by_side(tiny_full, tmp_path, capsys):
    ids = []
    for index in range(4):
        ids.append(tmp_path / f"ids{index}.npy")
        np.save(ids[-1], np.random.default_rng(20 + index).integers(0, 128, 1024))
    out = tmp_path / "cost.json"
    assert frontier_cost.main([str(tiny_full), "--steps", "2,4", "--screen", "16", "--guess", "16", "--window", "32",
                               "--calib-ids", str(ids[0]), str(ids[1]), "--eval-ids", str(ids[2]), "--eval-also", str(ids[3]),
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["unscreened (as before)", "race: screen 16, 2 contenders, 4 refitted",
                                            "first step guessed on 16 tokens", "default (lazy fitting streams, reuse)"]
    unscreened, screened, guessed, default = rows
    assert default["points"] == unscreened["points"]  # the same search, to the last digit
    assert default["full_forward_equivalents"] < unscreened["full_forward_equivalents"]
    # accepting a move runs nothing again (its score ran it), refits are found again only when stale
    assert "accept" not in default["cost_by_work"] and unscreened["cost_by_work"]["accept"] > 0
    assert default["cost_by_work"]["refit"] < unscreened["cost_by_work"]["refit"]
    assert "fit streams" not in unscreened["cost_by_work"]
    assert screened["options"]["screen_tokens"] == 16 and set(screened["points"]) == {"2", "4"}
    assert guessed["options"]["guess_tokens"] == 16 and set(guessed["points"]) == {"2", "4"}
    assert guessed["cost_by_work"]["score (screen)"] > 0 and guessed["cost_by_work"]["score"] < default["cost_by_work"]["score"]
    assert all(f"ppl {ids[3]}" in point for row in rows for point in row["points"].values())
    assert default["points"]["4"][f"ppl {ids[3]}"] == unscreened["points"]["4"][f"ppl {ids[3]}"]
    table = capsys.readouterr().out
    assert "| default (lazy fitting streams, reuse) |" in table and "| yes |" in table
    assert "geometric mean vs unscreened" in table and "(+0.0%) |" in table.splitlines()[-1]
