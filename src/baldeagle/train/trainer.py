"""`EagleTrainer`: the Transformers `Trainer` with the frozen target in the loop.

Only a few hooks change: `compute_loss` runs the target (online features) and the draft objective
and collects per-step metrics; `log` flushes them (loss_k, acc_k, τ_sim); `evaluate` runs the same
objective on held-out rows; `_save` writes a draft checkpoint (draft_config.json +
model.safetensors) and `_save_checkpoint` makes the Trainer's checkpoint appear whole or not at all;
`_get_num_items_in_batch` counts trained tokens, so each weighs the same across accumulation and
processes; `_get_train_sampler` seeds the length-grouped order, so --resume replays it;
`create_optimizer` chains Muon beside the Trainer's AdamW when `muon` is set; `create_scheduler`
lays the lr schedule over the time budget when `lr_over_minutes` is set. Everything else
(optimiser, scheduler, checkpoints, resume, DDP / FSDP / DeepSpeed through accelerate, reporters)
is the Trainer's own.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from baldeagle.io import publish_dir
from baldeagle.model.checkpoint import load_draft, save_draft
from baldeagle.train.collate import SeededLengthGroupedSampler
from baldeagle.train.losses import tau_sim
from baldeagle.train.optim import ChainedOptimizer, goes_to_muon, make_muon
from baldeagle.train.schedule import minutes_schedule
from baldeagle.train.ttt import scored_positions

logger = logging.getLogger(__name__)


class EagleTrainer(Trainer):
    # compute_loss divides by the trained tokens of the whole optimizer step (`num_items_in_batch`,
    # counted by `_get_num_items_in_batch`): the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, features, yardstick=None, yardstick_k: int = 3, time_budget=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_budget = time_budget  # TimeBudget: ends the run, and paces the lr with lr_over_minutes
        # OnlineFeatures (target in the loop), CachedFeatures (kept after a first pass), OfflineFeatures (a store)
        self.features = features
        # decode.yardstick.Yardstick: chain acceptance on the prompts that matter, at every evaluation
        self.yardstick, self.yardstick_k = yardstick, yardstick_k
        # For learning curves: training time without evaluations, and tokens the target has read.
        self._clock_start, self._eval_seconds, self._target_tokens = None, 0.0, 0
        self.ttt_steps = self.accelerator.unwrap_model(self.model).ttt_steps
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    def training_clock(self) -> float:
        """Seconds on a clock that stands still during evaluations (for time budgets)."""
        return time.monotonic() - self._eval_seconds

    def _get_train_sampler(self, train_dataset=None):
        """The length-grouped sampler with its own seeded order (see SeededLengthGroupedSampler)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        if self.args.train_sampling_strategy != "group_by_length" or column not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch, dataset[column], seed)

    # ---- optimiser: the Trainer's own, or Muon beside it (muon=true) ------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """With `args.muon`: Muon on the draft's hidden matrices (see `goes_to_muon`), the Trainer's
        own optimizer (its `optim`, learning_rate, weight_decay, adam_*) on the rest, chained."""
        if not getattr(self.args, "muon", False) or self.optimizer is not None:
            return super().create_optimizer(model)
        objective = self.accelerator.unwrap_model(self.model)
        named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
        to_muon = {n for n, p in named if goes_to_muon(n.removeprefix("draft."), p)}
        decay = set(self.get_decay_parameter_names(objective))
        rest = [
            {"params": [p for n, p in named if n not in to_muon and n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in to_muon and n not in decay], "weight_decay": 0.0},
        ]
        rest_cls, rest_kwargs = self.get_optimizer_cls_and_kwargs(self.args, objective)
        muon = make_muon([(n, p) for n, p in named if n in to_muon], lr=self.args.learning_rate * self.args.muon_lr_scale,
                         weight_decay=self.args.muon_weight_decay, momentum=self.args.muon_momentum,
                         ns_steps=self.args.muon_ns_steps)
        self.optimizer = ChainedOptimizer([muon, rest_cls([g for g in rest if g["params"]], **rest_kwargs)])
        logger.info("muon: %d matrices with Muon, %d parameters with %s", len(to_muon), len(named) - len(to_muon),
                    rest_cls.__name__)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `args.lr_over_minutes`: the decay runs over the time budget (see train/schedule.py)."""
        if not getattr(self.args, "lr_over_minutes", False) or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        factor = minutes_schedule(kind, self.args.warmup_steps, self.time_budget.fraction)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- loss and metrics ----------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """Trained tokens in an optimizer step's micro-batches, summed over processes (unless
        `average_tokens_across_devices` is off): the denominator of every micro-batch's loss."""
        if not batch_samples:
            return None
        count = sum(scored_positions(b["loss_mask"], b["attention_mask"]).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count.clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = self.features(inputs)
        loss, sums = model(inputs, target, num_items_in_batch)  # DraftObjective.forward, through DDP/FSDP
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.args.world_size  # DDP averages gradients over processes; undo that mean
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.state.global_step} on a batch of rows "
                f"{inputs.get('row_index', torch.tensor([])).tolist()}; the last checkpoint in "
                f"{self.args.output_dir} is the last good one"
            )
        if model.training:
            self._clock_start = self._clock_start or time.monotonic()
            self._target_tokens += int(inputs["attention_mask"].sum())
        bucket = self._sums["train" if model.training else "eval"]
        for key, value in sums.items():
            bucket[key] = bucket[key] + value.detach()
        return (loss, None) if return_outputs else loss

    def _flush(self, split: str) -> dict[str, float]:
        """Summed counts → per-step loss, accuracy and τ_sim, reduced across processes."""
        sums = self._sums[split]
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.args.device) for k in keys])
        stacked = self.accelerator.reduce(stacked, reduction="sum")
        total = dict(zip(keys, stacked.tolist()))
        self._sums[split] = defaultdict(float)
        metrics, accs = {}, []
        for k in range(self.ttt_steps):
            count = total.get(f"count_{k}", 0.0)
            if count == 0:
                break
            metrics[f"loss_{k}"] = total[f"loss_{k}"] / count
            accs.append(total[f"correct_{k}"] / count)
            metrics[f"acc_{k}"] = accs[-1]
        if accs:
            metrics["tau_sim"] = tau_sim(accs)
        if split == "eval" and total.get("items", 0.0) > 0:
            metrics["loss"] = total["loss"] / total["items"]  # per trained token, like the training loss
        prefix = "" if split == "train" else "eval_"
        return {prefix + key: value for key, value in metrics.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the per-step metrics gathered since the last one
            logs.update(self._flush("train"))
        if self._clock_start is not None:
            tokens = torch.tensor(self._target_tokens, dtype=torch.float64, device=self.args.device)
            logs["target_tokens"] = int(self.accelerator.reduce(tokens, reduction="sum").item())
            logs["train_minutes"] = (time.monotonic() - self._clock_start - self._eval_seconds) / 60
        if getattr(self.features, "hits", 0):  # CachedFeatures: rows whose features were reused so far
            logs["feature_rows_reused"] = self.features.hits
            logs["feature_cache_gb"] = round(self.features.bytes / 1e9, 3)
        super().log(logs, start_time)

    # ---- evaluation: the same objective on held-out rows ------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        started = time.monotonic()
        model = self.model
        was_training = model.training
        model.eval()
        metrics = self._held_out_metrics(model, eval_dataset) if (eval_dataset or self.eval_dataset) else {}
        if self.yardstick is not None:
            from baldeagle.decode.yardstick import metrics_for_log

            draft = self.accelerator.unwrap_model(model).draft
            metrics.update(metrics_for_log(self.yardstick.score(draft, self.yardstick_k), "eval_prompts"))
        model.train(was_training)
        self._eval_seconds += time.monotonic() - started if self._clock_start is not None else 0.0
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _held_out_metrics(self, model, eval_dataset) -> dict[str, float]:
        """The training objective on the held-out rows: eval_loss, eval_acc_k, eval_tau_sim."""
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                self.compute_loss(model, self._prepare_inputs(batch))
        metrics = self._flush("eval")  # reduced across processes
        if "eval_loss" not in metrics:
            logger.warning("the held-out rows have no trained tokens: no eval_loss, acc_k or tau_sim to report")
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------
    _staging: str | None = None  # set while `_save_checkpoint` writes its hidden folder

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint (weights, optimiser, scheduler, RNG, state), written whole into
        a hidden `.checkpoint-N.partial/` and renamed into place once every process has written its
        part: a kill leaves no partial `checkpoint-N` (the next run removes the stale folder)."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = staging = os.path.join(run_dir, f".{name}.partial")
        try:
            super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N
        finally:
            self._staging = None
        if (self.state.best_model_checkpoint or "").startswith(staging):  # this step was the best
            self.state.best_model_checkpoint = os.path.join(run_dir, name)
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process's files are in place
        if self.args.should_save:
            publish_dir(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        objective = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:  # keys of the objective module: "draft.fc.weight" → "fc.weight"
            state_dict = {k.removeprefix("draft."): v for k, v in state_dict.items()}
        save_draft(objective.draft, output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        objective = self.accelerator.unwrap_model(model or self.model)
        saved = load_draft(resume_from_checkpoint, expected_type=objective.draft.config.draft_type)
        objective.draft.load_state_dict(saved.state_dict())


class TimeBudget(TrainerCallback):
    """Stops training (with a final save) once `minutes` of training time have passed.

    `clock` tells the time; `EagleTrainer.training_clock` leaves evaluations out, so a run that
    scores itself often trains as long as one that does not.
    """

    def __init__(self, minutes: float, clock=time.monotonic):
        self.seconds, self.clock = minutes * 60, clock
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def fraction(self) -> float:
        """The share of the budget used so far (0 before training starts)."""
        return 0.0 if self.start is None else (self.clock() - self.start) / self.seconds

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


class EvaluateEvery(TrainerCallback):
    """Asks for an evaluation every `steps` optimizer steps. The Trainer's own schedule needs a
    held-out split; this one serves a run scored by the yardstick alone (eval_fraction=0)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            control.should_evaluate = True
        return control
