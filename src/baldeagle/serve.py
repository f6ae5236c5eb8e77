"""`baldeagle serve-bench`: a real engine with the draft and without it, on MT-bench, at batch 1, greedy.

The engine runs in a subprocess with the python of its own virtual environment (vLLM's CPU build
lives in `.venv-vllm`, see benchmarks/setup_vllm_venv.sh), through a small runner script that
imports only the standard library and the engine; BaldEagle's environment never imports vllm.
Acceptance comes from the engine's own counters (vLLM's `vllm:spec_decode_*`, the same numbers its
Prometheus /metrics endpoint exports): τ = 1 + accepted / drafts, and per position
accepted_at_position_i / drafts. The result, OUT/eval.json, has the keys `baldeagle eval` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from baldeagle.config import ServeBenchConfig
from baldeagle.errors import BaldEagleError
from baldeagle.io import atomic_dir, atomic_write_json, provenance

RUNNERS = {"vllm": Path(__file__).with_name("vllm_runner.py")}
REPO_ROOT = Path(__file__).resolve().parents[2]


def engine_python(cfg: ServeBenchConfig) -> Path:
    if cfg.python:
        path = Path(cfg.python).expanduser()
    else:
        path = Path(os.environ.get("BALDEAGLE_VLLM_PYTHON") or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not path.is_file():
        raise FileNotFoundError(f"no {cfg.engine} python at {path}: run benchmarks/setup_vllm_venv.sh, or pass --python")
    return path


def run_engine(python: Path, request: dict, workdir: Path, name: str, timeout: float) -> dict:
    """Run the engine runner on `request`; return its result. The engine runs in its own process
    group, which is killed (workers included) whether it succeeds, fails or times out."""
    request_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("request.json", "result.json", "log"))
    request_path.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(request.get("kv_cache_gib", 2)), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(python), str(RUNNERS["vllm"]), str(request_path), str(result_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(process)
    if code != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        why = f"timed out after {timeout:.0f} s" if code is None else f"exited with code {code}"
        raise BaldEagleError(f"the {name} engine run {why}; last lines of {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the runner's whole process group (vLLM's engine core and workers)."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            if process.poll() is None:
                try:
                    process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.5)


def prepare_draft(cfg: ServeBenchConfig, workdir: Path) -> tuple[Path, str, str]:
    """(exported folder, speculative method, format): a BaldEagle draft is exported for the engine first."""
    from baldeagle.export import export_draft
    from baldeagle.targets import target_config_or_none
    from baldeagle.export_check import check_export, describe, read_folder
    from baldeagle.model.checkpoint import load_draft
    from baldeagle.targets import resolve_model

    folder = Path(cfg.draft)
    target_config = target_config_or_none(cfg.model)
    if (folder / "draft_config.json").is_file():
        draft = load_draft(folder)
        folder = export_draft(draft, workdir / "export", "vllm", target=resolve_model(cfg.model),
                              target_config=target_config)
    problems = check_export(folder, target_config)
    if problems:
        raise ValueError(f"{folder} is not servable:\n  " + "\n  ".join(problems))
    config, info, _ = read_folder(folder)
    described = describe(config, info)
    if described["format"] == "sglang" and cfg.engine == "vllm":
        raise ValueError(f"{folder} was exported for SGLang (aux-layer ids one below vLLM's): export with --format vllm")
    return folder.resolve(), "eagle3" if described["kind"] == "eagle3" else "eagle", described["format"]


def summarise(base: dict, spec: dict, k: int) -> dict:
    metrics = spec["metrics"]
    drafts = max(int(metrics.get("num_drafts", 0)), 0)
    accepted = int(metrics.get("num_accepted_tokens", 0))
    per_position = metrics.get("num_accepted_tokens_per_pos", [0] * k)
    new_tokens = sum(len(o) for o in spec["outputs"])
    base_tokens = sum(len(o) for o in base["outputs"])
    tps = new_tokens / max(sum(spec["seconds"]), 1e-9)
    base_tps = base_tokens / max(sum(base["seconds"]), 1e-9)
    mismatches = [i for i, (a, b) in enumerate(zip(base["outputs"], spec["outputs"])) if a != b]
    return {
        "acceptance_length": 1.0 + accepted / drafts if drafts else None,
        "per_position_acceptance": [n / drafts if drafts else 0.0 for n in per_position],
        "tokens_per_second": tps,
        "baseline_tokens_per_second": base_tps,
        "speedup": tps / base_tps if base_tps else None,
        "outputs_match_baseline": not mismatches and len(base["outputs"]) == len(spec["outputs"]),
        "mismatched_turns": mismatches,
        "new_tokens": new_tokens,
        "num_drafts": drafts,
        "num_draft_tokens": int(metrics.get("num_draft_tokens", 0)),
        "num_accepted_tokens": accepted,
    }


def baseline_run(cfg: ServeBenchConfig, python: Path, request: dict, workdir: Path) -> dict:
    """The engine without speculation: run it, or reuse the one in `cfg.baseline` (an earlier serve-bench
    folder) when it answered the very same request; it is the same greedy run, so several drafts for one
    target are compared against one engine start. Its files are copied into `workdir`."""
    plain = {**request, "speculative_config": None}
    if not cfg.baseline:
        return run_engine(python, plain, workdir, "baseline", cfg.timeout)
    folder = Path(cfg.baseline)
    paths = [folder / f"baseline.{ext}" for ext in ("request.json", "result.json")]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no baseline run to reuse: {', '.join(missing)} missing (a serve-bench output folder?)")
    earlier = json.loads(paths[0].read_text())
    wanted = json.loads(json.dumps(plain))  # as it would be written
    differ = sorted(key for key in set(earlier) | set(wanted) if earlier.get(key) != wanted.get(key))
    if differ:
        raise ValueError(f"the baseline in {folder} answered another request (it differs in {', '.join(differ)}): "
                         "run serve-bench without --baseline")
    for path in paths:
        (workdir / path.name).write_text(path.read_text())
    return json.loads(paths[1].read_text())


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    if cfg.engine != "vllm":
        raise ValueError(f"engine {cfg.engine!r} is not supported here: serve-bench runs vllm (SGLang has no CPU "
                         "build; serve an `--format sglang` export with the README's command instead)")
    from baldeagle.data.prompts import conversation, load_prompt_set
    from baldeagle.targets import resolve_model

    python = engine_python(cfg)
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as workdir:
        folder, method, fmt = prepare_draft(cfg, workdir)
        # Read and rendered as `baldeagle eval` does (system message included); the engine writes the answers (None).
        prompts = load_prompt_set(cfg.prompts, cfg.limit, cfg.first_turn_only)
        conversations = [conversation(p, [None] * len(p.turns), len(p.turns) - 1) for p in prompts]
        request = {"model": resolve_model(cfg.model), "conversations": conversations, "max_new_tokens": cfg.max_new_tokens,
                   "dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "kv_cache_gib": cfg.kv_cache_gib,
                   "enforce_eager": cfg.enforce_eager, "seed": 0}
        base = baseline_run(cfg, python, request, workdir)
        speculative_config = {"method": method, "model": str(folder), "num_speculative_tokens": cfg.num_speculative_tokens}
        spec = run_engine(python, {**request, "speculative_config": speculative_config}, workdir, "speculative",
                          cfg.timeout)
        if folder.is_relative_to(workdir.resolve()):  # exported here: name it where it will be
            speculative_config["model"] = str(Path(cfg.out).resolve() / folder.relative_to(workdir.resolve()))
        result = {
            **summarise(base, spec, cfg.num_speculative_tokens),
            "num_prompts": len(conversations),
            "num_turns": len(spec["outputs"]),
            "engine": f"vllm {spec.get('vllm', '')}".strip(),
            "settings": {**dataclasses.asdict(cfg), "speculative_config": speculative_config, "draft_format": fmt,
                         "temperature": 0.0, "batch_size": 1},
            "provenance": provenance(),
        }
        atomic_write_json(workdir / "eval.json", result)
    print(f"serve-bench ({result['engine']}): acceptance length {result['acceptance_length']}, "
          f"speedup {result['speedup']}, outputs match baseline: {result['outputs_match_baseline']}", flush=True)
    return result
