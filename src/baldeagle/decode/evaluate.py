"""`baldeagle eval`: speculative decoding against plain decoding (and prompt lookup), side by side.

For every prompt turn the same rendered conversation is decoded three ways: plain target decoding
(the baseline, one forward per token), speculative decoding with the draft (chain or EAGLE-2 tree),
and optionally Transformers prompt lookup decoding. A later turn sees the baseline's answer to the
earlier one (greedy speculative answers are identical anyway).

Timing: a burst of load on a shared machine during one decode would decide a ratio of two single
timings, so each turn runs the decoders `timing_repeats` times, interleaved, the order reversed
every other repeat (plain, speculative, lookup, then lookup, speculative, plain), and keeps each
decoder's median wall and CPU seconds. Every run of a decoder starts from the same seed, so the
repeats decode the same tokens (recorded as repeats_identical); acceptance and exactness come from
the first run.

Metrics (written to `<out>/eval.json`):
- acceptance_length τ = 1 + accepted draft tokens / verification steps, i.e. the mean number of
  tokens each target verification forward yields (counted before an answer is cut at EOS or
  max_new_tokens, so a perfect draft scores exactly k + 1, or depth + 1 for trees);
- per_position_acceptance[i]: share of verification steps that accepted at least i + 1 draft tokens;
- tokens_per_second (speculative), baseline_tokens_per_second, prompt_lookup_tokens_per_second:
  new tokens / summed per-turn median wall time, prefill included; speedup = their ratios;
- turn_speedup_median / _q1 / _q3 / _iqr: the spread of the per-turn speedups (from the medians);
- cpu_speedup, cpu_speedup_vs_prompt_lookup: the same ratios in CPU seconds (time.process_time,
  all threads of this process), which contention from other processes barely moves; with
  cpu_seconds_per_wall_second per decoder they show how much the machine's load bent the wall time;
- timing_repeats, repeats_identical: how the timings were taken, and that repeats matched;
- outputs_match_baseline: every speculative answer equals the baseline token for token (greedy;
  null when sampling, where answers legitimately differ).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from baldeagle.config import EvalConfig, to_dict, write_resolved
from baldeagle.conventions import check_full_attention, pad_token_id, text_config, torch_dtype
from baldeagle.data.prompts import Prompt, conversation, load_prompt_set
from baldeagle.decode.speculative import Generation, SpecSettings, plain_generate, speculative_generate
from baldeagle.model.draft_config import check_fits_target
from baldeagle.model.gqa_attention import use_gqa_attention
from baldeagle.model.packed import choose_single_row_path, pack_linears

logger = logging.getLogger(__name__)

PROMPT_LOOKUP_TOKENS = 10  # Transformers' prompt_lookup_num_tokens (its documented example value)


# ------------------------------------------------------------------------------------------
# Inputs: prompts, compatibility, rendering
# ------------------------------------------------------------------------------------------


def check_compatible(target, tokenizer, draft, model_name: str) -> list[str]:
    """Raise on a draft or tokenizer made for another target; return warnings for softer doubts."""
    check_full_attention(target.config, model_name)
    cfg = draft.config
    text = text_config(target.config)
    where = f"the draft (made for {cfg.target_model or 'an unnamed target'})"
    check_fits_target(cfg, text, f"the draft evaluated with {model_name}")
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than {model_name}'s vocabulary of "
                         f"{text.vocab_size}: it belongs to another model")
    warnings = []
    own = target.get_input_embeddings().weight
    if not torch.allclose(draft.embed_tokens.weight.float(), own.float(), atol=1e-2, rtol=1e-2):
        warnings.append(f"{where}: its copy of the token embeddings differs from {model_name}'s; "
                        "it was probably trained for another target (acceptance will suffer)")
    if cfg.target_model and Path(cfg.target_model).name != Path(getattr(target.config, "_name_or_path", "")).name:
        warnings.append(f"the draft records target '{cfg.target_model}', evaluating with '{model_name}'")
    return warnings


def render(tokenizer, prompt: Prompt, answers: list[str], turn: int) -> torch.Tensor:
    """Token ids [1, n] of the conversation up to user turn `turn`, with the generation prompt."""
    text = tokenizer.apply_chat_template(conversation(prompt, answers, turn), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def _check_lengths(tokenizer, prompts: list[Prompt], max_new_tokens: int, context: int) -> None:
    """Fail before decoding when a conversation cannot fit: all its turns plus every answer."""
    for prompt in prompts:
        ids = render(tokenizer, prompt, [""] * len(prompt.turns), len(prompt.turns) - 1)
        need = ids.shape[1] + len(prompt.turns) * max_new_tokens
        if need > context:
            raise ValueError(
                f"prompt {prompt.id}: {ids.shape[1]} prompt tokens + {len(prompt.turns)} × max_new_tokens "
                f"{max_new_tokens} = {need} exceeds the target's context of {context} tokens"
            )


# ------------------------------------------------------------------------------------------
# Decoding side by side
# ------------------------------------------------------------------------------------------


def prompt_lookup_generate(target, ids, settings: SpecSettings, pad_id: int) -> Generation:
    """Transformers' prompt lookup decoding (draft-free n-gram speculation), timed."""
    import time

    sampling = settings.temperature > 0
    kwargs = dict(temperature=settings.temperature, top_p=settings.top_p) if sampling else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
            prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS, eos_token_id=list(settings.eos_token_ids) or None,
            pad_token_id=pad_id, do_sample=sampling, **kwargs,
        )
    return Generation(out[0, ids.shape[1]:].tolist(), seconds=time.perf_counter() - start)


