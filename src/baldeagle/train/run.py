"""`baldeagle train`: TrainConfig → target, prepared data, draft → EagleTrainer → a draft folder.

Output layout: `out/checkpoint-N/` (Trainer checkpoints: draft weights, optimiser, scheduler, RNG,
data position), `out/eval_before_training.json` (the untrained draft's held-out metrics, for
--resume) and `out/final/` (the trained draft, its metrics and resolved config), all written
atomically: a killed run leaves only hidden `.*.partial` folders, which the next run removes.
Every check that can fail runs before the first step.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from transformers import set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from baldeagle.config import ConfigError, TrainConfig, write_resolved
from baldeagle.conventions import check_full_attention, num_layers, pad_token_id, text_config, torch_dtype
from baldeagle.data.features import CachedFeatures, OnlineFeatures
from baldeagle.data.prepare import load_prepared
from baldeagle.io import (atomic_dir, atomic_write_json, check_safetensors, check_torch_file, provenance, read_json,
                         remove_stale_partials)
from baldeagle.model.checkpoint import WEIGHTS_NAME, load_draft, save_draft
from baldeagle.model.draft_config import CONFIG_NAME, NORM_OPTIONS, check_norm_options, draft_config_from_target
from baldeagle.model.vocab import build_draft_vocab, count_trained_tokens
from baldeagle.targets import load_target, stop_token_ids, target_config_or_none
from baldeagle.train.collate import PadCollator, add_length_column
from baldeagle.train.objective import DraftObjective
from baldeagle.train.ttt import LOSSES
from baldeagle.train.schedule import DECAYS
from baldeagle.train.trainer import EagleTrainer, EvaluateEvery, TimeBudget

CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE_NAME)  # the Trainer writes its state last
BEFORE_NAME = "eval_before_training.json"  # the untrained draft's held-out metrics, kept for --resume
logger = logging.getLogger(__name__)


def check_settings(cfg: TrainConfig) -> None:
    if cfg.draft_type not in ("eagle1", "eagle3"):
        raise ConfigError(f"draft_type must be eagle1 or eagle3, got {cfg.draft_type!r}")
    if cfg.mode not in ("online", "offline"):
        raise ConfigError(f"mode must be online or offline, got {cfg.mode!r}")
    if cfg.loss not in LOSSES:
        raise ConfigError(f"loss must be {' or '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.loss != "kl" and cfg.draft_type != "eagle3":
        raise ConfigError(f"loss={cfg.loss} is an EAGLE-3 loss: draft_type={cfg.draft_type} trains with its own "
                          "(SmoothL1 + 0.1 · soft cross-entropy); use loss=kl or draft_type=eagle3")
    if cfg.label_temperature <= 0:
        raise ConfigError(f"label_temperature must be > 0, got {cfg.label_temperature}")
    if cfg.label_temperature != 1.0 and cfg.draft_type != "eagle3":
        raise ConfigError(f"label_temperature is for EAGLE-3 drafts: draft_type={cfg.draft_type} trains with its own "
                          "loss on the target's distribution as it is")
    if cfg.feature_dropout and cfg.draft_type != "eagle3":
        raise ConfigError(f"feature_dropout is for EAGLE-3 drafts: draft_type={cfg.draft_type} regularises with "
                          "feature_noise (EAGLE-1's uniform noise on its input features)")
    if not 0.0 <= cfg.feature_dropout < 1.0:
        raise ConfigError(f"feature_dropout must be in [0, 1), got {cfg.feature_dropout}")
    if cfg.init_from_target_layer < -1:
        raise ConfigError(f"init_from_target_layer must be a target decoder layer index (0..L-1) or -1 (off), "
                          f"got {cfg.init_from_target_layer}")
    try:
        check_norm_options(cfg.draft_type, norm_options(cfg))  # EAGLE 3.1 options: EAGLE-3 only
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.mode == "offline" and cfg.feature_cache_gb > 0:
        raise ConfigError("feature_cache_gb is for mode=online: offline training already reads its features "
                          "from the store instead of running the target")
    if cfg.mode == "offline" and not cfg.features:
        raise ConfigError("mode=offline needs features=DIR (a store written by baldeagle features)")
    torch_dtype(cfg.target_dtype)  # a ConfigError for an unknown name
    if cfg.lr_over_minutes:
        kind = getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type)
        if cfg.max_minutes <= 0:
            raise ConfigError("lr_over_minutes lays the lr schedule over the time budget: set max_minutes > 0")
        if kind not in DECAYS:
            raise ConfigError(f"lr_over_minutes decays with lr_scheduler_type {' or '.join(DECAYS)}, "
                              f"got {kind!r}")
    if not 0 < cfg.ttt_step_weight <= 1:
        raise ConfigError(f"ttt_step_weight must be in (0, 1], got {cfg.ttt_step_weight}")
    if cfg.ttt_steps < 1:
        raise ConfigError(f"ttt_steps must be at least 1, got {cfg.ttt_steps}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_prompts:
        from baldeagle.decode.yardstick import MAX_CHAIN

        if not 1 <= cfg.eval_chain_k <= MAX_CHAIN:
            raise ConfigError(f"eval_chain_k must be in 1..{MAX_CHAIN}, got {cfg.eval_chain_k}")
        if cfg.eval_prompts_new_tokens < 2 or cfg.eval_prompts_limit < 0:
            raise ConfigError("eval_prompts_new_tokens must be at least 2 and eval_prompts_limit at least 0")


def check_target_config(cfg: TrainConfig, target_config) -> None:
    """What the target's config alone can refuse: attention the drafts do not implement, a layer to
    initialise from that the target does not have, and an EAGLE-3 draft vocabulary larger than the
    target's (a mistake, not something to cap quietly)."""
    check_full_attention(target_config, f"the target {cfg.model}")
    layers = num_layers(target_config)
    if cfg.init_from_target_layer >= layers:
        raise ConfigError(f"init_from_target_layer={cfg.init_from_target_layer} is not a layer of the target "
                          f"({cfg.model} has {layers} decoder layers: 0..{layers - 1}); -1 = off")
    vocab = int(text_config(target_config).vocab_size)
    if cfg.draft_type == "eagle3" and cfg.draft_vocab_size > vocab:
        raise ConfigError(f"draft_vocab_size={cfg.draft_vocab_size} is above the target's vocabulary of {vocab} "
                          f"tokens ({cfg.model}); use at most {vocab} (the full vocabulary)")


