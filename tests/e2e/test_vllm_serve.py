"""A BaldEagle EAGLE-3 draft served by a real engine: vLLM's CPU build (`.venv-vllm`, made by
benchmarks/setup_vllm_venv.sh) with the packaged SmolLM2 target.

The draft is over-fitted in a minute on the target's own greedy answer to the first MT-bench
question, so a correct export must show high acceptance in vLLM on that prompt (a random draft
accepts nothing, which would hide a wrong aux-layer id, d2t or norm). Speculative greedy output
must equal vLLM's output without speculation, and vLLM's acceptance length must agree with
`baldeagle eval` (chain mode, same k) on the same prompt. Engine runs take ~1-2 minutes each on 2 cores.

Without `.venv-vllm` these tests skip, unless BALDEAGLE_REQUIRE_VLLM=1 (set by .ci/run, which
installs the engine first): then a missing engine is an error, so CI cannot pass by skipping.
"""

import json
import os
import subprocess

import pytest
import torch
from vllm_engine import VLLM_PYTHON, require_vllm

from baldeagle.export import export_draft
from baldeagle.serve import REPO_ROOT, ServeBenchConfig, run_engine, run_serve_bench

pytestmark = pytest.mark.e2e

NEW_TOKENS = 32
K = 3


@pytest.fixture(scope="module", autouse=True)
def vllm_installed():
    """Skip the module without vLLM's CPU build (before any draft is trained), or fail under CI."""
    require_vllm()


@pytest.fixture(scope="module")
def overfit_draft(tmp_path_factory):
    """(BaldEagle draft folder, target path): an EAGLE-3 draft that memorised one greedy answer."""
    from baldeagle.data.prompts import load_prompt_set
    from baldeagle.model.checkpoint import save_draft
    from baldeagle.model.draft_config import draft_config_from_target
    from baldeagle.model.eagle3 import Eagle3Draft
    from baldeagle.model.vocab import build_draft_vocab
    from baldeagle.targets import load_target, load_tokenizer, resolve_model
    from baldeagle.train.ttt import ttt_forward

    torch.manual_seed(0)
    target, tokenizer = load_target("smollm2"), load_tokenizer("smollm2")
    question = load_prompt_set("mtbench", limit=1)[0].turns[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    sequence = target.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)  # [1, P + N]
    with torch.no_grad():
        out = target(sequence, output_hidden_states=True)
    cfg = draft_config_from_target(target.config, "eagle3", draft_vocab_size=1024)
    cfg.target_model = resolve_model("smollm2")
    d2t, _, _ = build_draft_vocab(torch.bincount(sequence[0], minlength=cfg.vocab_size), cfg.draft_vocab_size)
    draft = Eagle3Draft.from_target(target, cfg, d2t=d2t)
    features = torch.cat([out.hidden_states[i] for i in cfg.aux_layer_ids], dim=-1)
    loss_mask = torch.zeros_like(sequence)
    loss_mask[:, prompt.shape[1] - 1:] = 1
    optimizer = torch.optim.AdamW(list(draft.trainable_parameters().values()), lr=3e-3)
    for _ in range(50):
        result = ttt_forward(draft, sequence, features, out.logits, loss_mask, steps=K)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("overfit") / "draft"
    save_draft(draft.eval(), folder)
    return folder, cfg.target_model


@pytest.fixture(scope="module")
def served(overfit_draft, tmp_path_factory):
    """serve-bench on the first MT-bench question: vLLM without and with the (exported) draft."""
    folder, _ = overfit_draft
    out = tmp_path_factory.mktemp("serve") / "bench"
    cfg = ServeBenchConfig(model="smollm2", draft=str(folder), out=str(out), limit=1, max_new_tokens=NEW_TOKENS,
                           num_speculative_tokens=K, max_model_len=1024, kv_cache_gib=1, timeout=900)
    return run_serve_bench(cfg), out


