"""The depth-reduction frontier: step counting, moves, the incremental evaluator against written models,
refits and baselines (tiny random Llamas; the CLI in test_frontier_cli.py, one slow SmolLM2 run in
test_smollm2.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import rel_err

from ffnfusion.cli import main
from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.core.model_io import load_model
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.depth_plan import DepthPlan, DepthReductionPass, Move
from ffnfusion.runtime import ridge
from ffnfusion.runtime.block_runner import BlockRunner
from ffnfusion.runtime.frontier import refits, search
from ffnfusion.runtime.frontier.evaluator import DepthEvaluator, Streams
from ffnfusion.runtime.frontier.refits import down_refit, post_norm_down_refit


@pytest.fixture(scope="module")
def evaluator(tiny_full, windows):
    return DepthEvaluator(BlockRunner(tiny_full, streamed=False), windows["fit"], windows["select"])


# --- step counting ------------------------------------------------------------------------------

def test_steps_per_move():
    plan = DepthPlan(8)
    assert (plan.original_steps, plan.steps, plan.saved) == (16, 16, 0)
    plan = plan.apply(Move("attention", (3,))).apply(Move("ffn", (5,))).apply(Move("block", (1,)))
    assert plan.saved == 1 + 1 + 2
    plan = plan.apply(Move("attention", (4,)))
    assert Move("fuse", (3, 4)) in plan.legal_moves()  # FFNs 3 and 4 with no attention between
    assert Move("fuse", (4, 5)) not in plan.legal_moves()  # FFN 5 is gone
    fused = plan.apply(Move("fuse", (3, 4)))
    assert fused.saved == plan.saved + 1 and fused.groups == ((3, 4),)
    merged = fused.apply(Move("fuse", (2, 3, 4)))  # FFN 2 joins: attention 3 is gone
    assert merged.groups == ((2, 4),) and merged.saved == plan.saved + 2  # k = 3 FFNs save 2
    assert merged.steps == 16 - merged.saved
    with pytest.raises(InvalidPlanError, match="not possible"):
        merged.apply(Move("ffn", (3,)))  # a member of a fused group
    assert DepthPlan.from_dict(merged.to_dict()) == merged


def test_parallel_windows_take_whole_blocks_and_save_2k_minus_2():
    plan = DepthPlan(8)
    assert not any(m.kind == "parallel" for m in plan.legal_moves())  # only when asked for
    moves = [m for m in plan.legal_moves(window=3) if m.kind == "parallel"]
    assert len(moves) == 7 + 6 and Move("parallel", (2, 3, 4)) in moves
    plan = plan.apply(Move("attention", (5,)))
    assert Move("parallel", (4, 5)) not in plan.legal_moves(window=3)  # 5 is no longer a whole block
    windowed = plan.apply(Move("parallel", (1, 2, 3)))
    assert windowed.saved == plan.saved + 4 and windowed.steps == 16 - windowed.saved
    for move in (Move("ffn", (2,)), Move("attention", (1,)), Move("parallel", (3, 4))):
        assert move not in windowed.legal_moves(window=3)  # members take no other move
        with pytest.raises(InvalidPlanError, match="not possible"):
            windowed.apply(move)
    assert Move("fuse", (4, 5)) in windowed.legal_moves() and Move("fuse", (3, 4)) not in windowed.legal_moves()
    assert DepthPlan.from_dict(windowed.to_dict()) == windowed and str(Move("parallel", (1, 2, 3))) == "parallel 1-3"


def test_the_cost_bound_counts_the_moves_left_from_the_steps_already_saved(evaluator):
    # A model with attention already removed starts with those steps saved: budget 3 from 1 is 2 moves.
    from ffnfusion.runtime.frontier.frontier import search_cost_bound

    def bound(plan, budget):
        return search_cost_bound(plan, [budget], fit_tokens=256, select_tokens=128)

    assert bound(evaluator.plan0, 4) == pytest.approx(2 * bound(evaluator.plan0, 2))
    dropped = evaluator.plan0.apply(Move("attention", (3,)))
    assert dropped.saved == 1
    assert bound(dropped, 3) == pytest.approx(2 * bound(dropped, 2))  # 2 moves against 1 (it said 3:2)


def test_inspect_reports_sequential_steps(tiny_full, tiny_dynamo20, capsys):
    for model, steps in ((tiny_full, 16), (tiny_dynamo20, 16 - 5)):
        assert main(["inspect", str(model), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["sequential_steps"] == steps


# --- the evaluator and written models ---------------------------------------------------------------

def test_evaluator_original_streams_equal_onnx_runtime(evaluator, tiny_full, windows):
    reference = BlockRunner(tiny_full, streamed=False).final_stream(windows["select"])
    assert rel_err(evaluator.state.select.at[-1], reference) < 1e-5
    assert evaluator.state.kl == 0 and abs(evaluator.score_plan(evaluator.plan0, {})) < 1e-6


def test_written_plan_equals_the_evaluator_and_torch(evaluator, tiny_llama, tiny_full, windows, tmp_path):
    # Every kind of move, and refits (one into a fused group): the file computes what was scored.
    evaluator.reset()
    # fuse 5-6 keeps attention 5 before the group; block 1 and FFN 7 go
    for move in [Move("attention", (3,)), Move("attention", (4,)), Move("fuse", (3, 4)), Move("attention", (6,)),
                 Move("fuse", (5, 6)), Move("ffn", (7,)), Move("block", (1,))]:
        evaluator.accept(evaluator.candidate(move, refit=True))
    state = evaluator.state
    assert state.deltas and state.plan.saved == 1 + 1 + 1 + 1 + 1 + 1 + 2
    assert state.plan.groups == ((3, 4), (5, 6))
    _check_written_state(evaluator, tiny_llama, tiny_full, windows, tmp_path)


def _check_written_state(evaluator, tiny_llama, tiny_full, windows, tmp_path) -> None:
    """The evaluator's state written to a file computes what was scored, and so does the same plan
    with its refits applied to the torch model (independent of the graph rewrite)."""
    from ffnfusion.core.model_io import save_model
    from ffnfusion.exporters.llama_surgery import apply_depth_plan

    state = evaluator.state
    model = load_model(tiny_full)
    DepthReductionPass(state.plan, state.deltas)(model)
    assert find_blocks(model).sequential_steps == state.plan.steps
    written = save_model(model, tmp_path / "model.onnx")
    final = BlockRunner(written, streamed=False).final_stream(windows["select"])
    assert rel_err(state.select.at[-1], final) < 1e-5
    assert abs(evaluator.score_plan(state.plan, state.deltas) - state.kl) < 1e-5
    reference = copy.deepcopy(tiny_llama)
    apply_depth_plan(reference, state.plan, state.deltas)
    with torch.no_grad():
        expected = reference(torch.from_numpy(windows["eval"][:1]), use_cache=False).logits.numpy()
    assert rel_err(BlockRunner(written, streamed=False).logits(windows["eval"][:1]), expected) < 1e-5
    evaluator.reset()


def test_stale_fitting_streams_are_brought_up_to_date_exactly_where_read(evaluator, windows):
    evaluator.reset()
    before = evaluator.token_positions
    for move in [Move("attention", (5,)), Move("ffn", (2,))]:
        evaluator.accept(evaluator.candidate(move, refit=False))
    fit = evaluator.state.fit
    assert fit.current == 2 * 2 + 1  # FFN 2's position: everything after it is stale
    # accepting ran only the selection tokens from each change to the end, not the fitting tokens
    select_tokens = windows["select"].size
    assert evaluator.token_positions - before == 2 * ((16 - 10) + (16 - 5)) * select_tokens
    state = evaluator.state
    recomputed = evaluator.capture(state.plan, state.deltas, windows["fit"]).at
    assert np.array_equal(evaluator._fit_stream(11), recomputed[11]) and fit.current == 11
    assert all(np.array_equal(fit.at[p], recomputed[p]) for p in range(12))
    # a refit reads the stream at its FFN's position: the same refit and score as from a full capture
    lazy = evaluator.candidate(Move("attention", (6,)), refit=True)
    state.fit = Streams(windows["fit"], recomputed)
    full = evaluator.candidate(Move("attention", (6,)), refit=True)
    assert full.refit is not None and lazy.kl == full.kl and lazy.deltas.keys() == full.deltas.keys()
    assert all(np.array_equal(lazy.deltas[k], full.deltas[k]) for k in full.deltas)
    evaluator.reset()


def test_a_screened_score_is_the_score_on_windows_cut_to_the_screen(evaluator, tiny_full, windows):
    evaluator.reset()
    move = Move("attention", (4,))
    screened = evaluator.candidate(move, refit=True, screen=12)
    cut = DepthEvaluator(BlockRunner(tiny_full, streamed=False), windows["fit"], windows["select"][:, :12])
    exact = cut.candidate(move, refit=True)
    assert abs(screened.kl - exact.kl) < 1e-6 and screened.screen == 12
    assert abs(evaluator.current_kl(12)) < 1e-6
    # accepted, it is scored in full
    evaluator.accept(screened)
    assert evaluator.state.kl == pytest.approx(evaluator.score_plan(screened.plan, screened.deltas), abs=1e-6)
    assert evaluator.state.kl != pytest.approx(screened.kl, abs=1e-6)
    evaluator.reset()


def test_a_screened_search_records_full_scores_and_costs_less(evaluator):
    start = evaluator.token_positions
    unscreened = search.greedy(evaluator, [3], refit=True, lazy=True, method="auto")
    middle = evaluator.token_positions
    screened = search.greedy(evaluator, [3], refit=True, lazy=True, method="auto",
                             options=search.SearchOptions(screen_tokens=8))
    assert evaluator.token_positions - middle < 0.75 * (middle - start)
    point = screened[0]
    assert point.kl == pytest.approx(evaluator.score_plan(point.plan, point.deltas), abs=1e-6)
    assert unscreened[0].steps_saved == point.steps_saved == 3
    evaluator.reset()


def test_a_race_with_every_move_a_contender_is_the_unscreened_search(evaluator):
    """Screened candidates only choose which are scored in full; the step is decided on full scores."""
    unscreened = search.greedy(evaluator, [3], refit=True, lazy=False, method="auto")
    start = evaluator.token_positions
    race = search.greedy(evaluator, [3], refit=True, lazy=False, method="auto",
                         options=search.SearchOptions(screen_tokens=8, contenders=1000))
    assert race[0].moves == unscreened[0].moves and race[0].kl == pytest.approx(unscreened[0].kl, abs=1e-7)
    everyone = evaluator.token_positions - start
    start = evaluator.token_positions
    two = search.greedy(evaluator, [3], refit=True, lazy=False, method="auto",
                        options=search.SearchOptions(screen_tokens=8, contenders=2))
    assert evaluator.token_positions - start < everyone
    assert two[0].kl == pytest.approx(evaluator.score_plan(two[0].plan, two[0].deltas), abs=1e-6)
    evaluator.reset()


def test_a_held_out_perplexity_runs_from_the_originals_last_kept_stream(evaluator, tiny_full, windows, monkeypatch):
    from ffnfusion.runtime.frontier import evaluator as evaluator_module

    plan = evaluator.plan0.apply(Move("attention", (5,))).apply(Move("ffn", (6,)))
    evaluator.perplexity(evaluator.plan0, {}, windows["eval"])  # the original's streams kept
    before = evaluator.token_positions
    kept = evaluator.perplexity(plan, {}, windows["eval"])
    assert evaluator.token_positions - before == (evaluator.positions - 10) * windows["eval"].size
    monkeypatch.setattr(evaluator_module, "HELD_OUT_CACHE_BYTES", 0)  # only the embedding kept: from 0
    uncached = DepthEvaluator(BlockRunner(tiny_full, streamed=False), windows["fit"], windows["select"])
    assert sorted(uncached._held_out_streams(windows["eval"])) == [0, uncached.positions]
    before = uncached.token_positions
    assert uncached.perplexity(plan, {}, windows["eval"]) == pytest.approx(kept, rel=1e-6)
    assert uncached.token_positions - before == uncached.positions * windows["eval"].size


def test_first_guesses_err_low_and_cut_the_first_steps_full_scores(evaluator):
    """The first step's guesses (screened scores scaled by the smallest full/screened ratio seen) are at
    most the full score of every move scored in full, equal for one; the first step scores fewer moves
    in full and costs less, and its point's KL is a full score."""
    evaluator.reset()
    moves = evaluator.state.plan.legal_moves()
    guesses = search.FirstGuesses.of(evaluator, moves, 8)
    assert guesses.guess(moves[0]) == -np.inf  # no ratio before a full score
    full = {move: evaluator.candidate(move, refit=False).score(0.0) for move in moves[:6]}
    for move, score in full.items():
        guesses.observe(move, score)
    assert all(guesses.guess(move) <= score * (1 + 1e-9) for move, score in full.items())
    assert any(guesses.guess(move) == pytest.approx(score) for move, score in full.items())
    costs, points = {}, {}
    for tokens in (0, 8):
        start = dict(evaluator.cost_by_work)
        points[tokens] = search.greedy(evaluator, [1], refit=False, lazy=True, method="auto",
                                       options=search.SearchOptions(guess_tokens=tokens))[0]
        costs[tokens] = {work: count - start.get(work, 0) for work, count in evaluator.cost_by_work.items()}
    assert costs[8]["score"] < costs[0]["score"] / 2 and costs[8]["score (screen)"] > 0
    assert sum(costs[8].values()) < sum(costs[0].values())
    point = points[8]
    assert point.kl == pytest.approx(evaluator.score_plan(point.plan, point.deltas), abs=1e-6)
    evaluator.reset()


