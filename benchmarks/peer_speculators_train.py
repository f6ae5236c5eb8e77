"""Peer benchmark: training throughput of the `speculators` 0.9.0 EAGLE-3 draft on CPU.

Run with the isolated venv (see benchmarks/setup_speculators_venv.sh), never the project's:

    .venv-speculators/bin/python benchmarks/peer_speculators_train.py \
        --steps 20 --warmup-steps 3 --seq-len 512 --out runs/peer_speculators.json

The draft is built exactly as `speculators train` builds it on its default EAGLE-3 path
(1 llama decoder layer, norm_before_residual / norm_before_fc / norm_output on, sliding
window 2048, KL loss, TTT unroll) but with `draft_attn_impl="sdpa"` and the eager loss, as
flex attention has no CPU backward and the fused loss needs Triton. Its `Trainer` assumes
CUDA, so this script drives the model with a plain loop that repeats the Trainer's step
(forward -> zero_grad -> backward -> clip_grad_norm 1.0 -> AdamW step), the draft in float32
without autocast and without LR scheduler. Hidden states come online from a Transformers target
(in --target-dtype, float32 by default), laid out as its vLLM data path delivers them (see
`target_features`).
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

DEFAULT_TARGET = str(Path.home() / ".cache/baldeagle/smollm2")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET, help="Transformers checkpoint folder")
    p.add_argument("--data", default=None, help="datasets.save_to_disk folder (input_ids, loss_mask)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=1, help="timed windows of --steps each")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="rows packed into one step")
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=[2, 15, 27])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    return p.parse_args()


def chitchat_tokens(tokenizer, needed):
    """Tokenise packaged chitchat conversations (ChatML) until `needed` tokens exist.

    Consecutive messages of one sender form a turn; turns alternate user/assistant.
    The loss mask is 1 on assistant content and its <|im_end|>, 0 elsewhere.
    """
    folder = importlib.util.find_spec("chitchat_dataset").submodule_search_locations[0]
    with open(os.path.join(folder, "dataset.json")) as f:
        convs = json.load(f)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    ids, mask = [], []
    for conv in convs.values():
        turns = [("system", system)] + [
            ("user" if i % 2 == 0 else "assistant", "\n".join(m["text"] for m in group))
            for i, group in enumerate(conv["messages"])
        ]
        for role, text in turns:  # same text as the checkpoint's chat template
            head = tokenizer(f"<|im_start|>{role}\n", add_special_tokens=False).input_ids
            body = tokenizer(f"{text}<|im_end|>\n", add_special_tokens=False).input_ids
            ids += head + body
            mask += [0] * len(head) + [int(role == "assistant")] * len(body)
        if len(ids) >= needed:
            break
    return ids, mask


def load_rows(args, tokenizer, n_rows):
    """Return (input_ids [n_rows, S], loss_mask [n_rows, S]) packed from the data source."""
    S, needed = args.seq_len, n_rows * args.seq_len
    if args.data:
        from datasets import load_from_disk

        ds = load_from_disk(args.data)
        ids, mask = [], []
        for row in ds:
            ids += list(row["input_ids"])
            mask += list(row["loss_mask"])
            if len(ids) >= needed:
                break
    else:
        ids, mask = chitchat_tokens(tokenizer, needed)
    reps = -(-needed // len(ids))  # cycle a small source rather than fail
    ids, mask = (ids * reps)[:needed], (mask * reps)[:needed]
    return torch.tensor(ids).view(n_rows, S), torch.tensor(mask).view(n_rows, S)


def build_draft(args, ids, mask):
    """Build speculators' Eagle3DraftModel via its own training-args constructor."""
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config
    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    # d2t/t2d from token frequencies of the training data (loss-masked tokens, as
    # speculators counts them over its prepared data).
    counted = ids[mask.bool()] if mask.any() else ids.flatten()
    freq = dict(zip(*[t.tolist() for t in torch.unique(counted, return_counts=True)]))
    layer_cfg = create_transformer_layer_config(  # `speculators train` eagle3 defaults
        verifier_name_or_path=args.target, num_layers=1, draft_arch="llama",
        hidden_act="silu", sliding_window=2048, full_attention_indices=[],
    )
    d2t, t2d = build_vocab_mappings_from_distribution(
        token_freq_dict=freq, draft_vocab_size=args.draft_vocab,
        target_vocab_size=layer_cfg.vocab_size,
    )
    return Eagle3DraftModel.from_training_args(
        verifier_config=layer_cfg, t2d=t2d, d2t=d2t,
        verifier_name_or_path=args.target, target_layer_ids=args.target_layer_ids,
        draft_attn_impl="sdpa", draft_vocab_size=args.draft_vocab, ttt_steps=args.ttt_steps,
        norm_before_residual=True, norm_before_fc=True, norm_output=True,
    )