def test_vllm_reads_the_exported_configs(overfit_draft, tmp_path):
    """vLLM's own config classes parse both formats the way BaldEagle means them (no engine start)."""
    from baldeagle.model.checkpoint import load_draft

    folder, target = overfit_draft
    draft = load_draft(folder)
    for fmt in ("vllm", "speculators"):
        export_draft(draft, tmp_path / fmt, fmt, target=target)
    script = f"""
import json
from vllm.transformers_utils.configs.speculators import SpeculatorsConfig
from transformers import AutoConfig
spec = SpeculatorsConfig.from_pretrained({str(tmp_path / 'speculators')!r})
plain = AutoConfig.from_pretrained({str(tmp_path / 'vllm')!r})
print(json.dumps({{
    "spec": [spec.architectures, spec.draft_vocab_size, spec.norm_before_residual, spec.eagle_aux_hidden_state_layer_ids,
             SpeculatorsConfig.extract_vllm_speculative_config(json.load(open({str(tmp_path / 'speculators' / 'config.json')!r})))],
    "plain": [plain.architectures, plain.draft_vocab_size, plain.eagle_aux_hidden_state_layer_ids,
              getattr(plain, "norm_before_residual", None), plain.max_position_embeddings],
}}))
"""
    run = subprocess.run([str(VLLM_PYTHON), "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    parsed = json.loads(run.stdout.strip().splitlines()[-1])
    assert parsed["spec"] == [["Eagle3LlamaForCausalLM"], 1024, False, [2, 15, 27],
                              {"method": "eagle3", "num_speculative_tokens": 3}]
    assert parsed["plain"] == [["LlamaForCausalLMEagle3"], 1024, [2, 15, 27], False, 8192]


def test_serve_bench_vllm_matches_greedy_and_accepts(served):
    result, out = served
    saved = json.loads((out / "eval.json").read_text())
    for key in ("acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
                "speedup", "outputs_match_baseline", "num_prompts", "new_tokens", "settings"):
        assert key in saved
    assert saved["outputs_match_baseline"] is True  # speculative greedy == vLLM's plain greedy
    assert saved["num_prompts"] == 1 and saved["new_tokens"] > 0 and len(saved["per_position_acceptance"]) == K
    print(f"vLLM acceptance length {saved['acceptance_length']:.3f}, per position "
          f"{[round(a, 3) for a in saved['per_position_acceptance']]}, speedup {saved['speedup']:.2f}")
    # A memorised answer: the draft's first guess is nearly always right when the export is right.
    assert saved["per_position_acceptance"][0] > 0.6 and saved["acceptance_length"] > 2.0
    assert (out / "export" / "config.json").is_file()  # the draft was exported for vLLM on the fly


def test_vllm_acceptance_agrees_with_baldeagle_eval(overfit_draft, served, tmp_path, one_thread):
    """The same draft, prompt (first MT-bench question, first turn), greedy, k = 3, 32 new tokens,
    measured by vLLM and by `baldeagle eval --mode chain --num-draft-tokens 3`. Both numbers are
    τ = tokens emitted per target verification step, the bonus token included, i.e.
    1 + accepted draft tokens / verification steps:
    - vLLM: 1 + num_accepted_tokens / num_drafts from its own `vllm:spec_decode_*` counters (one
      draft = one verification of k proposed tokens; the first token comes from the prefill and is
      no draft);
    - BaldEagle: 1 + Σ accepted / steps over its chain verification forwards (the first token also
      comes from the prefill); both count the last step before the answer is cut at 32 tokens.
    """
    from baldeagle.config import EvalConfig
    from baldeagle.decode.evaluate import run_eval

    folder, _ = overfit_draft
    result, _ = served
    cfg = EvalConfig(model="smollm2", draft=str(folder), out=str(tmp_path / "eval"), mode="chain", num_draft_tokens=K,
                     limit=1, first_turn_only=True, max_new_tokens=NEW_TOKENS, prompt_lookup=False)
    ours = run_eval(cfg)
    vllm_tau, our_tau = result["acceptance_length"], ours["acceptance_length"]
    print(f"acceptance length: vLLM {vllm_tau:.3f} ({result['num_drafts']} drafts), BaldEagle eval chain "
          f"{our_tau:.3f} ({ours['verification_steps']} steps); per position vLLM "
          f"{[round(a, 3) for a in result['per_position_acceptance']]}, BaldEagle "
          f"{[round(a, 3) for a in ours['per_position_acceptance']]}")
    assert ours["outputs_match_baseline"] is True and ours["new_tokens"] == result["new_tokens"]
    assert result["outputs_match_baseline"] is True and vllm_tau > 1.0
    # The same tokens, the same draft, the same k: the same verification steps and accepted counts.
    assert result["num_drafts"] == ours["verification_steps"]
    assert vllm_tau == pytest.approx(our_tau, abs=1e-9)
    assert result["per_position_acceptance"] == pytest.approx(ours["per_position_acceptance"], abs=1e-9)


def test_bare_vllm_serve_of_speculators_export(overfit_draft, served, tmp_path):
    """`vllm serve DIR` on a speculators export: vLLM finds the target and k in config.json alone."""
    from baldeagle.model.checkpoint import load_draft

    folder, target = overfit_draft
    exported = export_draft(load_draft(folder), tmp_path / "speculators", "speculators", target=target,
                            num_speculative_tokens=K)
    _, bench = served
    baseline = json.loads((bench / "baseline.request.json").read_text())
    result = run_engine(VLLM_PYTHON, {**baseline, "model": str(exported)}, tmp_path, "bare", timeout=900)
    assert result["outputs"] == json.loads((bench / "baseline.result.json").read_text())["outputs"]
    metrics = result["metrics"]
    assert metrics["num_drafts"] > 0 and metrics["num_accepted_tokens"] / metrics["num_drafts"] > 1.0


def test_regenerate_with_the_vllm_backend_equals_transformers(tmp_path):
    """`baldeagle regenerate --backend vllm`, run inside vLLM's venv (BaldEagle from src/), writes the
    same greedy answers, turn by turn, as the Transformers backend in BaldEagle's own venv."""
    from baldeagle.config import RegenerateConfig
    from baldeagle.data.regenerate import read_done, run_regenerate
    from baldeagle.targets import resolve_model

    data = tmp_path / "chats.jsonl"
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "old"},
              {"role": "user", "content": "Name three colours."}],
             [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}]]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    target = resolve_model("smollm2")
    settings = {"model": target, "dataset": str(data), "max_new_tokens": 24}
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    run = subprocess.run([str(VLLM_PYTHON), "-m", "baldeagle.cli", "regenerate", *cli, "--backend=vllm",
                          f"--out={tmp_path / 'vllm.jsonl'}"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")})
    assert run.returncode == 0, run.stderr[-3000:]
    run_regenerate(RegenerateConfig(**settings, out=str(tmp_path / "hf.jsonl")))
    by_vllm = {r["id"]: r["messages"] for r in read_done(tmp_path / "vllm.jsonl")}
    by_hf = {r["id"]: r["messages"] for r in read_done(tmp_path / "hf.jsonl")}
    assert sorted(len(m) for m in by_hf.values()) == [2, 3, 4]
    assert by_vllm == by_hf