def test_an_accepted_candidate_keeps_the_streams_its_score_ran(evaluator, windows):
    evaluator.reset()
    candidate = evaluator.candidate(Move("attention", (5,)), refit=True, keep_streams=True)
    assert candidate.streams is not None
    before = evaluator.token_positions
    evaluator.accept(candidate)
    assert evaluator.token_positions == before  # nothing run again
    state = evaluator.state
    recomputed = evaluator.capture(state.plan, state.deltas, windows["select"]).at
    assert all(np.allclose(state.select.at[p], recomputed[p], atol=1e-5) for p in range(len(recomputed)))
    assert state.kl == pytest.approx(evaluator.score_plan(state.plan, state.deltas), abs=1e-6)
    # without kept streams (the old way) accepting runs the selection tokens from the change
    evaluator.reset()
    evaluator.accept(evaluator.candidate(Move("attention", (5,)), refit=True))
    assert evaluator.state.kl == pytest.approx(state.kl, abs=1e-7)
    evaluator.reset()


def test_a_refit_is_reused_until_a_position_before_its_cut_changes(evaluator):
    evaluator.reset()
    move = Move("attention", (3,))
    first = evaluator.candidate(move, refit=True)
    assert first.refit is not None
    evaluator.accept(evaluator.candidate(Move("attention", (6,)), refit=False))  # after move's cut: reused
    before = evaluator.cost_by_work["refit"]
    again = evaluator.candidate(move, refit=True)
    assert evaluator.cost_by_work["refit"] == before and again.refit == first.refit
    fresh = DepthEvaluator(evaluator.runner, evaluator.state.fit.windows, evaluator.state.select.windows, reuse=False)
    fresh.accept(fresh.candidate(Move("attention", (6,)), refit=False))
    recomputed = fresh.candidate(move, refit=True)
    assert recomputed.refit == again.refit and again.kl == pytest.approx(recomputed.kl, abs=1e-6)
    assert all(np.array_equal(again.deltas[k], recomputed.deltas[k]) for k in recomputed.deltas)
    evaluator.accept(evaluator.candidate(Move("ffn", (1,)), refit=False))  # before it: fitted again
    evaluator.candidate(move, refit=True)
    assert evaluator.cost_by_work["refit"] > before
    evaluator.reset()