def first_mismatch(target, ids, expected: list[int], got: list[int]) -> dict | None:
    """Where `got` leaves `expected`, and the target's top-2 logit gap there (plain forward, no cache).

    A tiny gap means the two answers split at a numerical near-tie (different kernels for one and
    several tokens per forward), not at a decoding error.
    """
    if expected == got:
        return None
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    context = torch.cat([ids[0], torch.tensor(expected[:index], dtype=ids.dtype)])[None]
    top2 = target(context, logits_to_keep=1).logits[0, -1].float().topk(2).values
    return {"index": index, "top2_logit_gap": float(top2[0] - top2[1])}


def _settings(cfg: EvalConfig, eos: tuple[int, ...] = ()) -> SpecSettings:
    return SpecSettings(
        mode=cfg.mode, num_draft_tokens=cfg.num_draft_tokens, tree_depth=cfg.tree_depth, tree_topk=cfg.tree_topk,
        tree_total_tokens=cfg.tree_total_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos,
    )


def quartiles(values: list[float]) -> tuple[float, float, float] | None:
    """(first quartile, median, third quartile), linearly interpolated (numpy's default); None if empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


PREFIXES = {"plain": "baseline_", "speculative": "", "prompt_lookup": "prompt_lookup_"}  # record keys per decoder


def median_timings(record: dict) -> dict:
    """A turn's per-decoder median wall and CPU seconds over its timing repeats (`record["timings"]`,
    as `time_turn` returns them) and the turn's speedups from those medians."""
    out = {}
    for name, runs in record["timings"].items():
        out[PREFIXES[name] + "seconds"] = statistics.median(runs["wall"])
        out[PREFIXES[name] + "cpu_seconds"] = statistics.median(runs["cpu"])
    turn = [{**record, **out}]
    return {**out, "speedup": _ratio(turn), "cpu_speedup": _ratio(turn, "cpu_seconds")}


def _rate(rows: list[dict], prefix: str, seconds: str = "seconds") -> float:
    """Summed new tokens over summed (median) seconds of one decoder: '' speculative, 'baseline_' plain,
    'prompt_lookup_'; `seconds` is 'seconds' (wall) or 'cpu_seconds'."""
    spent = sum(r[prefix + seconds] for r in rows)
    return sum(r[prefix + "new_tokens"] for r in rows) / spent if spent else 0.0