def norm_options(cfg: TrainConfig) -> dict[str, bool]:
    """The draft's EAGLE 3.1 options (`DraftConfig` fields of the same names) as this run asks for them."""
    return {name: bool(getattr(cfg, name)) for name in NORM_OPTIONS}


def resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint to continue from, or None; refuses to mix a new run into an old folder."""
    out = Path(cfg.out)
    for stale in remove_stale_partials(out):
        logger.warning("removed %s, left by a run killed while writing it", stale)
    if cfg.resume:
        last = last_complete_checkpoint(out)
        if last is None:
            raise FileNotFoundError(f"--resume: no checkpoint to continue from in {out} (no complete checkpoint-N)")
        check_checkpoint_files(last)
        return str(last)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or --overwrite")
        shutil.rmtree(out)
    return None


def last_complete_checkpoint(out: Path) -> Path | None:
    """The newest `checkpoint-N` holding every file a resume reads; incomplete ones (written by a
    version that saved in place, then killed) are skipped with a warning."""
    numbered = [(int(p.name.split("-")[1]), p) for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if p.is_dir() and p.name.split("-")[1].isdigit()] if out.is_dir() else []
    for _, path in sorted(numbered, reverse=True):
        missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if not missing:
            return path
        logger.warning("skipping the incomplete checkpoint %s (no %s)", path, ", ".join(missing))
    return None


def check_checkpoint_files(folder: Path) -> None:
    """Before anything loads: a truncated weights, optimiser, scheduler or RNG file is an error naming it."""
    check_safetensors(folder / WEIGHTS_NAME)
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        check_torch_file(path)


def trained_within(dataset, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per row, trained tokens among each row's first `max_length`), computed in Arrow."""
    import pyarrow.compute as pc

    masks = dataset.with_format("arrow")["loss_mask"]
    lengths = pc.list_value_length(masks).to_numpy(zero_copy_only=False).astype(np.int64)
    head = pc.list_slice(masks, 0, max_length)
    values = pc.list_flatten(head).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(head).to_numpy(zero_copy_only=False)
    return lengths, np.bincount(parents, weights=values, minlength=len(lengths)).astype(np.int64)