def test_a_long_step_reports_progress_within_it(evaluator, monkeypatch):
    """Between accepted moves (an 8B model's first step takes an hour), a line per interval: moves
    scored so far and the best of them; then the step's own line."""
    lines: list[str] = []
    monkeypatch.setattr(search, "PROGRESS_INTERVAL_S", 0.0)
    search.greedy(evaluator, [1], refit=False, lazy=True, method="auto", progress=lines.append)
    within = [line for line in lines if " moves, best so far " in line]
    assert len(within) >= 4 and within[0].startswith("auto: step 1: scored 1 of at most ")
    assert "-> 1 steps saved" in lines[-1]
    evaluator.reset()


def test_block_removal_is_an_identity_skip(tiny_llama, tiny_full, windows, tmp_path):
    # Independent reference: transformers' own model with decoder layer 2 deleted.
    model = load_model(tiny_full)
    DepthReductionPass(DepthPlan(8).apply(Move("block", (2,))))(model)
    from ffnfusion.core.model_io import save_model

    runner = BlockRunner(save_model(model, tmp_path / "model.onnx"), streamed=False)
    logits = runner.logits(windows["eval"][:1])
    cut = copy.deepcopy(tiny_llama)
    del cut.model.layers[2]
    for index, layer in enumerate(cut.model.layers):
        layer.self_attn.layer_idx = index
    cut.config.num_hidden_layers = 7
    with torch.no_grad():
        reference = cut(torch.from_numpy(windows["eval"][:1]), use_cache=False).logits.numpy()
    assert rel_err(logits, reference) < 1e-4


