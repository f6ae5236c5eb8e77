"""Long context: acceptance and exactness past most of the packaged model's 8k context, beside short prompts.

The same MT-bench first turns are asked twice: alone (short), and after a document of packaged
chitchat conversations that brings each rendered prompt to about --context tokens (long: "read
these conversations, then answer"; each question gets its own conversations, so no two long prompts
share a prefix an engine could cache). Both prompt sets go through `baldeagle eval --mode chain`
(`run_eval`: plain and speculative decoding, greedy, outputs compared token for token) and, when
vLLM's CPU build is installed (.venv-vllm, or $BALDEAGLE_VLLM_PYTHON), `baldeagle serve-bench`
(the engine with and without the draft). Prints a markdown table; writes OUT/long_context.json.

    python benchmarks/long_context.py --draft runs/qs-base/draft --out runs/long_context
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from baldeagle.config import EvalConfig, ServeBenchConfig
from baldeagle.data.sources import chitchat_rows, load_mtbench_questions, mtbench_subset
from baldeagle.decode.evaluate import run_eval
from baldeagle.io import provenance
from baldeagle.targets import load_tokenizer

INSTRUCTION = ("Below are transcripts of casual conversations between two people. Read them, then answer "
               "the question that follows them.")


def transcript(number: int, messages: list[dict]) -> str:
    lines = [f"Conversation {number}:"]
    lines += [f"{'A' if m['role'] == 'user' else 'B'}: {m['content']}" for m in messages]
    return "\n".join(lines)


def prompt_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])


def long_prompt(tokenizer, question: str, conversations: list[list[dict]], context: int) -> tuple[str, int]:
    """(the question after as many whole conversations as fit in `context` tokens, conversations used)."""
    budget = context - prompt_tokens(tokenizer, f"{INSTRUCTION}\n\n\n\nQuestion: {question}")
    pieces, used = [], 0
    for used, messages in enumerate(conversations, start=1):
        if budget < 100:
            break
        piece = transcript(len(pieces) + 1, messages)
        cost = len(tokenizer(piece + "\n\n", add_special_tokens=False)["input_ids"])
        if cost <= budget:  # a conversation too long for what is left is passed over
            pieces.append(piece)
            budget -= cost
    text = f"{INSTRUCTION}\n\n" + "\n\n".join(pieces) + f"\n\nQuestion: {question}"
    while prompt_tokens(tokenizer, text) > context:  # token counts of pieces need not add up exactly
        pieces.pop()
        text = f"{INSTRUCTION}\n\n" + "\n\n".join(pieces) + f"\n\nQuestion: {question}"
    return text, used


def write_prompt_sets(tokenizer, out: Path, questions: int, context: int) -> dict[str, Path]:
    """prompts-short.jsonl and prompts-long.jsonl: the same questions, alone and after a long document."""
    chosen = mtbench_subset(load_mtbench_questions(), questions)
    conversations, start = chitchat_rows(), 0
    short, long = [], []
    for q in chosen:
        question = q["turns"][0]
        short.append({"question_id": q["question_id"], "category": q["category"], "turns": [question]})
        text, used = long_prompt(tokenizer, question, conversations[start:], context)
        start += used  # the next question reads other conversations
        long.append({"question_id": q["question_id"], "category": q["category"], "turns": [text]})
    paths = {"short": out / "prompts-short.jsonl", "long": out / "prompts-long.jsonl"}
    for name, rows in (("short", short), ("long", long)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def vllm_python() -> str | None:
    """The vLLM venv's python when `import vllm` works there, else None."""
    repo = Path(__file__).resolve().parents[1]
    python = os.environ.get("BALDEAGLE_VLLM_PYTHON") or str(repo / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        return None
    done = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300)
    return python if done.returncode == 0 else None


def run_length(args, name: str, prompts: Path, python: str | None) -> dict:
    """eval (chain) and, with vLLM, serve-bench on one prompt set; the numbers the table shows."""
    out = Path(args.out)
    start = time.perf_counter()
    ev = run_eval(EvalConfig(model=args.model, draft=args.draft, out=str(out / f"eval-{name}"), prompts=str(prompts),
                             mode="chain", num_draft_tokens=args.k, max_new_tokens=args.max_new_tokens,
                             first_turn_only=True, prompt_lookup=False, timing_repeats=1))
    row = {"prompt_tokens": [t["prompt_tokens"] for t in ev["turns"]], "tau": ev["acceptance_length"],
           "per_position": ev["per_position_acceptance"], "identical": ev["outputs_match_baseline"],
           "tokens_per_second": ev["tokens_per_second"], "baseline_tokens_per_second": ev["baseline_tokens_per_second"],
           "speedup": ev["speedup"], "cpu_speedup": ev["cpu_speedup"], "eval_minutes": (time.perf_counter() - start) / 60}
    if python:
        from baldeagle.serve import run_serve_bench

        start = time.perf_counter()
        sb = run_serve_bench(ServeBenchConfig(
            model=args.model, draft=args.draft, out=str(out / f"serve-{name}"), prompts=str(prompts),
            num_speculative_tokens=args.k, max_new_tokens=args.max_new_tokens, max_model_len=args.max_model_len,
            python=python, overwrite=True))
        row.update(serve_tau=sb["acceptance_length"], serve_identical=sb["outputs_match_baseline"],
                   serve_tokens_per_second=sb["tokens_per_second"], serve_speedup=sb["speedup"],
                   serve_minutes=(time.perf_counter() - start) / 60)
    return row


def table(rows: dict[str, dict], k: int) -> str:
    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    lines = [f"| prompts | prompt tokens (min-max) | eval τ (chain k={k}) | per-position acceptance | outputs = plain "
             "| tok/s spec / plain | speedup (wall, CPU) | vLLM τ | vLLM outputs = plain | vLLM tok/s, speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} | {num(r['tau'])} | "
            + " ".join(f"{a:.2f}" for a in r["per_position"])
            + f" | {r['identical']} | {num(r['tokens_per_second'], '{:.1f}')} / "
            f"{num(r['baseline_tokens_per_second'], '{:.1f}')} | {num(r['speedup'], '{:.2f}x')}, "
            f"{num(r['cpu_speedup'], '{:.2f}x')} | {num(r.get('serve_tau'))} | {r.get('serve_identical', '-')} | "
            f"{num(r.get('serve_tokens_per_second'), '{:.1f}')}, {num(r.get('serve_speedup'), '{:.2f}x')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", default="runs/qs-base/draft", help="a BaldEagle draft folder (train's final/)")
    parser.add_argument("--out", default="runs/long_context")
    parser.add_argument("--questions", type=int, default=3, help="MT-bench first turns (spread over categories)")
    parser.add_argument("--context", type=int, default=7500, help="tokens of each rendered long prompt, at most")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=3, help="chain length (eval) and num_speculative_tokens (vLLM)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="vLLM's context (the model's: 8192)")
    parser.add_argument("--no-serve", action="store_true", help="skip serve-bench even where vLLM is installed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_prompt_sets(load_tokenizer(args.model), out, args.questions, args.context)
    python = None if args.no_serve else vllm_python()
    if python is None and not args.no_serve:
        print("vLLM is not installed (.venv-vllm or $BALDEAGLE_VLLM_PYTHON): eval only", flush=True)
    rows = {name: run_length(args, name, path, python) for name, path in paths.items()}
    result = {"rows": rows, "settings": vars(args), "vllm": bool(python), "provenance": provenance()}
    (out / "long_context.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, args.k), flush=True)


if __name__ == "__main__":
    main()