@torch.no_grad()
def target_features(target, layer_ids, ids, mask):
    """Online target forward -> one packed speculators batch of shape [1, B*(S-1), ...].

    hidden_states: hidden_states[i] (input of decoder layer i, = vLLM's aux layer i) for
    i in layer_ids, concatenated to 3H; verifier_last_hidden_states: output of the last
    decoder layer before the final norm (speculators applies norm + lm_head itself). Both in
    float32, the draft's dtype, whatever the target's.
    Rows are then shifted as speculators.models.eagle3.data.shift_batch does and packed
    like its collate_fn (document_ids = row index, positions restart per row at 1).
    """
    captured = {}
    hook = target.model.norm.register_forward_pre_hook(
        lambda _m, inp: captured.__setitem__("pre_norm", inp[0]))
    out = target.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hook.remove()
    aux = torch.cat([out.hidden_states[i] for i in layer_ids], dim=-1).float()
    B, S = ids.shape
    flat = lambda t: t.reshape(1, B * (S - 1), *t.shape[2:])  # noqa: E731
    return dict(
        input_ids=flat(ids[:, 1:]),
        hidden_states=flat(aux[:, :-1]),
        verifier_last_hidden_states=flat(captured["pre_norm"][:, 1:].float()),
        loss_mask=flat(mask[:, 1:]),
        position_ids=flat(torch.arange(1, S).expand(B, S - 1)),
        document_ids=flat(torch.arange(B).unsqueeze(1).expand(B, S - 1)),
    )


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from importlib.metadata import version

    from speculators.losses import resolve_loss_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.target_dtype)).eval()
    n_steps = args.warmup_steps + args.repeats * args.steps
    ids, mask = load_rows(args, tokenizer, n_steps * args.batch_size)
    draft = build_draft(args, ids, mask).train()
    loss_config = resolve_loss_config("kl_div", "eager")
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)  # its AdamW default
    print(f"draft trainable params: {sum(p.numel() for p in params):,}", flush=True)

    records = []  # per step: wall s, loss, loss-mask tokens, process CPU s, target-forward s
    load_before = os.getloadavg()
    for step in range(n_steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        t0, c0 = time.perf_counter(), time.process_time()
        batch = target_features(target, args.target_layer_ids, ids[rows], mask[rows])
        t_target = time.perf_counter() - t0
        _draft_tokens, loss, metrics = draft(
            **batch, ttt_steps=args.ttt_steps, ttt_step_loss_decay=1.0,
            loss_config=loss_config,
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_masked = int(batch["loss_mask"].sum())
        acc0 = float(metrics["full_acc_0_sum"] / metrics["full_acc_0_total"].clamp(min=1))
        records.append((dt, loss.item(), n_masked, cpu, t_target))
        tag = "warmup" if step < args.warmup_steps else "timed"
        print(f"step {step:4d} [{tag}] loss {loss.item():.4f} acc0 {acc0:.3f} "
              f"{dt:.3f}s (target {t_target:.3f}s) cpu {cpu / dt:.2f} cores "
              f"masked {n_masked}", flush=True)

    plain = args.batch_size * args.seq_len
    windows = []
    for k in range(args.repeats):
        w = records[args.warmup_steps + k * args.steps:][: args.steps]
        secs = [dt for dt, *_ in w]
        windows.append({
            "median_step_s": statistics.median(secs),
            "mean_step_s": statistics.fmean(secs),
            "steps_per_s": len(secs) / sum(secs),
            "trained_tokens_per_s": sum(r[2] for r in w) / sum(secs),
            "trained_tokens_per_cpu_s": sum(r[2] for r in w) / sum(r[3] for r in w),
            "median_trained_tokens_per_s": statistics.median(r[2] / r[0] for r in w),
            "plain_tokens_per_s": plain * len(secs) / sum(secs),
            "median_plain_tokens_per_s": statistics.median(plain / dt for dt in secs),
            # busy cores seen by this process; well below --threads means CPU contention
            "median_cpu_cores_used": statistics.median(r[3] / r[0] for r in w),
            "median_target_forward_s": statistics.median(r[4] for r in w),
        })
    med = lambda key: statistics.median(w[key] for w in windows)  # noqa: E731
    result = {
        "peer": "speculators",
        "loop": "own loop calling Eagle3DraftModel.forward (its loss) + AdamW, "
                "mirroring speculators Trainer.train_epoch; online target forward timed",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": {p: version(p) for p in ("torch", "transformers", "speculators")},
        "draft": {"attn_impl": "sdpa", "loss": "kl_div (eager)", "num_layers": 1,
                  "trainable_params": sum(p.numel() for p in params)},
        "loss_first": records[0][1], "loss_last": records[-1][1],
        "losses": [round(l, 5) for _, l, *_ in records],
        "windows": windows,
        "median_step_s": med("median_step_s"),
        "steps_per_s": med("steps_per_s"),
        "trained_tokens_per_s": med("trained_tokens_per_s"),
        "trained_tokens_per_cpu_s": med("trained_tokens_per_cpu_s"),
        "plain_tokens_per_s": med("plain_tokens_per_s"),
        "masked_fraction": sum(r[2] for r in records)
        / (len(records) * args.batch_size * (args.seq_len - 1)),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
