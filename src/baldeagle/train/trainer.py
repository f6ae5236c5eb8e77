"""`EagleTrainer`: the Transformers `Trainer` with the frozen target in the loop.

Only a few hooks change: `compute_loss` runs the target (online features) and the draft objective
and collects per-step metrics; `log` flushes them (loss_k, acc_k, τ_sim); `evaluate` runs the same
objective on held-out rows; `_save` writes a draft checkpoint (draft_config.json +
model.safetensors). Everything else (optimiser, scheduler, checkpoints, resume, DDP / FSDP /
DeepSpeed through accelerate, reporters) is the Trainer's own.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback

from baldeagle.model.checkpoint import load_draft, save_draft
from baldeagle.train.losses import tau_sim


class EagleTrainer(Trainer):
    # compute_loss returns a per-micro-batch mean; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, features, yardstick=None, yardstick_k: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.features = features  # OnlineFeatures (target in the loop) or OfflineFeatures (the store)
        # decode.yardstick.Yardstick: chain acceptance on the prompts that matter, at every evaluation
        self.yardstick, self.yardstick_k = yardstick, yardstick_k
        # For learning curves: training time without evaluations, and tokens the target has read.
        self._clock_start, self._eval_seconds, self._target_tokens = None, 0.0, 0
        self.ttt_steps = self.accelerator.unwrap_model(self.model).ttt_steps
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    # ---- loss and metrics ----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = self.features(inputs)
        loss, sums = model(inputs, target)  # DraftObjective.forward, through DDP/FSDP when wrapped
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
        prefix = "" if split == "train" else "eval_"
        return {prefix + key: value for key, value in metrics.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the per-step metrics gathered since the last one
            logs.update(self._flush("train"))
        if self._clock_start is not None:
            tokens = torch.tensor(self._target_tokens, dtype=torch.float64, device=self.args.device)
            logs["target_tokens"] = int(self.accelerator.reduce(tokens, reduction="sum").item())
            logs["train_minutes"] = (time.monotonic() - self._clock_start - self._eval_seconds) / 60
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
        losses = []
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                batch = self._prepare_inputs(batch)
                losses.append(self.compute_loss(model, batch).item())
        metrics = self._flush("eval")
        metrics["eval_loss"] = sum(losses) / max(len(losses), 1) if losses else math.nan
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------
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
    """Stops training (with a final save) once `minutes` of training time have passed."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control
