"""serve-bench without a real engine: a fake runner stands in for vLLM's, so the harness (results,
failures, timeouts, process clean-up) is tested in seconds. The real engine: tests/e2e/test_vllm_serve.py."""

import json
import os
import sys
import time

import pytest
from test_export import make_draft

from baldeagle import serve
from baldeagle.errors import BaldEagleError
from baldeagle.export import export_draft
from baldeagle.model.checkpoint import save_draft
from baldeagle.serve import ServeBenchConfig, run_engine, run_serve_bench, summarise

FAKE_RUNNER = """
import json, sys
request = json.load(open(sys.argv[1]))
turns = [m for conv in request["conversations"] for m in conv if m["role"] == "user"]  # one answer each
spec = request["speculative_config"]
result = {"outputs": [[5, 6, 7, 8] for _ in turns], "seconds": [0.5 if spec else 1.0 for _ in turns], "vllm": "fake",
          "metrics": {"num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 6,
                      "num_accepted_tokens_per_pos": [3, 2, 1]} if spec else {}}
json.dump(result, open(sys.argv[2], "w"))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is dead
        return handle.read().split()[2] != "Z"


def test_summarise_uses_the_engine_counters():
    base = {"outputs": [[1, 2, 3, 4]], "seconds": [2.0], "metrics": {}}
    spec = {"outputs": [[1, 2, 3, 4]], "seconds": [1.0],
            "metrics": {"num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 3,
                        "num_accepted_tokens_per_pos": [2, 1, 0]}}
    result = summarise(base, spec, 3)
    assert result["acceptance_length"] == 2.5 and result["per_position_acceptance"] == [1.0, 0.5, 0.0]
    assert result["speedup"] == 2.0 and result["outputs_match_baseline"] is True and result["new_tokens"] == 4
    spec["outputs"] = [[1, 2, 9, 9]]
    assert summarise(base, spec, 3)["mismatched_turns"] == [0]


def test_engine_failure_reports_the_log_tail(tmp_path, monkeypatch):
    script = tmp_path / "runner.py"
    script.write_text("import sys\nprint('loading the engine')\nprint('RuntimeError: no CPU backend')\nsys.exit(3)\n")
    monkeypatch.setitem(serve.RUNNERS, "vllm", script)
    with pytest.raises(BaldEagleError, match="exited with code 3(.|\n)*RuntimeError: no CPU backend"):
        run_engine(sys.executable, {}, tmp_path, "speculative", timeout=60)


def test_engine_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    script = tmp_path / "runner.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                      f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(child.pid))\n"
                      "print('engine hangs', flush=True)\ntime.sleep(300)\n")
    monkeypatch.setitem(serve.RUNNERS, "vllm", script)
    start = time.monotonic()
    with pytest.raises(BaldEagleError, match="timed out after 3 s(.|\n)*engine hangs"):
        run_engine(sys.executable, {}, tmp_path, "baseline", timeout=3)
    assert time.monotonic() - start < 30
    assert not alive(int((tmp_path / "child.pid").read_text()))  # the engine's workers are gone too


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    """A saved tiny target, a BaldEagle draft for it, one prompt file, and the fake runner."""
    target, draft = make_draft()
    target.save_pretrained(tmp_path / "target")
    draft.config.target_model = str(tmp_path / "target")
    save_draft(draft, tmp_path / "draft")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"turns": ["Hi", "More"]}) + "\n" +
                                            json.dumps({"turns": ["Bye"]}) + "\n")
    script = tmp_path / "runner.py"
    script.write_text(FAKE_RUNNER)
    monkeypatch.setitem(serve.RUNNERS, "vllm", script)
    return tmp_path, target, draft


def test_serve_bench_writes_eval_keys(tiny_setup):
    tmp_path, _, _ = tiny_setup
    cfg = ServeBenchConfig(model=str(tmp_path / "target"), draft=str(tmp_path / "draft"), out=str(tmp_path / "bench"),
                           prompts=str(tmp_path / "prompts.jsonl"), first_turn_only=False, python=sys.executable)
    result = run_serve_bench(cfg)
    saved = json.loads((tmp_path / "bench" / "eval.json").read_text())
    for key in ("acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
                "speedup", "outputs_match_baseline", "num_prompts", "new_tokens", "settings"):
        assert key in saved
    assert saved["acceptance_length"] == 2.5 and saved["speedup"] == 2.0 and saved["num_turns"] == 3
    assert saved["num_prompts"] == 2 and saved["outputs_match_baseline"] is True
    exported = tmp_path / "bench" / "export"
    assert saved["settings"]["speculative_config"] == {"method": "eagle3", "model": str(exported.resolve()),
                                                       "num_speculative_tokens": 3}
    assert (exported / "config.json").is_file() and result["new_tokens"] == 12
    request = json.loads((tmp_path / "bench" / "speculative.request.json").read_text())
    assert request["conversations"] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "More"}],
        [{"role": "user", "content": "Bye"}]] and request["dtype"] == "float32"


def test_serve_bench_renders_the_conversations_eval_renders(tiny_setup):
    """A JSONL prompt file with a system message: the engine is asked for the very conversations
    `baldeagle eval` renders (system message kept), turn by turn with its own answers."""
    from baldeagle.data.prompts import conversation, load_prompt_set
    from baldeagle.vllm_runner import converse

    tmp_path, _, _ = tiny_setup
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Salut"}, {"role": "user", "content": "More"}]
    (tmp_path / "system.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    run_serve_bench(ServeBenchConfig(model=str(tmp_path / "target"), draft=str(tmp_path / "draft"),
                                     out=str(tmp_path / "bench"), prompts=str(tmp_path / "system.jsonl"),
                                     first_turn_only=False, python=sys.executable))
    (sent,) = json.loads((tmp_path / "bench" / "speculative.request.json").read_text())["conversations"]
    asked = []  # what the runner renders for each turn, given the engine's answers A0, A1
    converse(sent, lambda so_far: asked.append(so_far) or f"A{len(asked) - 1}")
    (prompt,) = load_prompt_set(str(tmp_path / "system.jsonl"))
    assert asked == [conversation(prompt, ["A0"], turn) for turn in (0, 1)]
    assert asked[1][0] == {"role": "system", "content": "Answer in French."}


def test_serve_bench_refusals(tiny_setup):
    tmp_path, target, draft = tiny_setup
    base = dict(model=str(tmp_path / "target"), out=str(tmp_path / "bench"), prompts=str(tmp_path / "prompts.jsonl"),
                python=sys.executable)
    with pytest.raises(ValueError, match="sglang"):
        run_serve_bench(ServeBenchConfig(draft=str(tmp_path / "draft"), engine="sglang", **base))
    with pytest.raises(FileNotFoundError, match="setup_vllm_venv.sh"):
        run_serve_bench(ServeBenchConfig(draft=str(tmp_path / "draft"), **{**base, "python": str(tmp_path / "nope")}))
    export_draft(draft, tmp_path / "for_sglang", "sglang", target_config=target.config)
    with pytest.raises(ValueError, match="exported for SGLang"):
        run_serve_bench(ServeBenchConfig(draft=str(tmp_path / "for_sglang"), **base))
    assert not (tmp_path / "bench").exists()  # nothing half-written


def test_serve_bench_refuses_a_broken_export(tiny_setup):
    tmp_path, target, draft = tiny_setup
    folder = export_draft(draft, tmp_path / "x", "vllm", target_config=target.config)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    with pytest.raises(ValueError, match="not servable(.|\n)*max_position_embeddings is 16"):
        run_serve_bench(ServeBenchConfig(model=str(tmp_path / "target"), draft=str(folder), out=str(tmp_path / "b"),
                                         prompts=str(tmp_path / "prompts.jsonl"), python=sys.executable))


def test_serve_bench_reuses_a_baseline_run_only_for_the_same_request(tiny_setup, monkeypatch):
    """--baseline DIR: the engine without speculation is not started again; a run for other prompts
    or settings is refused, naming what differs."""
    tmp_path, _, _ = tiny_setup
    base = dict(model=str(tmp_path / "target"), draft=str(tmp_path / "draft"), prompts=str(tmp_path / "prompts.jsonl"),
                first_turn_only=False, python=sys.executable)
    first = run_serve_bench(ServeBenchConfig(out=str(tmp_path / "first"), **base))
    started = []
    real_run_engine = serve.run_engine
    monkeypatch.setattr(serve, "run_engine", lambda python, request, workdir, name, timeout: started.append(name) or
                        real_run_engine(python, request, workdir, name, timeout))
    again = run_serve_bench(ServeBenchConfig(out=str(tmp_path / "again"), baseline=str(tmp_path / "first"), **base))
    assert started == ["speculative"]  # the baseline came from the first run
    assert again["outputs_match_baseline"] is True and again["baseline_tokens_per_second"] == first["baseline_tokens_per_second"]
    assert (tmp_path / "again" / "baseline.result.json").read_text() == (tmp_path / "first" / "baseline.result.json").read_text()
    with pytest.raises(ValueError, match="answered another request.*max_new_tokens"):
        run_serve_bench(ServeBenchConfig(out=str(tmp_path / "other"), baseline=str(tmp_path / "first"),
                                         max_new_tokens=7, **base))
    with pytest.raises(FileNotFoundError, match="no baseline run to reuse"):
        run_serve_bench(ServeBenchConfig(out=str(tmp_path / "none"), baseline=str(tmp_path / "draft"), **base))
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()
