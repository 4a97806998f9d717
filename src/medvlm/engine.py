"""The one training loop of medvlm: `medvlm train` (the MedVLM strategies), `medvlm pretrain-vision` (contrastive
vision tail), the labeler's fine-tune mode and the CNN-Transformer baseline all step through `Loop.run`.

What a trainer supplies is its step: `step(epoch, in_epoch)` draws the batch for that position of the epoch,
computes the loss and calls backward, and returns what it measured (`StepOut`), or None for a batch with nothing to
learn from (the optimizer is not stepped, the step still counts). The loop owns everything around it, the same for
all four: gradient clipping, optimizer and LR-schedule steps, the step counter and its epoch position (so a resumed
run continues at the same place of the same epoch), the progress bar with loss and samples/s, the log cadence and
the hook where a trainer writes its log rows and checkpoints. One LR schedule (linear warmup then cosine, or a
linear decay) and one atomic checkpoint format (a signature guards what may be resumed) are here too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from medvlm.progress import LOG_LINES, progress_bar


@dataclass
class StepOut:
    """What one optimizer step measured: its loss (for the bar and the log), how many samples it saw (samples/s)
    and any further named parts of the loss."""

    loss: float
    samples: int = 0
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepDone:
    """Handed to `after_step` once a step is done: `logged` is true at the log cadence (and at the last step)."""

    step: int  # optimizer steps done so far (1-based after the first)
    epoch: int
    out: StepOut | None
    lr: float  # the learning rate the step used (first parameter group)
    samples_per_s: float  # since the last logged step
    logged: bool


Step = Callable[[int, int], "StepOut | None"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`, `warmup` of them warmup:
    linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, *, warmup: int = 0,
                shape: Literal["warmup_cosine", "linear"] = "warmup_cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of every loop over `total` optimizer steps: `warmup_cosine` (warmup steps of linear warmup,
    then cosine) or `linear` (from the base rate straight down to 0 at `total`)."""
    if shape == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, max(1, warmup), total))


class Loop:
    """`with Loop("train lora", total, per_epoch=n) as loop: loop.run(step, optimizer, scheduler)`.

    `total` optimizer steps of `per_epoch` each; `done` of them already done (a resumed run). `log_every`: the cadence
    of `StepDone.logged` and, where stderr is a log rather than a terminal, of a plain progress line (0: lines at
    every quarter instead). `quiet`: no bar and no lines (non-main ranks of a data-parallel run)."""

    def __init__(self, name: str, total: int, *, per_epoch: int, done: int = 0, log_every: int = 0,
                 quiet: bool = False):
        from rich.progress import TextColumn

        self.name, self.total, self.per_epoch, self.step = name, total, max(1, per_epoch), done
        self.log_every, self.quiet = log_every, quiet
        self.bar = progress_bar(TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:.1f} samples/s"),
                                disable=quiet)
        self._log_lines = not quiet and not self.bar.console.is_terminal
        self._quarters = done * LOG_LINES // max(1, total)
        self._window_samples, self._window_start = 0, time.perf_counter()
        self.last: StepOut | None = None  # what the last step that learned measured

    def __enter__(self) -> "Loop":
        self.bar.start()
        self._task = self.bar.add_task(self.name, total=self.total, completed=self.step, loss=float("nan"), rate=0.0)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def run(self, step: Step, optimizer: torch.optim.Optimizer, scheduler=None, *, end: int | None = None,
            clip: Callable[[], object] | None = None, after_step: Callable[[StepDone], bool | None] | None = None) -> bool:
        """Step from the current step up to `end` (default: total). Per step: `step(epoch, in_epoch)`, then (unless it
        returned None) `clip()`, the optimizer and scheduler steps and zeroed gradients, then `after_step`, which
        may return True to stop (a kill in tests). Returns whether it was stopped."""
        end = self.total if end is None else end
        while self.step < end:
            epoch, in_epoch = divmod(self.step, self.per_epoch)
            out = step(epoch, in_epoch)
            lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
            if out is not None:
                if clip is not None:
                    clip()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self._window_samples += out.samples
                self.last = out
            self.step += 1
            rate = self._window_samples / max(time.perf_counter() - self._window_start, 1e-9)
            logged = bool(self.log_every) and (self.step % self.log_every == 0 or self.step == self.total)
            self.bar.update(self._task, advance=1, loss=out.loss if out is not None else float("nan"), rate=rate)
            self._print_line(out, lr, rate, logged)
            stop = after_step(StepDone(self.step, epoch, out, lr, rate, logged)) if after_step is not None else None
            if logged:
                self._window_samples, self._window_start = 0, time.perf_counter()
            if stop:
                return True
        return False

    def _print_line(self, out: StepOut | None, lr: float, rate: float, logged: bool) -> None:
        """Where stderr is a log (DVC, CI): a line per logged step, or one per quarter without a log cadence."""
        if not self._log_lines:
            return
        if not self.log_every:
            reached = self.step * LOG_LINES // max(1, self.total)
            if reached <= self._quarters:
                return
            self._quarters = reached
        elif not logged:
            return
        loss = f"loss {out.loss:.4f} " if out is not None else ""
        self.bar.console.print(f"{self.name} step {self.step}/{self.total} {loss}lr {lr:.2e} {rate:.2f} samples/s",
                               markup=False, highlight=False)


def rank_batch(order: torch.Tensor, first: int, micro: int, world: int, rank: int) -> torch.Tensor:
    """Data parallel: rank `rank`'s samples of the global micro-batch order[first : first + micro * world] (every world-th one).

    A last global micro-batch with fewer samples than ranks is padded from the start of the epoch's order (as
    torch's DistributedSampler pads), so no rank skips a backward pass the others wait on."""
    chunk = order[first : first + micro * world]
    if 0 < len(chunk) < world:
        chunk = torch.cat([chunk, order.repeat(world)[: world - len(chunk)]])
    return chunk[rank::world]


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a kill during the write keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, signature: str) -> tuple[dict | None, str]:
    """(state, why): the checkpoint at `path` when it exists and was written by a run of `signature`, else None and
    the reason in words (no checkpoint / made with other settings)."""
    if not path.is_file():
        return None, "no checkpoint"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("signature") != signature:
        return None, "made with other settings"
    return state, "resumable"
