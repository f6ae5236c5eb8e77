"""`baldeagle <stage>`: argv → config dataclass → one stage function. No logic of its own.

Each stage's flags are generated from its config dataclass (`max_length` ↔ `--max-length`).
Precedence, lowest first: dataclass defaults, `--config FILE` (YAML), trailing `key=value`
overrides, explicit `--flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import sys

from baldeagle.config import STAGES, ConfigError, expected_type, field_actions, load_config, parse_overrides

# stage → ("module:function", one-line help). Modules are imported only when their stage runs.
RUNNERS: dict[str, tuple[str, str]] = {
    "prepare": ("baldeagle.data.prepare:run_prepare", "tokenise conversations with an assistant-only loss mask"),
    "view": ("baldeagle.data.view:run_view", "show a prepared dataset's loss mask (terminal or HTML)"),
    "regenerate": ("baldeagle.data.regenerate:run_regenerate", "answer conversations' user turns with the target itself (resumable)"),
    "train": ("baldeagle.train.run:run_train", "train an EAGLE-1 or EAGLE-3 draft (online or offline features)"),
    "features": ("baldeagle.data.store:run_features", "store target features for offline training (sharded, resumable)"),
    "eval": ("baldeagle.decode.evaluate:run_eval", "speculative decoding vs plain decoding: acceptance, speedup, exactness"),
    "score": ("baldeagle.decode.score:run_score", "chain acceptance on the target's cached answers, teacher-forced (seconds)"),
    "export": ("baldeagle.export:run_export", "write a draft in the format SGLang / vLLM / speculators load, or --check a folder"),
    "serve-bench": ("baldeagle.serve:run_serve_bench", "serve target + draft in a real engine (vLLM): acceptance, speedup"),
    "quickstart": ("baldeagle.quickstart:run_quickstart", "the whole pipeline on the packaged default model"),
}

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*=")


def _add_field(parser: argparse.ArgumentParser, spec: dataclasses.Field, typed: argparse.Action) -> None:
    """One field as `--name-with-dashes` (and `--name_with_underscores`). Values stay text here:
    `load_config` types them with HfArgumentParser after the YAML file and overrides."""
    help_text = spec.metadata.get("help", "")
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = None
    if spec.metadata.get("positional"):
        parser.add_argument(spec.name, nargs="?", default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        return
    flags = ["--" + spec.name.replace("_", "-")] + (["--" + spec.name] if "_" in spec.name else [])
    # argparse %-formats help strings: a bare % would crash --help
    described = f"{help_text} ({expected_type(typed)}; default: {default!r})".replace("%", "%%")
    if getattr(typed.type, "__name__", "") == "string_to_bool":
        parser.add_argument(*flags, dest=spec.name, action="store_const", const=True, default=argparse.SUPPRESS,
                            help=described)
        parser.add_argument("--no-" + flags[0][2:], dest=spec.name, action="store_const", const=False,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    parser.add_argument(*flags, dest=spec.name, default=argparse.SUPPRESS, metavar=spec.name.upper(),
                        help=described)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baldeagle", description="Train, evaluate and export EAGLE speculative-decoding draft models."
    )
    subparsers = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, (_, help_text) in RUNNERS.items():
        cls = STAGES[stage]
        sub = subparsers.add_parser(stage, help=help_text, description=help_text)
        sub.add_argument("--config", default=None, help="YAML file with this stage's settings")
        typed = field_actions(cls)
        for spec in dataclasses.fields(cls):
            if spec.init:
                _add_field(sub, spec, typed[spec.name])
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="settings overriding --config")
    return parser


def parse_config(argv: list[str]):
    """argv → (stage name, resolved config dataclass)."""
    args = vars(build_parser().parse_args(argv))
    stage = args.pop("stage")
    config_file = args.pop("config")
    overrides = list(args.pop("overrides", []))
    cls = STAGES[stage]
    # A positional field swallows the first `key=value` when the positional itself is omitted.
    for field in dataclasses.fields(cls):
        value = args.get(field.name)
        if field.metadata.get("positional") and isinstance(value, str) and _OVERRIDE.match(value):
            overrides.insert(0, args.pop(field.name))
    cfg = load_config(cls, config_file, ("key=value overrides", parse_overrides(overrides)), ("flags", args))
    return stage, cfg


def run_stage(stage: str, cfg):
    module_name, function_name = RUNNERS[stage][0].split(":")
    return getattr(importlib.import_module(module_name), function_name)(cfg)


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _MessageFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"baldeagle: {level}{record.getMessage()}"


def setup_logging() -> None:
    """BaldEagle's progress messages on stderr, from the main process only (other ranks: warnings)."""
    log = logging.getLogger("baldeagle")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_MessageFormat())
        log.addHandler(handler)
    main_process = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    log.setLevel(logging.INFO if main_process else logging.WARNING)


def leave_process_group() -> None:
    """Under torchrun: wait for every process (the main one saves last), then leave the group. A process
    that exits with the group still up can abort in its communication threads ("terminate called without
    an active exception") and fail the whole launch after the work is done."""
    if "torch" not in sys.modules:  # no stage that could have joined a group ran
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    try:
        stage, cfg = parse_config(argv)
        run_stage(stage, cfg)
        leave_process_group()
    # A user's mistake is one line and exit status 2; anything else (a RuntimeError from torch,
    # a bug) propagates with its traceback.
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"baldeagle: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
