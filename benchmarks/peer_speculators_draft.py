"""Peer draft: train a `speculators` 0.9.0 EAGLE-3 draft on a `baldeagle prepare` folder, for a wall-clock budget.

Runs in the isolated venv (benchmarks/setup_speculators_venv.sh), never the project's:

    .venv-speculators/bin/python benchmarks/peer_speculators_draft.py \
        --data runs/quickstart/prepared --out runs/peer-draft --minutes 12 \
        --d2t runs/quickstart/draft/model.safetensors --rows rows.json

`benchmarks/quickstart_vs_speculators.py` calls it with the quickstart's own settings and scores
the result beside BaldEagle's draft. What comes out (under --out):

    speculators/       the draft as speculators' own `save_pretrained` writes it (`vllm serve DIR`
                       serves it; `baldeagle.export_load.load_exported` reads it)
    train.json         settings, versions, steps done in the budget, per-step loss / accuracy,
                       held-out accuracy per TTT step (speculators' own metric)
    reference.safetensors  inputs and the peer's logits at every TTT step on one held-out row,
                       for checking that a converted copy computes the same logits

The draft is speculators' own `Eagle3DraftModel` (its layer, its TTT unroll, its KL loss, its
optimiser and LR schedule by default), with four deliberate choices:

- Architecture flags set to the standard EAGLE-3 layout that BaldEagle's model, SGLang's and
  vLLM's `LlamaForCausalLMEagle3` implement, so that one evaluator can score both drafts with the
  same semantics: `norm_before_residual=False` (the residual is the un-normed fc(g) feature, not
  hidden_norm of it), `norm_before_fc=False` and `fc_norm=False` (fc reads the raw concatenated
  aux states), `norm_output=False` (the un-normed layer output is fed back between steps; logits
  are lm_head(norm(out))), and full attention (no sliding window; speculators' CLI defaults to
  a 2048 window, which never binds at max_length 512 but is not what the evaluator implements).
  speculators' CLI defaults differ (norm_before_residual, norm_before_fc and norm_output on: its
  "Eagle 3.1" variant), which BaldEagle's evaluator cannot represent.
- Aux layers [2, L//2, L-3] in Transformers `hidden_states` indexing (the inputs of those decoder
  layers), which is what vLLM captures for `eagle_aux_hidden_state_layer_ids` and what BaldEagle
  reads: [2, 15, 27] for SmolLM2's 30 layers.
- Attention `sdpa` and the eager loss (flex attention has no CPU backward; the fused loss needs
  Triton); its `Trainer` assumes CUDA, so a plain loop repeats the Trainer's step: forward ->
  zero_grad -> backward -> clip_grad_norm 1.0 -> optimiser step(s) -> scheduler step(s).
- Float32 throughout (no bf16 autocast), as BaldEagle's quickstart trains on CPU.

Hidden states come online from the Transformers target, laid out as speculators' vLLM data path
delivers them: `hidden_states` = hidden_states[i] for the aux ids, concatenated; the
`verifier_last_hidden_states` = the last decoder layer's output before the final norm (the peer
applies the norm and the t2d-restricted LM head itself); each row shifted like its `shift_batch`
(drop x_0 / g_last, positions restart at 1) and the rows of a batch packed into one sequence with
`document_ids`, like its collate function. A batch is --batch-size rows, truncated to
--max-length, one padded target forward per batch.
"""

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch

