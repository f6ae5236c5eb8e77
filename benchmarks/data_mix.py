"""Which regenerated data buys more MT-bench acceptance for the same budget?

Regenerates with the packaged SmolLM2 for a fixed time (default self-written prompts only; add
`--conversations N` to mix in chitchat as the quickstart does), prepares, trains an EAGLE-3 draft
with a finished quickstart's resolved training config for the same minutes, and scores it with
`baldeagle eval` chain k=3 on MT-bench first turns spread over the 8 categories. Every step is the
stage function the CLI runs; a finished stage is reused.

    .venv/bin/python benchmarks/data_mix.py --quickstart runs/quickstart --out runs/data_mix/self
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, help="a finished quickstart folder (its draft/config.yaml is reused)")
    p.add_argument("--out", required=True)
    p.add_argument("--self-prompts", type=int, default=300)
    p.add_argument("--conversations", type=int, default=0, help="chitchat conversations mixed in (0 = none)")
    p.add_argument("--regenerate-minutes", type=float, default=7.5, help="the quickstart's share at 30 minutes")
    p.add_argument("--train-minutes", type=float, default=None, help="default: the quickstart's max_minutes")
    p.add_argument("--limit", type=int, default=10, help="MT-bench prompts (spread over the categories)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    return p.parse_args()


def main() -> None:
    from baldeagle.config import EvalConfig, PrepareConfig, RegenerateConfig, TrainConfig
    from baldeagle.data.prepare import run_prepare
    from baldeagle.data.regenerate import run_regenerate
    from baldeagle.decode.evaluate import run_eval
    from baldeagle.train.run import run_train

    args = parse_args()
    root, quickstart = Path(args.out), Path(args.quickstart)
    data = root / "regenerated.jsonl"
    if not data.with_name(data.name + ".stats.json").exists():
        run_regenerate(RegenerateConfig(
            model="smollm2", dataset="chitchat" if args.conversations else "", limit=args.conversations, shuffle=True,
            max_turns=2, out=str(data), self_prompts=args.self_prompts, max_new_tokens=192, chunk_size=32,
            max_minutes=args.regenerate_minutes))
    if not (root / "prepared" / "stats.json").exists():
        run_prepare(PrepareConfig(model="smollm2", dataset=str(data), out=str(root / "prepared"), max_length=512,
                                  overwrite=True))
    settings = yaml.safe_load((quickstart / "draft" / "config.yaml").read_text())
    settings.update(data=str(root / "prepared"), out=str(root / "train"), overwrite=True)
    if args.train_minutes is not None:
        settings["max_minutes"] = args.train_minutes
    if not (root / "train" / "final" / "model.safetensors").exists():
        run_train(TrainConfig(**settings))
    out = root / "eval_chain"
    run_eval(EvalConfig(model="smollm2", draft=str(root / "train" / "final"), out=str(out), mode="chain",
                        num_draft_tokens=3, limit=args.limit, first_turn_only=True,
                        max_new_tokens=args.max_new_tokens, prompt_lookup=False))
    saved = json.loads((out / "eval.json").read_text())
    stats = json.loads(data.with_name(data.name + ".stats.json").read_text())
    result = {"rows": stats["rows_total"], "answer_tokens": stats["generated_tokens"],
              "steps": max((r.get("step", 0) for r in json.loads(
                  (root / "train" / "final" / "metrics.json").read_text()).get("log_history", [])), default=0),
              **{k: saved[k] for k in ("acceptance_length", "per_position_acceptance", "speedup",
                                       "outputs_match_baseline")},
              "per_category": {k: round(v["acceptance_length"], 3) for k, v in saved["per_category"].items()}}
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