def _ratio(rows: list[dict], seconds: str = "seconds", other: str = "baseline_") -> float | None:
    """Speculative tokens/s over `other`'s tokens/s."""
    base = _rate(rows, other, seconds)
    return _rate(rows, "", seconds) / base if base else None


def summarise(records: list[dict], max_depth: int, greedy: bool, with_lookup: bool) -> dict:
    """Aggregate per-turn records (seconds: each decoder's median over the timing repeats) into eval.json."""
    accepted = [a for r in records for a in r["accepted"]]
    steps = max(len(accepted), 1)
    tps, base_tps = _rate(records, ""), _rate(records, "baseline_")
    lookup_tps = _rate(records, "prompt_lookup_") if with_lookup else None
    categories = {}
    for name in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == name]
        acc = [a for r in rows for a in r["accepted"]]
        categories[name] = {
            "acceptance_length": 1 + sum(acc) / max(len(acc), 1),
            "turns": len(rows),
            "speedup": _ratio(rows),
            "cpu_speedup": _ratio(rows, "cpu_seconds"),
        }
    return {
        "acceptance_length": 1 + sum(accepted) / steps,
        "per_position_acceptance": [sum(a > i for a in accepted) / steps for i in range(max_depth)],
        "tokens_per_second": tps,
        "baseline_tokens_per_second": base_tps,
        "prompt_lookup_tokens_per_second": lookup_tps,
        "speedup": tps / base_tps if base_tps else None,
        "speedup_vs_prompt_lookup": tps / lookup_tps if lookup_tps else None,
        **timing_summary(records, with_lookup),
        "outputs_match_baseline": all(r["matches_baseline"] for r in records) if greedy else None,
        "mismatched_turns": sum(not r["matches_baseline"] for r in records) if greedy else None,
        "max_mismatch_logit_gap": max((r["first_mismatch"]["top2_logit_gap"] for r in records
                                       if r.get("first_mismatch")), default=None),
        "prompt_lookup_matches_baseline": (all(r["prompt_lookup_matches_baseline"] for r in records)
                                           if greedy and with_lookup else None),
        "num_prompts": len({r["prompt_id"] for r in records}),
        "num_turns": len(records),
        "new_tokens": sum(r["new_tokens"] for r in records),
        "baseline_new_tokens": sum(r["baseline_new_tokens"] for r in records),
        "verification_steps": len(accepted),
        "per_category": categories,
    }


def timing_summary(records: list[dict], with_lookup: bool) -> dict:
    """How far the speedup can be trusted: its spread over turns, and CPU time beside wall time.

    CPU seconds (all threads of this process) hardly grow when other processes take the cores,
    while wall seconds do: a CPU-time speedup far from the wall-time one, or CPU seconds per wall
    second below the thread count, shows contention.
    """
    q1, median, q3 = quartiles([r["speedup"] for r in records if r["speedup"] is not None]) or (None,) * 3
    busy = {}
    for name in ["plain", "speculative"] + (["prompt_lookup"] if with_lookup else []):
        wall = sum(r[PREFIXES[name] + "seconds"] for r in records)
        busy[name] = sum(r[PREFIXES[name] + "cpu_seconds"] for r in records) / wall if wall else None
    return {
        "timing_repeats": max((len(r["timings"]["plain"]["wall"]) for r in records), default=0),
        "turn_speedup_median": median,
        "turn_speedup_q1": q1,
        "turn_speedup_q3": q3,
        "turn_speedup_iqr": None if q1 is None else q3 - q1,
        "cpu_speedup": _ratio(records, "cpu_seconds"),
        "cpu_speedup_vs_prompt_lookup": _ratio(records, "cpu_seconds", "prompt_lookup_") if with_lookup else None,
        "cpu_seconds_per_wall_second": busy,
        "repeats_identical": all(r["repeats_identical"] for r in records),
    }