DEFAULT_TARGET = str(Path.home() / ".cache/baldeagle/smollm2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="`baldeagle prepare` folder (input_ids, loss_mask)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", default=DEFAULT_TARGET, help="Transformers checkpoint folder of the target")
    p.add_argument("--rows", default="", help='JSON {"train": [row ids], "eval": [row ids]}; default: all rows train')
    p.add_argument("--d2t", default="", help="safetensors file holding `d2t` (e.g. BaldEagle's draft): use that "
                   "draft vocabulary; default: the --draft-vocab most frequent trained tokens of the train rows, "
                   "built by speculators' build_vocab_mappings_from_distribution")
    p.add_argument("--minutes", type=float, default=0.0, help="training wall-clock budget (0 = none); the step "
                   "that crosses it is the last, as in BaldEagle's TimeBudget")
    p.add_argument("--save-at", default="", help="comma-separated training minutes at which the draft is also saved "
                   "(OUT/at-Mmin/speculators and OUT/at-Mmin/train.json: steps and target tokens so far); the "
                   "save time is left off the training clock")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the train rows (the LR schedule spans them)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--ttt-step-loss-decay", type=float, default=1.0, help="speculators' default")
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="hidden_states indices (default: speculators' [2, L//2, L-3])")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--max-length", type=int, default=512, help="truncate rows to this many tokens")
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon", help="speculators' default: muon")
    p.add_argument("--scheduler", choices=["linear", "cosine", "none"], default="linear",
                   help="speculators' default: linear, warm-up 1%% of the scheduled steps")
    p.add_argument("--warmup-ratio", type=float, default=None, help="default: speculators' (1%%)")
    p.add_argument("--val-rows", type=int, default=64, help="held-out rows scored after training (0 = none)")
    p.add_argument("--target-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the frozen target's forward (the draft trains in float32 either way)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def load_rows(args):
    """(all rows as (ids, mask) lists, train row ids, eval row ids)."""
    from datasets import load_from_disk

    ds = load_from_disk(args.data)
    missing = {"input_ids", "loss_mask"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{args.data} lacks column(s) {sorted(missing)}: not a `baldeagle prepare` folder")
    rows = [(list(r["input_ids"])[: args.max_length], list(r["loss_mask"])[: args.max_length])
            for r in ds.select_columns(["input_ids", "loss_mask"])]
    if args.rows:
        split = json.loads(Path(args.rows).read_text())
        train, held = [int(i) for i in split["train"]], [int(i) for i in split.get("eval", [])]
    else:
        train, held = list(range(len(rows))), []
    train, held = ([i for i in part if len(rows[i][0]) >= 2] for part in (train, held))  # one shifted token at least
    if not train:
        raise ValueError("no train rows of at least 2 tokens")
    return rows, train, held


def token_frequencies(rows, ids):
    """{token id: count} over the trained (loss_mask == 1) tokens of rows `ids`."""
    counts = {}
    for i in ids:
        for token, m in zip(*rows[i]):
            if m:
                counts[token] = counts.get(token, 0) + 1
    return counts


@torch.no_grad()
def make_batch(target, layer_ids, rows, ids):
    """Rows `ids` -> one packed speculators batch [1, N, ...] (N = sum of row lengths - 1 each).

    One padded target forward (right padding, attention mask), then per row: the aux states
    hidden_states[i] (inputs of layers i) concatenated, the pre-final-norm last state, and the
    shift of speculators' `shift_batch` (x_{t+1} with g_t and y_{t+1}; positions 1..n-1).
    """
    lengths = [len(rows[i][0]) for i in ids]
    width = max(lengths)
    pad = target.config.pad_token_id if target.config.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for b, i in enumerate(ids):
        input_ids[b, : lengths[b]] = torch.tensor(rows[i][0])
        attention[b, : lengths[b]] = 1
    captured = {}  # the input of the final norm = the last decoder layer's output (pre-norm)
    hook = target.model.norm.register_forward_pre_hook(lambda _m, inp: captured.__setitem__("x", inp[0]))
    try:
        out = target.model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    aux = torch.cat([out.hidden_states[i] for i in layer_ids], dim=-1).float()  # [B, S, 3H]
    pre_norm = captured["x"]
    parts = {k: [] for k in ("input_ids", "hidden_states", "verifier_last_hidden_states", "loss_mask",
                             "position_ids", "document_ids")}
    for b, i in enumerate(ids):
        n = lengths[b]
        parts["input_ids"].append(input_ids[b, 1:n])
        parts["hidden_states"].append(aux[b, : n - 1])
        parts["verifier_last_hidden_states"].append(pre_norm[b, 1:n].float())
        parts["loss_mask"].append(torch.tensor(rows[i][1][1:n], dtype=torch.long))
        parts["position_ids"].append(torch.arange(1, n))
        parts["document_ids"].append(torch.full((n - 1,), b, dtype=torch.long))
    return {k: torch.cat(v)[None] for k, v in parts.items()}


# ------------------------------------------------------------------------------------------
# The peer draft
# ------------------------------------------------------------------------------------------

# The standard EAGLE-3 layout (see the module doc); speculators' CLI defaults are in comments.
ARCH_FLAGS = {
    "norm_before_residual": False,  # CLI default True
    "norm_before_fc": False,  # CLI default True for eagle3
    "fc_norm": False,  # CLI default False
    "norm_output": False,  # CLI default True for eagle3
    "sliding_window": None,  # CLI default 2048 on every layer
    "embed_requires_grad": False,  # CLI default False
}


def build_draft(args, d2t, t2d):
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config

    layer_cfg = create_transformer_layer_config(  # `speculators train`'s eagle3 path, one llama layer
        verifier_name_or_path=args.target, num_layers=1, draft_arch="llama", hidden_act="silu",
        sliding_window=ARCH_FLAGS["sliding_window"], full_attention_indices=[0],
    )
    assert layer_cfg.layer_types == ["full_attention"] and not layer_cfg.use_sliding_window
    draft = Eagle3DraftModel.from_training_args(
        verifier_config=layer_cfg, t2d=t2d, d2t=d2t, verifier_name_or_path=args.target,
        target_layer_ids=args.target_layer_ids, draft_attn_impl="sdpa", draft_vocab_size=args.draft_vocab,
        ttt_steps=args.ttt_steps, **{k: v for k, v in ARCH_FLAGS.items() if k != "sliding_window"},
    )
    assert not draft.uses_sliding_window_attn and draft.input_norm is None and draft.fc_norm is None
    return draft


def draft_vocab(args, rows, train):
    """(d2t, t2d, how): BaldEagle's vocabulary from --d2t, or the peer's own from token counts."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.target).vocab_size
    if args.d2t:
        from safetensors.torch import load_file

        d2t = load_file(args.d2t)["d2t"].long()
        if d2t.numel() != args.draft_vocab:
            raise ValueError(f"{args.d2t}: d2t has {d2t.numel()} entries, --draft-vocab is {args.draft_vocab}")
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[torch.arange(d2t.numel()) + d2t] = True
        return d2t, t2d, f"d2t of {args.d2t}"
    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    d2t, t2d = build_vocab_mappings_from_distribution(
        token_freq_dict=token_frequencies(rows, train), draft_vocab_size=args.draft_vocab, target_vocab_size=vocab)
    return d2t, t2d, "speculators build_vocab_mappings_from_distribution over the trained tokens of the train rows"


def optimisers_and_schedulers(args, draft, scheduled_steps):
    """speculators' own build_optimizers / scheduler rule, with its schema defaults but --lr."""
    from speculators.train.config.schema import OptimizerArgs, SchedulerArgs
    from speculators.train.optimizers import build_optimizers
    from speculators.train.trainer import TrainerConfig, _resolve_scheduler_steps
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    o, s = OptimizerArgs(), SchedulerArgs()
    config = TrainerConfig(
        lr=args.lr, num_epochs=max(1, math.ceil(args.epochs)), save_path=args.out, optimizer=args.optimizer,
        weight_decay=o.weight_decay, muon_lr=args.lr, muon_momentum=o.muon_momentum,  # its rule: muon_lr = lr
        muon_weight_decay=o.muon_weight_decay, muon_ns_steps=o.muon_ns_steps, muon_adjust_lr_fn=o.muon_adjust_lr_fn,
        scheduler_type=args.scheduler, scheduler_warmup_ratio=args.warmup_ratio,
        scheduler_total_steps=scheduled_steps, scheduler_num_cosine_cycles=s.scheduler_num_cosine_cycles,
    )
    optimisers = build_optimizers(draft, config)
    schedulers = []
    if args.scheduler != "none":
        warmup, total = _resolve_scheduler_steps(config, scheduled_steps)
        make = get_linear_schedule_with_warmup if args.scheduler == "linear" else (
            lambda opt, **kw: get_cosine_schedule_with_warmup(opt, num_cycles=config.scheduler_num_cosine_cycles, **kw))
        schedulers = [make(opt, num_warmup_steps=warmup, num_training_steps=total) for opt in optimisers]
    described = {"optimizer": args.optimizer, "lr": args.lr, "weight_decay": o.weight_decay,
                 "scheduler": args.scheduler, "scheduled_steps": scheduled_steps}
    if args.optimizer == "muon":
        described.update(muon_lr=args.lr, muon_momentum=o.muon_momentum, muon_weight_decay=o.muon_weight_decay,
                         muon_adjust_lr_fn=o.muon_adjust_lr_fn)
    if schedulers:
        described["warmup_steps"] = warmup
    return optimisers, schedulers, described


def rates(metrics: dict, ttt_steps: int, prefix: str = "full_acc") -> list[float]:
    return [float(metrics[f"{prefix}_{k}_sum"] / metrics[f"{prefix}_{k}_total"].clamp(min=1)) for k in range(ttt_steps)]


@torch.no_grad()
def validate(args, target, draft, layer_ids, rows, held, loss_config):
    """speculators' own metrics on held-out rows: full_acc_k = share of positions whose steps 0..k
    all match the target's argmax (over the draft vocabulary), and the simulated τ from them."""
    draft.eval()
    sums = {}
    for start in range(0, len(held), args.batch_size):
        batch = make_batch(target, layer_ids, rows, held[start: start + args.batch_size])
        _, _, metrics = draft(**batch, ttt_steps=args.ttt_steps, ttt_step_loss_decay=args.ttt_step_loss_decay,
                              loss_config=loss_config)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().double()
    draft.train()
    full = [float(sums[f"full_acc_{k}_sum"] / max(float(sums[f"full_acc_{k}_total"]), 1))
            for k in range(args.ttt_steps)]
    cond = [float(sums[f"cond_acc_{k}_sum"] / max(float(sums[f"cond_acc_{k}_total"]), 1))
            for k in range(args.ttt_steps)]
    return {"rows": len(held), "full_acc": full, "cond_acc": cond, "tau_sim": 1 + sum(full)}


@torch.no_grad()
def reference(args, target, draft, layer_ids, rows, row_id):
    """The peer's logits at every TTT step on one row (eval mode, no loss), with its inputs."""
    captured = []
    hook = draft.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    batch = make_batch(target, layer_ids, rows, [row_id])
    draft.eval()
    draft(hidden_states=batch["hidden_states"], input_ids=batch["input_ids"], document_ids=batch["document_ids"],
          position_ids=batch["position_ids"], ttt_steps=args.ttt_steps)
    hook.remove()
    tensors = {"input_ids": batch["input_ids"][0], "aux_hidden_states": batch["hidden_states"][0],
               "position_ids": batch["position_ids"][0]}
    for k, logits in enumerate(captured):
        tensors[f"logits_{k}"] = logits[0]  # [N, draft_vocab]; row t at step k drafts x_{t+k+2}
    return tensors


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def save_partial(draft, folder: Path, step: int, target_tokens: int, seconds: float) -> float:
    """The draft as it is now, for a learning curve; → seconds spent (kept off the training clock)."""
    t0 = time.monotonic()
    draft.save_pretrained(str(folder / "speculators"))
    (folder / "train.json").write_text(json.dumps({"steps": step, "target_tokens": target_tokens,
                                                   "train_seconds": round(seconds, 1)}) + "\n")
    print(f"saved {folder} at step {step} ({seconds:.0f}s)", flush=True)
    return time.monotonic() - t0


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from importlib.metadata import version

    from safetensors.torch import save_file
    from speculators.losses import resolve_loss_config
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, train, held = load_rows(args)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.target_dtype)).eval()
    num_layers = target.config.num_hidden_layers
    if args.target_layer_ids is None:
        args.target_layer_ids = [2, num_layers // 2, num_layers - 3]
    d2t, t2d, vocab_source = draft_vocab(args, rows, train)
    draft = build_draft(args, d2t, t2d).train()
    layer_ids = list(draft.target_layer_ids)
    loss_config = resolve_loss_config("kl_div", "eager")  # speculators' eagle3 default loss
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    scheduled = math.ceil(steps_per_epoch * args.epochs)
    optimisers, schedulers, optimiser_info = optimisers_and_schedulers(args, draft, scheduled)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    print(f"peer draft: {trainable:,} trainable parameters; {len(train)} train rows, {steps_per_epoch} steps per "
          f"epoch, {scheduled} scheduled; budget {args.minutes} min; optimiser {optimiser_info}", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    log, step, stop_reason = [], 0, ""
    save_marks = sorted(float(m) for m in args.save_at.split(",") if m.strip())
    target_tokens = 0
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    while not stop_reason:
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]  # one epoch
        for first in range(0, len(order), args.batch_size):
            t0, c0 = time.perf_counter(), time.process_time()
            batch = make_batch(target, layer_ids, rows, order[first: first + args.batch_size])
            target_tokens += sum(len(rows[i][0]) for i in order[first: first + args.batch_size])
            _, loss, metrics = draft(**batch, ttt_steps=args.ttt_steps, ttt_step_loss_decay=args.ttt_step_loss_decay,
                                     loss_config=loss_config)
            for opt in optimisers:
                opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            for opt in optimisers:
                opt.step()
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            record = {"step": step, "loss": round(loss.item(), 5),
                      "acc": [round(a, 4) for a in rates(metrics, args.ttt_steps)],
                      "trained_tokens": int(batch["loss_mask"].sum()), "seconds": round(time.perf_counter() - t0, 3),
                      "cpu_seconds": round(time.process_time() - c0, 3)}
            log.append(record)
            if step == 1 or step % args.log_every == 0:
                print(f"step {step}: loss {record['loss']:.4f} acc {record['acc']} {record['seconds']:.2f}s "
                      f"({time.monotonic() - start:.0f}s elapsed)", flush=True)
            while save_marks and time.monotonic() - start > save_marks[0] * 60:
                start += save_partial(draft, out / f"at-{save_marks.pop(0):g}min", step, target_tokens,
                                      time.monotonic() - start)
            if args.minutes and time.monotonic() - start > args.minutes * 60:
                stop_reason = "time budget"
            elif args.max_steps and step >= args.max_steps:
                stop_reason = "max steps"
            elif step >= scheduled:
                stop_reason = "epochs done"
            if stop_reason:
                break
    train_seconds = time.monotonic() - start
    print(f"peer draft: stopped after {step} steps ({stop_reason}), {train_seconds:.0f} s", flush=True)

    val = validate(args, target, draft, layer_ids, rows, held[: args.val_rows], loss_config) \
        if held and args.val_rows else None
    folder = out / "speculators"
    draft.save_pretrained(str(folder))
    check_row = held[0] if held else train[0]
    save_file({k: v.contiguous() for k, v in reference(args, target, draft, layer_ids, rows, check_row).items()},
              str(out / "reference.safetensors"), metadata={"row": str(check_row)})
    config = json.loads((folder / "config.json").read_text())
    result = {
        "peer": "speculators",
        "settings": {k: v for k, v in vars(args).items()},
        "architecture": {**ARCH_FLAGS, "draft_arch": "llama", "num_layers": 1, "attention": "sdpa",
                         "aux_hidden_states_indices": layer_ids,
                         "saved": {k: config.get(k) for k in ("norm_before_residual", "norm_before_fc", "fc_norm",
                                                              "norm_output", "eagle_aux_hidden_state_layer_ids",
                                                              "draft_vocab_size")}},
        "loss": "kl_div (eager), TTT unroll of speculators' Eagle3DraftModel.forward",
        "optimiser": optimiser_info,
        "vocab": vocab_source,
        "rows": {"train": len(train), "held_out": len(held), "reference_row": check_row},
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "stop_reason": stop_reason,
        "train_seconds": round(train_seconds, 1),
        "trained_tokens": sum(r["trained_tokens"] for r in log),
        "target_tokens": target_tokens,
        "trainable_params": trainable,
        # busy cores of this process while training: well below the machine's cores means contention
        "cpu_cores_used": round(sum(r["cpu_seconds"] for r in log) / max(sum(r["seconds"] for r in log), 1e-9), 2),
        "held_out": val,
        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "versions": {p: version(p) for p in ("torch", "transformers", "speculators")},
        "log": log,
        "draft": str(folder),
    }
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"peer draft written to {folder}; held-out {val}", flush=True)


if __name__ == "__main__":
    main()
