"""Run prompts through vLLM's offline `LLM` API and print one JSON result. Executed by `baldeagle.serve`
with the python of vLLM's own virtual environment: it imports only the standard library and vllm
(never baldeagle), so BaldEagle's environment never imports vllm.

    python vllm_runner.py REQUEST.json RESULT.json

REQUEST: {"model", "speculative_config" (or null), "max_new_tokens", "dtype", "max_model_len",
          "kv_cache_gib", "enforce_eager", "seed", and either "prompts": [[token ids], ...] or
          "conversations": [[message, ...], ...] (chat messages from `baldeagle.data.prompts.conversation`,
          the ones `baldeagle eval` renders: an optional system message, then user turns; each assistant
          message whose content is null, and the reply to the last user turn, is generated; see `converse`)}
RESULT:  {"outputs": [[new token ids], ...] (one per prompt or turn), "seconds": [...],
          "metrics": {spec-decode counters}, "vllm": version}
Each prompt is generated on its own (batch 1), greedily, and timed; vLLM's own spec-decode counters
(`vllm:spec_decode_*`, the numbers its Prometheus endpoint exports) are read once at the end.
"""

import json
import os
import sys
import time


def spec_decode_metrics(llm) -> dict:
    """vLLM's spec-decode counters: num_drafts, num_draft_tokens, num_accepted_tokens, per-position list."""
    result = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:spec_decode"):
            continue
        key = metric.name.removeprefix("vllm:spec_decode_")
        if hasattr(metric, "values"):  # Vector: the per-position counters
            result[key] = [int(v) for v in metric.values]
        elif hasattr(metric, "value"):
            result[key] = result.get(key, 0) + int(metric.value)
    return result


def converse(messages: list[dict], answer) -> list[dict]:
    """Walk one conversation: `answer(messages so far)` writes each assistant message whose content is
    null and the reply to the last message; returns the whole conversation with the answers."""
    done = []
    for message in [*messages, {"role": "assistant", "content": None}]:
        if message["role"] == "assistant" and message["content"] is None:
            message = {"role": "assistant", "content": answer(list(done))}
        done.append(message)
    return done


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(request.get("kv_cache_gib", 2)))
    from vllm import LLM, SamplingParams
    from vllm import __version__ as vllm_version

    kwargs = {}
    if request.get("speculative_config"):
        kwargs["speculative_config"] = request["speculative_config"]
    llm = LLM(
        model=request["model"],
        dtype=request.get("dtype", "float32"),
        max_model_len=request.get("max_model_len", 4096),
        seed=request.get("seed", 0),
        disable_log_stats=False,  # the spec-decode counters are stats
        enforce_eager=request.get("enforce_eager", False),
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    tokenizer = llm.get_tokenizer()

    def generate(ids):
        start = time.perf_counter()
        result = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)[0]
        return list(result.outputs[0].token_ids), result.outputs[0].text, time.perf_counter() - start

    def render(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return ids["input_ids"] if hasattr(ids, "keys") else ids

    generate(render([{"role": "user", "content": "Hello"}]))  # warm-up, outside the counters below
    before = spec_decode_metrics(llm)
    outputs, seconds = [], []
    for ids in request.get("prompts", []):
        tokens, _, elapsed = generate(ids)
        outputs.append(tokens), seconds.append(elapsed)

    def answer(messages):  # one timed generation per turn
        tokens, text, elapsed = generate(render(messages))
        outputs.append(tokens), seconds.append(elapsed)
        return text
    for messages in request.get("conversations", []):
        converse(messages, answer)
    after = spec_decode_metrics(llm)
    metrics = {}
    for key, value in after.items():
        old = before.get(key, 0 if not isinstance(value, list) else [0] * len(value))
        metrics[key] = [a - b for a, b in zip(value, old)] if isinstance(value, list) else value - old
    with open(result_path, "w") as handle:
        json.dump({"outputs": outputs, "seconds": seconds, "metrics": metrics, "vllm": vllm_version}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