# ------------------------------------------------------------------------------------------
# The run: load, warm up, decode every turn (timed, interleaved, repeated), summarise, write
# ------------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything loaded and checked before the first decode."""

    cfg: EvalConfig
    settings: SpecSettings
    prompts: list[Prompt]
    target: object
    draft: object
    tokenizer: object
    warnings: list[str]
    pad_id: int
    packed: bool
    single_row: dict | None = None  # which path one-row forwards take, as measured (choose_single_row_path)
    acceptance: dict | None = None  # chain and fan acceptance from choose_shape_from's score.json
    shape_choice: dict | None = None  # the measured costs and per-shape prediction that chose the shape

    def decoders(self) -> dict:
        """name → decode(ids, settings, generator), in the order of a turn's first timing repeat."""
        out = {
            "plain": lambda ids, s, g: plain_generate(self.target, ids, s, g),
            "speculative": lambda ids, s, g: speculative_generate(self.target, self.draft, ids, s, g),
        }
        if self.cfg.prompt_lookup:
            out["prompt_lookup"] = lambda ids, s, g: prompt_lookup_generate(self.target, ids, s, self.pad_id)
        return out


def _load(cfg: EvalConfig) -> Session:
    """Check the settings, load prompts, draft, tokenizer and target, and check they fit together."""
    from baldeagle.model.checkpoint import load_draft
    from baldeagle.targets import load_target, load_tokenizer, stop_token_ids, target_config_or_none

    _settings(cfg)  # bad k / top_p / temperature fail here, before anything loads
    acceptance = read_score_acceptance(cfg) if cfg.choose_shape_from else None
    target_config = target_config_or_none(cfg.model)  # None: a hub id offline (check_compatible checks later)
    if target_config is not None:
        check_full_attention(target_config, cfg.model)
    if cfg.timing_repeats < 1:
        raise ValueError(f"timing_repeats must be at least 1, got {cfg.timing_repeats}")
    dtype = torch_dtype(cfg.target_dtype)
    draft_dtype = torch_dtype(cfg.draft_dtype, "draft_dtype") if cfg.draft_dtype else dtype
    prompts = load_prompt_set(cfg.prompts, cfg.limit, cfg.first_turn_only)
    if not prompts:
        raise ValueError(f"no prompts to evaluate in {cfg.prompts!r}")
    draft = load_draft(cfg.draft, dtype=draft_dtype).eval()
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {cfg.model} has no chat template to render prompts with")
    target = load_target(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    warnings = check_compatible(target, tokenizer, draft, cfg.model)
    for warning in warnings:
        logger.warning("%s", warning)
    context = int(getattr(text_config(target.config), "max_position_embeddings", 0) or 0)
    if context:
        _check_lengths(tokenizer, prompts, cfg.max_new_tokens, context)
    settings = _settings(cfg, stop_token_ids(target.generation_config, tokenizer))
    # CPU float32: pre-pack linear weights for all three decoders alike (multi-token forwards get cheap)
    packed = pack_linears(target)
    pack_linears(draft)
    use_gqa_attention(target)  # tree verification reads a GQA target's cache in place (every decoder alike)
    # one-row forwards (every plain decoding step) take whichever path is faster on this CPU
    single_row = {"target": choose_single_row_path(target), "draft": choose_single_row_path(draft)}
    pad_id = pad_token_id(tokenizer.pad_token_id, settings.eos_token_ids)
    return Session(cfg, settings, prompts, target, draft, tokenizer, warnings, pad_id, packed, single_row, acceptance)


def read_score_acceptance(cfg: EvalConfig) -> dict:
    """From `choose_shape_from` (a `baldeagle score` result), checked: the chain's per-position
    acceptance and, if the score has them, the fans' and depth-2 trees' τ ([] for a score written before
    they were scored)."""
    if cfg.mode != "chain":
        raise ValueError(f"choose_shape_from picks a chain's k or a fan's width: it needs mode chain, "
                         f"got mode {cfg.mode!r}")
    path = Path(cfg.choose_shape_from)
    if not path.is_file():
        raise FileNotFoundError(f"choose_shape_from: {path} not found (a score.json written by `baldeagle score`)")
    try:
        score = json.loads(path.read_text())
        acceptance, fans = score["per_position_acceptance"], score.get("fan_acceptance_length", [])
        trees = [{"topk": int(t["topk"]), "total_tokens": int(t["total_tokens"]), "tau": float(t["tau"])}
                 for t in score.get("tree_acceptance_length", []) if t["depth"] == 2]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise ValueError(f"choose_shape_from: {path} is not a `baldeagle score` result ({error!r})") from None
    if not acceptance or not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in acceptance):
        raise ValueError(f"choose_shape_from: {path}: per_position_acceptance must be shares in [0, 1], "
                         f"got {acceptance!r}")
    if not isinstance(fans, list) or not all(isinstance(t, (int, float)) and 1 <= t <= 2 for t in fans):
        raise ValueError(f"choose_shape_from: {path}: fan_acceptance_length must be τ values in [1, 2], got {fans!r}")
    if not all(1 <= t["tau"] <= 3 and 2 <= t["topk"] < t["total_tokens"] - 1 <= 2 * t["topk"] for t in trees):
        raise ValueError(f"choose_shape_from: {path}: tree_acceptance_length must be depth-2 trees with τ in [1, 3] "
                         f"and topk < total_tokens - 1 <= 2 topk, got {trees!r}")
    return {"per_position": [float(a) for a in acceptance], "fans": [float(t) for t in fans], "trees": trees}