def test_refit_lowers_the_stream_error_and_is_refused_when_it_cannot_help():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 20)).astype(np.float32)
    w = rng.standard_normal((20, 6)).astype(np.float32)
    fitted = down_refit(a, a @ w + 0.01 * rng.standard_normal((400, 6)).astype(np.float32), val_rows=100)
    assert fitted is not None and fitted[2] < 0.05
    assert down_refit(a, rng.standard_normal((400, 6)).astype(np.float32), val_rows=100) is None  # noise: nothing to fit


def test_refit_with_fewer_rows_than_features_solves_the_kernel_form_to_the_same_answer():
    """An 8B FFN refitted on a few hundred tokens: the N×N kernel form, equal to the width×width primal."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((60, 200)).astype(np.float32)  # 45 fitting rows, 200 features
    residual = a @ (0.1 * rng.standard_normal((200, 8))).astype(np.float32)
    kernel = refits.down_refit(a, residual, val_rows=15)
    val, fit = slice(45, 60), slice(0, 45)
    best = None
    for lam in ridge.FRONTIER_LAMBDAS:  # the primal form, written out
        gram = (a[fit].T @ a[fit]).astype(np.float64)
        delta = ridge.solve_primal(gram, (a[fit].T @ residual[fit]).astype(np.float64), lam)
        error = float(np.linalg.norm(a[val] @ delta.astype(np.float32) - residual[val]) / np.linalg.norm(residual[val]))
        best = (lam, error) if best is None or error < best[1] else best
    whole = ridge.solve_primal((a.T @ a).astype(np.float64), (a.T @ residual).astype(np.float64), best[0])
    assert kernel is not None and kernel[1] == best[0] and abs(kernel[2] - best[1]) < 1e-4
    assert rel_err(kernel[0], whole.astype(np.float32)) < 1e-4


def test_greedy_refit_never_worse_than_plain_on_held_out_tokens(evaluator):
    points = search.greedy(evaluator, [2, 4], refit=True, lazy=True, method="auto")
    assert [p.steps_saved for p in points] == [2, 4]
    for point in points:
        assert point.plan.saved == point.steps_saved
        assert abs(evaluator.score_plan(point.plan, point.deltas) - point.kl) < 1e-5
    evaluator.reset()
    for step in points[-1].moves:
        move = _move(step)
        plain = evaluator.candidate(move, refit=False)
        chosen = evaluator.candidate(move, refit=step["refit"] is not None)
        assert chosen.kl <= plain.kl + 1e-9
        evaluator.accept(chosen)
    evaluator.reset()


def _move(step: dict) -> Move:
    layers = step["layers"]
    return Move(step["move"], tuple(range(layers[0], layers[1] + 1)) if step["move"] == "fuse" else (layers,))


def test_written_windows_equal_the_evaluator_and_torch(evaluator, tiny_llama, tiny_full, windows, tmp_path):
    """Parallel moves (with their refit into the window's last block) beside a removal and a fusion:
    the written file computes what the evaluator scored, and so does the torch model with the plan."""
    evaluator.reset()
    for move in [Move("parallel", (0, 1)), Move("attention", (4,)), Move("fuse", (3, 4)),
                 Move("parallel", (5, 6, 7))]:
        evaluator.accept(evaluator.candidate(move, refit=True))
    state = evaluator.state
    assert state.plan.windows == ((0, 1), (5, 7)) and state.plan.saved == 2 + 1 + 1 + 4
    assert 1 in state.deltas  # the first window's refit, written into its last block's FFN
    _check_written_state(evaluator, tiny_llama, tiny_full, windows, tmp_path)


def test_a_parallel_refit_lowers_the_fitting_error(evaluator):
    evaluator.reset()
    move = Move("parallel", (2, 3, 4))
    plain, refitted = evaluator.candidate(move, refit=False), evaluator.candidate(move, refit=True)
    assert refitted.refit is not None and refitted.refit.layer == 4 and refitted.refit.span == (4, 4)
    assert refitted.refit.held_out_residual < 1  # better than no refit on the held-out fitting windows
    assert refitted.start == plain.start == 4
    evaluator.reset()


def test_baselines_save_what_they_say(evaluator):
    for kind in ("block", "attention", "ffn"):
        points = search.ranked_removal(evaluator, [2, 4], kind)
        assert [p.steps_saved for p in points] == [2, 4]
        assert all(m["move"] == kind for p in points for m in p.moves)
    fusion = search.fusion_runs(evaluator, [4])
    assert fusion[0].steps_saved == 4 and fusion[0].plan.groups
    parallel = search.block_parallel(evaluator, [6, 8, 9])  # a 4-block window, one more of 2, 9 odd: 8
    assert [p.steps_saved for p in parallel] == [6, 8, 8]
    assert [len(p.plan.windows) for p in parallel] == [1, 2, 2] and parallel[0].plan.windows[0][1] - parallel[0].plan.windows[0][0] == 3
    assert all("m_max" in m and m["move"] == "parallel" for p in parallel for m in p.moves)
    evaluator.reset()


def test_the_fusion_baseline_screens_its_runs_and_decides_on_full_scores(evaluator):
    evaluator.reset()
    start = evaluator.token_positions
    exhaustive = search.fusion_runs(evaluator, [2, 3], screen_tokens=0)
    every_run = evaluator.token_positions - start
    raced = search.fusion_runs(evaluator, [2, 3], screen_tokens=8, contenders=1000)  # every run a contender
    assert [p.moves for p in raced] == [p.moves for p in exhaustive]
    assert [p.kl for p in raced] == pytest.approx([p.kl for p in exhaustive], abs=1e-7)
    start = evaluator.token_positions
    two = search.fusion_runs(evaluator, [2, 3], screen_tokens=8, contenders=2)
    assert evaluator.token_positions - start < every_run
    assert all(p.kl == pytest.approx(evaluator.score_plan(p.plan, p.deltas), abs=1e-6) for p in two)
    evaluator.reset()


def test_streamed_evaluator_scores_like_the_in_ram_one(evaluator, tiny_full, windows):
    # Models larger than RAM: the same search on the block-streamed runner (weights read per use).
    streamed = DepthEvaluator(BlockRunner(tiny_full, streamed=True), windows["fit"], windows["select"])
    evaluator.reset()
    for move in (Move("attention", (3,)), Move("block", (5,))):
        a, b = evaluator.candidate(move, refit=True), streamed.candidate(move, refit=True)
        assert abs(a.kl - b.kl) <= 1e-5 * max(1.0, a.kl) and (a.refit is None) == (b.refit is None)


def test_a_refit_chooses_its_lambda_on_a_held_out_window_or_is_not_made(tiny_full, windows, caplog):
    # Two fitting windows: one of them chooses λ (a quarter of two is none: every λ looked perfect).
    runner = BlockRunner(tiny_full, streamed=False)
    two = DepthEvaluator(runner, windows["fit"][:2], windows["select"])
    assert two.val_rows == windows["fit"].shape[1]
    refitted = [c.refit for move in (Move("attention", (3,)), Move("ffn", (4,)), Move("block", (5,)))
                if (c := two.candidate(move, refit=True)).refit is not None]
    assert refitted and all(r.held_out_residual > 0 for r in refitted)
    assert DepthEvaluator(runner, windows["fit"], windows["select"]).val_rows == 2 * windows["fit"].shape[1]
    with caplog.at_level("WARNING"):
        one = DepthEvaluator(runner, windows["fit"][:1], windows["select"])
    assert one.val_rows == 0 and "one fitting window" in caplog.text
    assert all(one.candidate(Move("attention", (j,)), refit=True).refit is None for j in (3, 4))


def test_post_norm_refit_closes_a_reachable_gap_and_declines_noise(monkeypatch):
    """An FFN with a post-RMSNorm (``u = g ⊙ d / rms(d)``, ``d = A·W``) whose W_down drifted from one
    that reaches the target: the fixed-point refit (RMS held, re-solved) closes the gap on every
    token, better than one round; a residual the features cannot explain gets no refit."""
    import onnx_ir as ir

    from ffnfusion.passes.norm_matchers import Norm

    rng = np.random.default_rng(0)
    tokens, width, hidden = 2048, 32, 16
    a = rng.normal(size=(tokens, width)).astype(np.float32)
    reachable = rng.normal(0, 0.3, (width, hidden)).astype(np.float32)
    drifted = reachable + rng.normal(0, 0.1, (width, hidden)).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    norm = Norm("rms_decomposed", 1e-6, ir.Value(name="g", const_value=ir.tensor(gain)), ir.Value(name="y"), None, ())
    bias = np.zeros(hidden, np.float32)

    def post_normed(weight):
        d = a @ weight
        return gain * d / np.sqrt(np.mean(d * d, -1, keepdims=True) + 1e-6)

    residual = post_normed(reachable) - post_normed(drifted)
    delta, _, held_out = post_norm_down_refit(a, drifted, bias, norm, residual, 512)
    gap = float(np.linalg.norm(post_normed(drifted + delta) - post_normed(reachable)) / np.linalg.norm(residual))
    assert gap < 0.05 and held_out < 0.2, (gap, held_out)
    monkeypatch.setattr(refits, "POST_NORM_ROUNDS", 1)
    one_round, _, _ = post_norm_down_refit(a, drifted, bias, norm, residual, 512)
    assert gap < 0.5 * float(np.linalg.norm(post_normed(drifted + one_round) - post_normed(reachable))
                             / np.linalg.norm(residual))
    assert post_norm_down_refit(a, drifted, bias, norm, rng.normal(size=residual.shape).astype(np.float32), 512) is None
