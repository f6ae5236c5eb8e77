"""The yardstick: a draft's chain acceptance on the prompts that matter, in seconds, without decoding.

Chain decoding accepts, at each verification step, the longest prefix of the draft's k tokens that
equals the target's greedy continuation. That continuation does not depend on the draft, so it is
computed once: the target's greedy answer to each prompt, cached on disk and keyed by what it
depends on (target, chat template, prompts, length). As long as the draft's chain is right, its
inputs are the answer's own tokens, so its chain from every answer position is one teacher-forced
k-step rollout (`rollout_predictions`) over the target's features of prompt + answer. Walking
those accepted runs the way `speculative_generate` steps through an answer gives the acceptance
lengths chain decoding measures, step for step (`chain_walk`).

The same walk measures a depth-1 fan (a tree of the draft's w best first guesses, one verification
of w + 1 tokens): a step accepts one token when the answer's next token is among them
(`fan_acceptance_lengths`). On a CPU where verifying a few tokens costs little more than one, a fan
can pay better than a chain whose later guesses are rarely right. And a depth-2 EAGLE-2 tree (the
w best first guesses, each expanded once, the best n - 1 nodes kept): teacher-forced, the only
first guess whose children matter is the answer's own next token, but which nodes the tree keeps
depends on every guess's children, so all w are expanded (`second_step_candidates`, `depth2_accepted`).

Where it can differ from `baldeagle eval` (chain): the target's features come from one forward
over the whole answer instead of the verification forwards (float rounding), and a chain that runs
past a stop token is cut there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from baldeagle.conventions import text_config, torch_dtype
from baldeagle.targets import cache_root

logger = logging.getLogger(__name__)

LOOKAHEAD = 8  # answers run this many tokens past max_new_tokens, so a last chain is checked in full
MAX_CHAIN = LOOKAHEAD
MAX_FAN = 8  # score.json's fan_acceptance_length: τ of a depth-1 fan of 1..MAX_FAN drafted tokens
MAX_TREE_TOPK = 6  # score.json's tree_acceptance_length: depth-2 trees of topk 2..MAX_TREE_TOPK


def depth2_shapes(max_topk: int = MAX_TREE_TOPK) -> list[tuple[int, int]]:
    """(topk, total_tokens) of the depth-2 trees scored: topk first guesses plus 1..topk second guesses
    (root included in total_tokens; topk first guesses alone are the fan of topk)."""
    return [(k, k + 1 + extra) for k in range(2, max_topk + 1) for extra in range(1, k + 1)]


def depth2_accepted(first_ids, first_logp, child_ids, child_logp, nxt1, nxt2, topk: int, total_tokens: int):
    """Tokens a depth-2 EAGLE-2 tree accepts from each row: 0, 1 or 2.

    The tree is `grow_tree`'s with depth 2: the `topk` best first guesses, each with its `topk` best
    children scored by the summed log-probability, and the `total_tokens` - 1 best of all of them kept
    (a stable sort in grow_tree's order: first guesses, then children by parent). Inputs for R rows, as
    `second_step_candidates` gives them (width >= topk): first_ids/first_logp [R, w], child_ids/child_logp
    [R, w, w]; nxt1/nxt2 [R] the answer's next two tokens (-2 where there is none) → [R]."""
    rows = first_ids.shape[0]
    scores = torch.cat([first_logp[:, :topk], (first_logp[:, :topk, None] + child_logp[:, :topk, :topk]).flatten(1)], 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept.scatter_(1, order[:, :total_tokens - 1], True)
    first_hit = (first_ids[:, :topk] == nxt1[:, None]) & kept[:, :topk]  # [R, k], at most one per row
    child_hit = (child_ids[:, :topk, :topk] == nxt2[:, None, None]) & kept[:, topk:].view(rows, topk, topk)
    second = (first_hit[:, :, None] & child_hit).flatten(1).any(1)
    return first_hit.any(1).long() + second.long()


@dataclass
class Answer:
    id: str
    category: str
    prompt: list[int]  # the rendered prompt, generation prompt included
    answer: list[int]  # the target's greedy answer, ending with its stop token where one was reached


# ------------------------------------------------------------------------------------------
# The answer cache
# ------------------------------------------------------------------------------------------


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def target_fingerprint(model_path: str) -> dict:
    """What identifies a target's greedy answers: its config, and its weight files' names and sizes."""
    folder = Path(model_path)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    config.pop("_name_or_path", None)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    return {"config": _sha(config), "weights": _sha(weights), "name": folder.name}


def answers_meta(model_path: str, tokenizer, prompts: list[tuple[str, str, list[int]]], max_new_tokens: int,
                 stop: tuple[int, ...], dtype: str) -> dict:
    """Everything the cached answers depend on; its hash names the cache folder."""
    return {
        "target": target_fingerprint(model_path),
        "chat_template": _sha(tokenizer.chat_template or ""),
        "prompts": _sha([p[2] for p in prompts]),
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "lookahead": LOOKAHEAD,
        "stop_token_ids": list(stop),
        "dtype": dtype,
    }


def read_answers(folder: Path, meta: dict) -> list[Answer] | None:
    """The cached answers in `folder`, None if there are none; an error if they were made for other inputs."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    found = json.loads(meta_file.read_text())
    differs = sorted(key for key in meta if found.get(key) != meta[key])
    if differs:
        what = {"target": "another target", "chat_template": "another chat template",
                "prompts": "other prompts", "max_new_tokens": "another answer length"}
        reasons = ", ".join(what.get(key, f"another {key}") for key in differs)
        raise ValueError(f"answer cache {folder} was made for {reasons} ({', '.join(differs)} differ); "
                         "point --answers elsewhere or leave it empty to use the automatic cache")
    lines = (folder / "answers.jsonl").read_text().splitlines()
    return [Answer(**json.loads(line)) for line in lines if line.strip()]


def write_answers(folder: Path, meta: dict, answers: list[Answer]) -> None:
    from baldeagle.io import atomic_dir

    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "answers.jsonl").write_text("".join(json.dumps(asdict(a)) + "\n" for a in answers))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def default_answers_folder(meta: dict) -> Path:
    return cache_root() / "answers" / _sha(meta)[:16]


# ------------------------------------------------------------------------------------------
# Scoring: rollouts, accepted runs, the chain walk
# ------------------------------------------------------------------------------------------


def accepted_runs(guesses: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """guesses [K, T] (step k at row t guesses x_{t+2+k}; -1 = not rolled out), tokens [T] →
    [T]: how many leading guesses of row t's chain are right."""
    steps, length = guesses.shape
    shifted = torch.full((steps, length), -2, dtype=tokens.dtype)  # -2 matches no guess
    for k in range(steps):
        shifted[k, : max(length - 2 - k, 0)] = tokens[2 + k:]
    right = (guesses == shifted).long()
    return right.cumprod(dim=0).sum(dim=0)


def chain_walk(runs: list[int], prompt_length: int, answer: list[int], max_new_tokens: int,
               stop: set[int]) -> list[int]:
    """The accepted-token counts of the verification steps chain decoding makes through `answer`.

    The prefill emits answer[0]; a step whose chain starts at row r (the row reading the last
    emitted token) accepts runs[r] tokens and emits them plus the target's own next token, so the
    next chain starts runs[r] + 1 rows later; decoding ends at a stop token or max_new_tokens.
    """
    emitted, steps, row = 1, [], prompt_length - 1
    if not answer or answer[0] in stop or max_new_tokens <= 1:
        return steps
    while True:
        accepted = runs[row]
        steps.append(accepted)
        first = row + 2 - prompt_length  # answer index of the first token this step emits
        new = answer[first:first + accepted + 1]
        if len(new) < accepted + 1:  # ran past the end of a cached answer cut at a stop token
            return steps
        for token in new:
            emitted += 1
            if token in stop or emitted >= max_new_tokens:
                return steps
        row += accepted + 1


class Yardstick:
    """Cached answers and the target's features for them: scores any draft of one target in seconds."""

    def __init__(self, answers: list[Answer], features: list[torch.Tensor], max_new_tokens: int,
                 stop: tuple[int, ...]):
        self.answers, self.features = answers, features  # features[i]: [T_i, F], prompt + answer
        self.max_new_tokens, self.stop = max_new_tokens, set(stop)

    def _batches(self, draft, batch_size: int):
        """Answers in padded batches: (sequences, ids [B, T], features, rows a step starts on, mask)."""
        param = next(draft.parameters())
        for start in range(0, len(self.answers), batch_size):
            batch = range(start, min(start + batch_size, len(self.answers)))
            seqs = [torch.tensor(self.answers[i].prompt + self.answers[i].answer) for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            feats = torch.zeros(len(seqs), width, self.features[batch[0]].shape[-1], dtype=param.dtype)
            mask, rows = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
            for j, (i, seq) in enumerate(zip(batch, seqs)):
                ids[j, :len(seq)], mask[j, :len(seq)] = seq, True
                feats[j, :len(seq)] = self.features[i]
                rows[j, len(self.answers[i].prompt) - 1:len(seq) - 1] = True  # the rows a step starts on
            yield seqs, ids.to(param.device), feats.to(param.device), rows.to(param.device), mask.to(param.device)

    @torch.no_grad()
    def runs(self, draft, k: int, batch_size: int = 8) -> list[list[int]]:
        """Per answer, the accepted run of the draft's k-token chain at every row."""
        from baldeagle.train.ttt import rollout_predictions

        out = []
        for seqs, ids, feats, rows, mask in self._batches(draft, batch_size):
            guesses = rollout_predictions(draft, ids, feats, k, rows, mask).cpu()
            out += [accepted_runs(guesses[j, :, :len(seq)], seq).tolist() for j, seq in enumerate(seqs)]
        return out

    @torch.no_grad()
    def fan_ranks(self, draft, width: int, batch_size: int = 8) -> list[list[int]]:
        """Per answer and row, where the next answer token stands among the draft's `width` best first
        guesses (0 = its top choice; -1 = not among them): a fan of w accepts one token iff 0 <= rank < w."""
        from baldeagle.train.ttt import first_step_candidates

        out = []
        for seqs, ids, feats, rows, mask in self._batches(draft, batch_size):
            candidates = first_step_candidates(draft, ids, feats, width, rows, mask).cpu()  # [B, w, T]
            for j, seq in enumerate(seqs):
                nxt = torch.full((len(seq),), -2, dtype=seq.dtype)  # -2 matches no candidate
                nxt[:max(len(seq) - 2, 0)] = seq[2:]
                hit = candidates[j, :, :len(seq)] == nxt  # [w, T]: at most one hit per row
                out.append(torch.where(hit.any(0), hit.long().argmax(0), -1).tolist())
        return out

    @torch.no_grad()
    def depth2_runs(self, draft, shapes: list[tuple[int, int]], batch_size: int = 8) -> dict[tuple, list[list[int]]]:
        """Per (topk, total_tokens) shape, per answer and row: the tokens a depth-2 tree accepts there."""
        from baldeagle.train.ttt import second_step_candidates

        width = max(k for k, _ in shapes)
        out = {shape: [] for shape in shapes}
        for seqs, ids, feats, rows, mask in self._batches(draft, batch_size):
            tree = [t.cpu() for t in second_step_candidates(draft, ids, feats, width, rows, mask)]
            for j, seq in enumerate(seqs):
                nxt = torch.full((len(seq) + 1,), -2, dtype=seq.dtype)  # -2 matches no candidate
                nxt[:max(len(seq) - 2, 0)] = seq[2:]
                parts = [t[j, :len(seq)] for t in tree]
                for shape in shapes:
                    out[shape].append(depth2_accepted(*parts, nxt[:len(seq)], nxt[1:len(seq) + 1], *shape).tolist())
        return out

    def depth2_acceptance_lengths(self, draft, shapes: list[tuple[int, int]], batch_size: int = 8) -> list[dict]:
        """τ of decoding with each depth-2 tree (topk, total_tokens) of `shapes`."""
        runs = self.depth2_runs(draft, shapes, batch_size)
        result = []
        for (topk, total), per_answer in runs.items():
            steps = [s for item, accepted in zip(self.answers, per_answer)
                     for s in chain_walk(accepted, len(item.prompt), item.answer, self.max_new_tokens, self.stop)]
            result.append({"depth": 2, "topk": topk, "total_tokens": total, "tau": _tau(steps)})
        return result

    def fan_acceptance_lengths(self, draft, max_width: int, batch_size: int = 8) -> list[float]:
        """τ of decoding with a depth-1 fan of w drafted tokens, for w = 1..max_width (w = 1 is chain k = 1)."""
        ranks = self.fan_ranks(draft, max_width, batch_size)
        taus = []
        for width in range(1, max_width + 1):
            steps = [s for item, rank in zip(self.answers, ranks)
                     for s in chain_walk([int(0 <= r < width) for r in rank], len(item.prompt), item.answer,
                                         self.max_new_tokens, self.stop)]
            taus.append(_tau(steps))
        return taus

    def score(self, draft, k: int = 3, batch_size: int = 8) -> dict:
        """Chain acceptance of `draft` with k drafted tokens: the keys of eval.json's acceptance part."""
        if not 1 <= k <= MAX_CHAIN:
            raise ValueError(f"the yardstick's chain length k must be in 1..{MAX_CHAIN}, got {k}")
        records = []
        for item, runs in zip(self.answers, self.runs(draft, k, batch_size)):
            start, stop = len(item.prompt) - 1, len(item.prompt) - 1 + min(self.max_new_tokens, len(item.answer)) - 1
            records.append({"category": item.category,
                            "steps": chain_walk(runs, len(item.prompt), item.answer, self.max_new_tokens, self.stop),
                            "every_row": runs[start:max(stop, start)]})
        result = summarise_runs(records, k)
        result["fan_acceptance_length"] = self.fan_acceptance_lengths(draft, MAX_FAN, batch_size)
        result["tree_acceptance_length"] = self.depth2_acceptance_lengths(draft, depth2_shapes(), batch_size)
        return result


def _tau(steps: list[int]) -> float:
    return 1 + sum(steps) / len(steps) if steps else 1.0


def summarise_runs(records: list[dict], k: int) -> dict:
    steps = [s for r in records for s in r["steps"]]
    every = [s for r in records for s in r["every_row"]]
    categories = {}
    for name in sorted({r["category"] for r in records}):
        mine = [s for r in records if r["category"] == name for s in r["steps"]]
        categories[name] = {"acceptance_length": _tau(mine), "verification_steps": len(mine),
                            "prompts": sum(r["category"] == name for r in records)}
    return {
        "acceptance_length": _tau(steps),
        "per_position_acceptance": [sum(s > i for s in steps) / max(len(steps), 1) for i in range(k)],
        "acceptance_length_every_position": _tau(every),
        "verification_steps": len(steps),
        "num_prompts": len(records),
        "per_category": categories,
        "num_draft_tokens": k,
    }


def metrics_for_log(result: dict, prefix: str) -> dict[str, float]:
    """A score as flat log metrics: `{prefix}_tau`, `{prefix}_tau_<category>`, `{prefix}_acc_pos<i>`,
    `{prefix}_fan_tau_w<w>`."""
    logs = {f"{prefix}_tau": result["acceptance_length"],
            f"{prefix}_tau_every_position": result["acceptance_length_every_position"]}
    for i, rate in enumerate(result["per_position_acceptance"]):
        logs[f"{prefix}_acc_pos{i + 1}"] = rate
    for name, row in result["per_category"].items():
        logs[f"{prefix}_tau_{name}"] = row["acceptance_length"]
    for width, tau in enumerate(result.get("fan_acceptance_length", []), 1):
        logs[f"{prefix}_fan_tau_w{width}"] = tau
    return logs


# ------------------------------------------------------------------------------------------
# Building it: prompts → cached answers → the target's features
# ------------------------------------------------------------------------------------------


def render_prompts(tokenizer, name: str, limit: int, context: int, max_new_tokens: int):
    """First turns of a prompt set, rendered with the chat template → [(id, category, ids)], skipped."""
    from baldeagle.data.prompts import load_prompt_set
    from baldeagle.decode.evaluate import render

    if not tokenizer.chat_template:
        raise ValueError("the target's tokenizer has no chat template to render prompts with")
    rendered, skipped = [], 0
    for prompt in load_prompt_set(name, limit, first_turn_only=True):
        ids = render(tokenizer, prompt, [], 0)[0].tolist()
        if context and len(ids) + max_new_tokens + LOOKAHEAD > context:
            skipped += 1  # prompt and answer do not fit the target's context
            continue
        rendered.append((prompt.id, prompt.category, ids))
    if not rendered:
        raise ValueError(f"no usable prompt in {name!r}: all {skipped} are too long for a {context}-token "
                         f"context with {max_new_tokens} new tokens")
    return rendered, skipped


def generate_answers(generator, prompts, max_new_tokens: int) -> list[Answer]:
    """The target's greedy answers (batched), max_new_tokens + LOOKAHEAD long, stop token kept."""
    from baldeagle.data.generation import Sampling

    done = generator([ids for _, _, ids in prompts], Sampling(max_new_tokens + LOOKAHEAD))
    return [Answer(ident, category, ids, c.tokens + ([c.stop_token] if c.finished else []))
            for (ident, category, ids), c in zip(prompts, done)]


@torch.no_grad()
def answer_features(target, answers: list[Answer], draft_type: str, aux_layer_ids: list[int]) -> list[torch.Tensor]:
    """The draft's input features over prompt + answer, one target forward per answer → [T, F] each."""
    from baldeagle.data.features import OnlineFeatures

    online = OnlineFeatures(target, draft_type, aux_layer_ids)
    device = next(target.parameters()).device
    features = []
    for item in answers:
        ids = torch.tensor([item.prompt + item.answer], device=device)
        features.append(online({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).features[0].cpu())
    return features


@dataclass
class YardstickSettings:
    prompts: str = "mtbench"
    limit: int = 0
    max_new_tokens: int = 256
    answers: str = ""  # answer cache folder; empty = the automatic one under the BaldEagle cache
    dtype: str = "float32"  # the answers are the target's greedy output in this dtype
    batch_size: int = 16  # generation batch (length-sorted, left-padded)


def build_yardstick(model: str, draft_config, settings: YardstickSettings, target=None,
                    trust_remote_code: bool = False) -> Yardstick:
    """The yardstick for `model` and drafts shaped like `draft_config`: cached answers (generated on a
    miss), then the target's features for them. `target`, if given, computes the features."""
    from transformers import AutoConfig

    from baldeagle.data.generation import HFGenerator
    from baldeagle.targets import load_target, load_tokenizer, resolve_model, target_stop_ids

    path = resolve_model(model)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    text = text_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    context = int(getattr(text, "max_position_embeddings", 0) or 0)
    prompts, skipped = render_prompts(tokenizer, settings.prompts, settings.limit, context, settings.max_new_tokens)
    stop = target_stop_ids(path, tokenizer)
    meta = answers_meta(path, tokenizer, prompts, settings.max_new_tokens, stop, settings.dtype)
    folder = Path(settings.answers) if settings.answers else default_answers_folder(meta)
    answers = read_answers(folder, meta)  # a cache made for other inputs fails here, before any work
    if answers is None:
        logger.info("the target answers %d prompts once (cached in %s)", len(prompts), folder)
        generator = HFGenerator(model, settings.dtype, settings.batch_size, trust_remote_code)
        answers = generate_answers(generator, prompts, settings.max_new_tokens)
        write_answers(folder, meta, answers)
        target = target if target is not None else generator.model
    if target is None:
        target = load_target(model, torch_dtype(settings.dtype), trust_remote_code)
    features = answer_features(target, answers, draft_config.draft_type, list(draft_config.aux_layer_ids))
    stick = Yardstick(answers, features, settings.max_new_tokens, stop)
    stick.skipped_prompts, stick.folder = skipped, folder
    return stick