def choose_shape(session: Session) -> None:
    """Measure a step's parts on the first prompt, predict each shape's speedup from the score's
    acceptance (chains up to num_draft_tokens and the score's own k, fans as wide as the score
    measured, the depth-2 trees it scored), and decode with the best."""
    from baldeagle.decode.cost import apply_choice, best_shape, measure_costs, predict_shapes, settings_for, shape_name

    acceptance = session.acceptance
    max_k = min(session.cfg.num_draft_tokens, len(acceptance["per_position"]))
    max_fan = len(acceptance["fans"])
    ids = render(session.tokenizer, session.prompts[0], [], 0)
    trees = acceptance.get("trees", [])
    costs = measure_costs(session.target, session.draft, ids, max_k, max_fan,
                          trees=[(t["topk"], t["total_tokens"]) for t in trees])
    rows = predict_shapes(costs, acceptance["per_position"], max_k, acceptance["fans"], max_fan, trees)
    best = best_shape(rows)
    apply_choice(session.target, best)
    session.settings = dataclasses.replace(session.settings, **settings_for(best))
    session.shape_choice = {"score": session.cfg.choose_shape_from, "chosen": shape_name(best), "shape": best["shape"],
                            "drafted": best["drafted"], "costs_seconds": costs, "context_tokens": ids.shape[1],
                            "predicted": rows}
    logger.info("%s (verification %s): predicted speedup %s", shape_name(best),
                "through MKL" if best["verify_unpacked"] else "packed",
                ", ".join(f"{shape_name(r)} {r['speedup']:.2f}x" for r in rows))


def _warm_up(session: Session) -> None:
    """First calls allocate and install hooks: run every decoder once, briefly, untimed."""
    ids = render(session.tokenizer, session.prompts[0], [], 0)
    warm = dataclasses.replace(session.settings, max_new_tokens=8)
    for decode in session.decoders().values():
        decode(ids, warm, torch.Generator().manual_seed(session.cfg.seed))