def trainable_rows(dataset, cfg: TrainConfig, stored_rows: list[int] | None = None):
    """Tag rows with their prepared-data index and keep those in the store (offline). Rows longer
    than max_length are cut to it by the collator; those left with no trained token are dropped.
    Returns (rows, counts) with counts = {rows, rows_truncated, rows_skipped_too_long, max_length}."""
    dataset = dataset.add_column("row_index", np.arange(len(dataset), dtype=np.int64))
    if stored_rows is not None:
        dataset = dataset.select(sorted(stored_rows))
    lengths, trained = trained_within(dataset, cfg.max_length)
    keep = trained > 0
    counts = {"rows": int(keep.sum()), "rows_truncated": int((keep & (lengths > cfg.max_length)).sum()),
              "rows_skipped_too_long": int((~keep).sum()), "max_length": cfg.max_length}
    if not keep.any():
        raise ValueError(f"{cfg.data}: no row has a trained token within its first max_length={cfg.max_length} tokens")
    if counts["rows_truncated"] or counts["rows_skipped_too_long"]:
        logger.warning("max_length=%d: %d row(s) truncated, %d skipped (no trained token within it), %d kept",
                       cfg.max_length, counts["rows_truncated"], counts["rows_skipped_too_long"], counts["rows"])
    if not keep.all():
        dataset = dataset.select(np.flatnonzero(keep))
    return add_length_column(dataset), counts


def split_rows(dataset, cfg: TrainConfig):
    """Hold out eval rows (`eval_fraction` of them)."""
    if cfg.eval_fraction <= 0 or len(dataset) < 2:
        return dataset, None
    parts = dataset.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
    return parts["train"], parts["test"]


def check_target_fits(dataset, stats: dict, target, data: str) -> None:
    vocab = target.get_input_embeddings().weight.shape[0]
    if stats.get("trained_tokens", 1) == 0 or not any(any(m) for m in dataset["loss_mask"][:1000]):
        raise ValueError(f"{data} has no trained tokens (loss_mask is all zero); check the chat template")
    top = max(max(ids) for ids in dataset["input_ids"])
    if top >= vocab:
        raise ValueError(f"{data} holds token id {top} but the target's vocabulary has {vocab}: "
                         f"it was prepared with another tokenizer")


def build_draft(cfg: TrainConfig, target, train_rows, checkpoint: str | None):
    """The checkpoint's draft on --resume (as saved: never re-initialised), else a fresh one whose
    decoder layer starts from the target's layer `init_from_target_layer` when that is set."""
    draft_cfg = draft_config_from_target(
        target.config, cfg.draft_type, cfg.draft_vocab_size, cfg.aux_layer_ids or None, **norm_options(cfg)
    )
    if checkpoint:
        draft = load_draft(checkpoint, expected_type=cfg.draft_type, target_config=target.config)
        if draft.config.aux_layer_ids != draft_cfg.aux_layer_ids:
            raise ValueError(f"{checkpoint}: the draft reads aux layers {draft.config.aux_layer_ids}, "
                             f"this run asks for {draft_cfg.aux_layer_ids}")
        for name in NORM_OPTIONS:
            if getattr(draft.config, name) != getattr(draft_cfg, name):
                raise ValueError(f"{checkpoint}: the draft was trained with {name}={getattr(draft.config, name)}, "
                                 f"this run asks for {name}={getattr(draft_cfg, name)}")
        return draft
    d2t = None
    if cfg.draft_type == "eagle3":
        counts = count_trained_tokens(train_rows, draft_cfg.vocab_size)
        d2t, _, _ = build_draft_vocab(counts, draft_cfg.draft_vocab_size)
    from baldeagle.model.checkpoint import DRAFT_CLASSES

    init_layer = cfg.init_from_target_layer if cfg.init_from_target_layer >= 0 else None  # a fresh draft only
    return DRAFT_CLASSES[cfg.draft_type].from_target(target, draft_cfg, d2t=d2t, init_layer=init_layer)


def open_store(cfg: TrainConfig, target):
    """The offline feature store, checked against this target, draft type and max_length."""
    from baldeagle.data.store_reader import FeatureStore

    store = FeatureStore(cfg.features)
    aux = cfg.aux_layer_ids or None
    if aux is None:
        aux = draft_config_from_target(target.config, cfg.draft_type, cfg.draft_vocab_size).aux_layer_ids
    store.validate_for(cfg.draft_type, target.config, aux)
    if cfg.max_length > store.manifest["max_length"]:
        raise ValueError(f"max_length={cfg.max_length} exceeds the store's max_length "
                         f"{store.manifest['max_length']} ({cfg.features})")
    return store


def make_features(cfg: TrainConfig, target, draft, store=None):
    if store is None:
        online = OnlineFeatures(target, cfg.draft_type, draft.config.aux_layer_ids)
        return CachedFeatures(online, int(cfg.feature_cache_gb * 1e9)) if cfg.feature_cache_gb > 0 else online
    from baldeagle.data.store_reader import OfflineFeatures

    # Offline, only the target's LM head is needed during training (logits at trained positions).
    return OfflineFeatures(store, target.get_output_embeddings().weight.detach().clone(), cfg.draft_type)


def make_yardstick(cfg: TrainConfig, target, draft):
    """Chain acceptance on `eval_prompts` (the prompts that matter), scored at every evaluation."""
    if not cfg.eval_prompts:
        return None
    from baldeagle.decode.yardstick import YardstickSettings, build_yardstick

    settings = YardstickSettings(prompts=cfg.eval_prompts, limit=cfg.eval_prompts_limit,
                                 max_new_tokens=cfg.eval_prompts_new_tokens)
    return build_yardstick(cfg.model, draft.config, settings, target=target, trust_remote_code=cfg.trust_remote_code)


def eval_before_training(trainer, cfg: TrainConfig, checkpoint: str | None) -> dict:
    """The untrained draft's held-out numbers (the baseline the final evaluation must beat):
    computed on a fresh run and stored in the output folder, read back on --resume."""
    path = Path(cfg.out) / BEFORE_NAME
    if checkpoint is not None:
        return read_json(path) if path.is_file() else {}
    before = trainer.evaluate()
    if trainer.args.should_save:
        atomic_write_json(path, before)
    return before


def run_train(cfg: TrainConfig) -> dict:
    check_settings(cfg)
    target_config = target_config_or_none(cfg.model)  # the config alone, before any work (None: a hub id offline)
    if target_config is not None:
        check_target_config(cfg, target_config)
    checkpoint = resume_checkpoint(cfg)
    dataset, stats = load_prepared(cfg.data)
    target = load_target(cfg.model, torch_dtype(cfg.target_dtype), cfg.trust_remote_code)
    check_target_config(cfg, target.config)
    check_target_fits(dataset, stats, target, cfg.data)
    pad = pad_token_id(target.config.pad_token_id, stop_token_ids(target.generation_config))
    store = open_store(cfg, target) if cfg.mode == "offline" else None
    dataset, row_counts = trainable_rows(dataset, cfg, store.row_indices if store else None)
    train_rows, eval_rows = split_rows(dataset, cfg)
    set_seed(cfg.seed)  # the draft's initial weights are the same in every process and every run
    draft = build_draft(cfg, target, train_rows, checkpoint)
    if cfg.freeze_lm_head:
        draft.lm_head.requires_grad_(False)  # the target's rows (EAGLE-1's head is a frozen copy already)
    yardstick = make_yardstick(cfg, target, draft)
    features = make_features(cfg, target, draft, store)
    if store is None:
        target.to(cfg.device)
    else:
        del target  # offline: the store replaces the target's forward; free its memory
    budget = TimeBudget(cfg.max_minutes) if cfg.max_minutes > 0 else None
    callbacks = [budget] if budget else []
    if yardstick is not None and eval_rows is None and cfg.eval_steps > 0:
        callbacks.append(EvaluateEvery(cfg.eval_steps))  # no held-out split: the yardstick's own schedule
    trainer = EagleTrainer(
        model=DraftObjective(draft, cfg.ttt_steps, cfg.feature_noise, cfg.ttt_step_weight, cfg.loss,
                             cfg.feature_dropout, cfg.label_temperature),
        args=cfg,  # TrainConfig is a TrainingArguments
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=PadCollator(pad_token_id=int(pad), max_length=cfg.max_length),
        features=features,
        yardstick=yardstick,
        yardstick_k=cfg.eval_chain_k,
        callbacks=callbacks or None,
        time_budget=budget,
    )
    if budget:
        budget.clock = trainer.training_clock  # evaluations do not use up the training budget
    evaluates = eval_rows is not None or yardstick is not None
    before = eval_before_training(trainer, cfg, checkpoint) if evaluates else {}
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate() if evaluates else {}
    if trainer.args.should_save:
        with atomic_dir(Path(cfg.out) / "final", overwrite=True) as tmp:
            save_draft(draft, tmp)
            write_resolved(cfg, tmp)
            atomic_write_json(tmp / "metrics.json", {"eval": metrics, "eval_before_training": before,
                                                    "data": row_counts, "log_history": trainer.state.log_history,
                                                    "provenance": provenance()})
        logger.info("draft written to %s", Path(cfg.out) / "final")
    return metrics