def time_turn(decoders: dict, ids: torch.Tensor, settings: SpecSettings, seeds: dict, repeats: int):
    """Run every decoder `repeats` times, interleaved, the order reversed every other repeat
    (A B C, C B A, ...: a steady drift in load weighs on all decoders alike).

    Each run of a decoder starts from the same seed (its own generator and the global RNG, which
    Transformers' sampling uses), so repeats decode the same tokens. Returns each decoder's first
    Generation and its wall and CPU seconds per repeat, and whether every repeat matched the first.
    """
    first, timings, identical = {}, {name: {"wall": [], "cpu": []} for name in decoders}, True
    names = list(decoders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeds[name])
                generator = torch.Generator().manual_seed(seeds[name])
                wall, cpu = time.perf_counter(), time.process_time()
                generation = decoders[name](ids, settings, generator)
                timings[name]["cpu"].append(time.process_time() - cpu)
                timings[name]["wall"].append(time.perf_counter() - wall)
            if name not in first:
                first[name] = generation
            identical = identical and generation.tokens == first[name].tokens
    return first, timings, identical


def _decode_turn(session: Session, prompt: Prompt, turn: int, ids: torch.Tensor, seeds: dict):
    """One turn decoded every way: (its record, the plain answer's tokens). Acceptance and exactness
    come from each decoder's first run, seconds are medians over the repeats."""
    greedy = session.cfg.temperature == 0
    first, timings, identical = time_turn(session.decoders(), ids, session.settings, seeds, session.cfg.timing_repeats)
    base, spec = first["plain"], first["speculative"]
    if greedy and not identical:
        session.warnings.append(f"prompt {prompt.id} turn {turn}: a repeated greedy decode gave other tokens")
        logger.warning("%s", session.warnings[-1])
    record = {
        "prompt_id": prompt.id, "category": prompt.category, "turn": turn, "prompt_tokens": ids.shape[1],
        "new_tokens": len(spec.tokens), "accepted": spec.accepted, "baseline_new_tokens": len(base.tokens),
        "matches_baseline": spec.tokens == base.tokens, "repeats_identical": identical, "timings": timings,
    }
    if "prompt_lookup" in first:
        record.update(prompt_lookup_new_tokens=len(first["prompt_lookup"].tokens),
                      prompt_lookup_matches_baseline=first["prompt_lookup"].tokens == base.tokens)
    record.update(median_timings(record))
    if greedy and spec.tokens != base.tokens:
        record["first_mismatch"] = first_mismatch(session.target, ids, base.tokens, spec.tokens)
    return record, base.tokens


def _decode_all(session: Session) -> list[dict]:
    """Every prompt turn by turn; a later turn sees the plain decode's answer to the earlier one."""
    from tqdm.auto import tqdm

    seeder = torch.Generator().manual_seed(session.cfg.seed)  # one seed per decoder and turn
    records = []
    bar = tqdm(total=sum(len(p.turns) for p in session.prompts), desc="eval", unit="turn")
    for prompt in session.prompts:
        answers: list[str] = []
        for turn in range(len(prompt.turns)):
            ids = render(session.tokenizer, prompt, answers, turn)
            seeds = {name: int(torch.randint(2**31, (), generator=seeder)) for name in session.decoders()}
            record, answer = _decode_turn(session, prompt, turn, ids, seeds)
            records.append(record)
            answers.append(session.tokenizer.decode(answer, skip_special_tokens=True))
            bar.update(1)
            bar.set_postfix(tau=f"{1 + sum(record['accepted']) / max(len(record['accepted']), 1):.2f}")
    bar.close()
    return records


def _write(session: Session, records: list[dict]) -> dict:
    """Summarise into eval.json (with settings, warnings, every turn, provenance), the plot and the table."""
    from baldeagle.io import atomic_write_json, provenance

    cfg, settings = session.cfg, session.settings
    result = summarise(records, settings.shape[0], cfg.temperature == 0, cfg.prompt_lookup)
    result["settings"] = {
        **to_dict(cfg), "eos_token_ids": list(settings.eos_token_ids), "tree_shape": list(settings.shape),
        "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS if cfg.prompt_lookup else None,
        "draft_type": session.draft.config.draft_type, "draft_vocab_size": session.draft.config.draft_vocab_size,
        "torch_threads": torch.get_num_threads(), "packed_linear_weights": session.packed,
        "single_row_path": session.single_row,
    }
    if session.shape_choice:
        result["shape_choice"] = session.shape_choice
    result["warnings"] = session.warnings
    result["turns"] = records
    result["provenance"] = provenance()
    out = Path(cfg.out)
    atomic_write_json(out / "eval.json", result)
    write_resolved(cfg, out)
    plot_acceptance(result, out / "acceptance.png")
    print(format_table(result), flush=True)
    return result


@torch.inference_mode()
def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate a draft: decode every prompt plainly and speculatively; write eval.json and a plot."""
    session = _load(cfg)
    _warm_up(session)
    if session.acceptance:
        choose_shape(session)
    return _write(session, _decode_all(session))


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    s = result["settings"]
    if result.get("shape_choice"):
        shape = f"{result['shape_choice']['chosen']} (chosen from measured costs)"
    elif s["mode"] == "chain":
        shape = f"chain k={s['tree_shape'][0]}"
    else:
        shape = f"tree depth={s['tree_depth']} topk={s['tree_topk']} tokens={s['tree_total_tokens']}"
    lines = [
        f"{result['num_prompts']} prompts, {result['num_turns']} turns, {shape}, temperature {s['temperature']}",
        f"  acceptance length τ      {num(result['acceptance_length'])}",
        "  per-position acceptance  " + " ".join(f"{a:.2f}" for a in result["per_position_acceptance"]),
        f"  tokens/s speculative     {num(result['tokens_per_second'], '{:.1f}')}",
        f"  tokens/s plain           {num(result['baseline_tokens_per_second'], '{:.1f}')}",
        f"  tokens/s prompt lookup   {num(result['prompt_lookup_tokens_per_second'], '{:.1f}')}",
        f"  speedup vs plain         {num(result['speedup'], '{:.2f}x')}",
        f"  speedup vs prompt lookup {num(result['speedup_vs_prompt_lookup'], '{:.2f}x')}",
        f"  speedup per turn         median {num(result['turn_speedup_median'], '{:.2f}x')}, "
        f"IQR {num(result['turn_speedup_q1'], '{:.2f}')}-{num(result['turn_speedup_q3'], '{:.2f}x')}",
        f"  speedup in CPU time      {num(result['cpu_speedup'], '{:.2f}x')}  (CPU s per wall s: "
        + ", ".join(f"{name} {num(busy)}" for name, busy in result["cpu_seconds_per_wall_second"].items()) + ")",
        f"  timing                   median of {result['timing_repeats']} interleaved runs per turn"
        + ("" if result["repeats_identical"] else "; REPEATS DIFFERED"),
        f"  outputs match baseline   {result['outputs_match_baseline']}",
    ]
    if result["mismatched_turns"]:
        lines.append(f"    {result['mismatched_turns']} turn(s) differ; largest top-2 logit gap where they split: "
                     f"{result['max_mismatch_logit_gap']:.3g} (a near-tie means numerics, not a decoding error)")
    for name, row in result["per_category"].items():
        lines.append(f"    {name:<12} τ {row['acceptance_length']:.2f}  speedup {num(row['speedup'], '{:.2f}x')}  "
                     f"({row['turns']} turns)")
    return "\n".join(lines)


def plot_acceptance(result: dict, path: Path) -> None:
    """Acceptance per draft position and τ per category, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rates = result["per_position_acceptance"]
    left.bar(range(1, len(rates) + 1), rates, color="#4477aa")
    left.set(xlabel="draft position", ylabel="steps accepting ≥ position", ylim=(0, 1),
             title=f"τ = {result['acceptance_length']:.2f}")
    names = list(result["per_category"])
    right.bar(names, [result["per_category"][n]["acceptance_length"] for n in names], color="#cc6677")
    right.set(ylabel="acceptance length τ", title="per category")
    right.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
