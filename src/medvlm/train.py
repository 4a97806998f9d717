"""`medvlm train`: MedVLM on the engine's loop (medvlm.engine). A strategy (freeze | lora | ptuning_v2) only decides
which parameters train; this module supplies the step (micro-batches, forward, backward), stages and checkpoints.

Data (medvlm.train_data): cached trunk features (features stage) + tokenised reports + labels of data/split/train.jsonl.
Optimiser: AdamW with two groups (new modules cfg.train.lr, LM-side parameters cfg.train.lm_lr), linear warmup then
cosine decay, gradient clipping and accumulation. Accelerate places the model (CPU: fp32; GPU: bf16 autocast and
gradient checkpointing); multi-GPU: `accelerate launch -m medvlm.cli train --strategy lora`.

Data parallel (N processes, torchrun or accelerate launch): every rank computes the same epoch order; an optimizer
step takes the next batch_size x N x grad_accum samples (the global batch) and, for each of the grad_accum
micro-steps, rank r trains on every N-th sample of the next batch_size x N (rank_batch). DDP averages the gradients,
so N processes at batch_size b equal one process at batch_size b x N (same grad_accum, same learning rate, up to
the per-micro-batch token averaging of the LM loss and float summation order; tests/test_distributed.py). Dropout
draws from a per-rank RNG stream; checkpoints hold every rank's RNG state.

Multistage (train.multistage, ClinicalBLIP): the same loop in stages. Stage 1 trains the vision tail, the
discrimination module, the Q-Former and the projections with the LM side (LoRA adapters, trained LM layers,
prefixes) frozen by a requires_grad mask; stage 2 adds the LM side with a fresh optimizer and LR schedule.
Pre-trained vision (pretrain.enabled): the tail starts from the pretrain_vision stage's weights.

Reproducibility: the seed fixes initialisation, the epoch's data order (a generator seeded by seed + epoch) and the
dropout RNG. Every cfg.train.checkpoint_every steps trainable weights, optimiser, scheduler, RNG state, step and the
log so far go to <checkpoint_dir>/<strategy>/checkpoint.pt (written to a temporary file, then renamed: a kill during
the write keeps the previous checkpoint); a re-run after a kill resumes there and ends bit-for-bit where an
uninterrupted run ends. Only a run of the same signature (settings, training split, features, pre-trained tail)
resumes a checkpoint: changed data train from step 0. Only trainable weights are written as the model:
<out_dir>/<strategy>/{trainable.safetensors, model_config.json, train_log.csv}.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from medvlm import __version__
from medvlm.chain_metrics import choose_thresholds
from medvlm.config import Config
from medvlm.engine import Loop, StepDone, StepOut, load_checkpoint, lr_schedule, rank_batch, save_checkpoint
from medvlm.errors import ConfigError
from medvlm.features import feature_signature, load_features
from medvlm.model.medvlm import MedVLM
from medvlm.model.discrimination import balanced_pos_weight
from medvlm.model.strategies import check_strategy, lm_adapter_parameter_names
from medvlm.pretrain import load_pretrained_tail, load_zero_shot, pretrained_tail_digest
from medvlm.train_data import TrainData, attach_retrieval, load_train_data, token_weights
from medvlm.tracking import flatten, log_artifacts, log_metrics, log_params, mlflow_run

LOG_FIELDS = ["step", "epoch", "loss", "lm_loss", "disc_loss", "lr", "samples_per_s"]
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Stage:
    name: str
    start: int  # first optimizer step of the stage
    end: int  # one past its last
    train_lm: bool  # whether the strategy's LM-side parameters train in this stage


def stage_plan(cfg: Config, per_epoch: int, total: int) -> list[Stage]:
    """The run's stages: one, or (train.multistage) LM frozen for stage1_epochs, then everything."""
    if not cfg.train.multistage.enabled:
        return [Stage("all", 0, total, True)]
    boundary = min(total, cfg.train.multistage.stage1_epochs * per_epoch)
    stages = [Stage("lm_frozen", 0, boundary, False), Stage("lm_trained", boundary, total, True)]
    return [s for s in stages if s.end > s.start]


def run_signature(cfg: Config, strategy: str, features: torch.Tensor) -> str:
    """Everything that changes the result of a run: settings and what it learns from (the training split's content,
    its cached `features`, the pre-trained tail); a checkpoint of another signature is not resumed, so new data
    with as many rows retrain from step 0 instead of resuming the old run at its end."""
    exclude = {"checkpoint_every", "log_every", "out_dir", "checkpoint_dir", "strategies", "rank_log"}
    if not cfg.train.multistage.enabled:  # off, its settings change nothing (and old checkpoints stay valid)
        exclude.add("multistage")
    # a setting added later is left out at its default, so checkpoints made before it existed stay valid
    model = cfg.model.model_dump(exclude={"qformer_dropout"} if cfg.model.qformer_dropout == 0.1 else set())
    parts = [strategy, cfg.seed, model, cfg.train.model_dump(exclude=exclude), cfg.data.label_names,
             feature_signature(cfg), training_data_digest(cfg, features)]
    if cfg.pretrain.enabled:  # the vision tail's starting point (and the zero-shot clue source's prompts)
        parts.append({"pretrained_vision": pretrained_tail_digest(cfg)})
        if cfg.model.clues and cfg.model.clue_source == "zero_shot":
            parts.append({"zero_shot_prompts": [cfg.pretrain.label_prompt, cfg.pretrain.negative_prompt]})
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def training_data_digest(cfg: Config, features: torch.Tensor) -> dict[str, str]:
    """sha256 (16 hex) of the training split file and of its cached trunk features (shape, dtype and values)."""
    split_file = Path(cfg.split.out_dir) / "train.jsonl"
    tensor = hashlib.sha256(f"{tuple(features.shape)} {features.dtype}".encode())
    tensor.update(features.detach().cpu().contiguous().numpy())  # the buffer itself, no copy
    return {"train_split": hashlib.sha256(split_file.read_bytes()).hexdigest()[:16],
            "features": tensor.hexdigest()[:16]}


def build_optimizer(model: MedVLM, cfg: Config) -> torch.optim.Optimizer:
    strategy_lr = getattr(cfg.train, model.strategy).lm_lr
    lm_names = lm_adapter_parameter_names(model)
    groups: dict[str, list] = {"new": [], "new_no_decay": [], "lm": [], "lm_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "lm" if name in lm_names else "new"
        groups[kind + ("" if p.ndim >= 2 else "_no_decay")].append(p)  # no decay on biases / norms
    lr, lm_lr, wd = cfg.train.lr, strategy_lr or cfg.train.lm_lr, cfg.train.weight_decay
    spec = [("new", lr, wd), ("new_no_decay", lr, 0.0), ("lm", lm_lr, wd), ("lm_no_decay", lm_lr, 0.0)]
    return torch.optim.AdamW([{"params": groups[k], "lr": r, "weight_decay": d} for k, r, d in spec if groups[k]])


def epoch_order(cfg: Config, n: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample order, prompt index per sample) of an epoch: a pure function of (seed, epoch), so resumable."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    # without the template there is one input layout, whatever model.prompts lists
    n_prompts = len(cfg.model.prompts) if cfg.model.prompt_template else 1
    return torch.randperm(n, generator=gen), torch.randint(n_prompts, (n,), generator=gen)


def weights_digest(model: MedVLM) -> str:
    """sha256 of the trainable weights (rank_log: identical on every rank after every step)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name in model.trainable_names:
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def schedule(cfg: Config, n: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    per_epoch = math.ceil(n / per_step)
    ms = cfg.train.multistage
    total = per_epoch * (ms.stage1_epochs + ms.stage2_epochs if ms.enabled else cfg.train.epochs)
    return per_epoch, min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def train(cfg: Config, strategy: str, resume: bool = True, *, stop_after: int | None = None) -> dict:
    """Train `strategy`; returns a summary. `stop_after` ends the process early as a kill would (tests)."""
    from contextlib import nullcontext

    from accelerate import Accelerator

    check_strategy(cfg, strategy)  # before any loading: a bad name costs nothing
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.train.multistage.enabled and world > 1:  # DDP fixes the set of parameters with gradients at wrap time
        raise ConfigError("train.multistage is single-process only (DDP cannot change the trained parameters mid-run)")
    cached = load_features(cfg, "train")  # missing / stale features fail before the LM is loaded
    signature = run_signature(cfg, strategy, cached[0])  # a missing pre-trained tail fails here, before the LM loads
    torch.manual_seed(cfg.seed)
    model = MedVLM(cfg, strategy)
    vision_init = load_pretrained_tail(cfg, model.vision) if cfg.pretrain.enabled else "imagenet"
    if model.clues is not None and model.clues.zero_shot is not None:
        load_zero_shot(model.clues.zero_shot, cfg)
    data = load_train_data(cfg, model, cached=cached)
    model.disc_pos_weight = balanced_pos_weight(data.labels, cfg.model.disc_pos_weight_max)
    model.token_loss_weight = token_weights(data.reports, model.lm.get_input_embeddings().num_embeddings,
                                            cfg.model.finding_token_weight)
    if cfg.model.retrieval.enabled:
        attach_retrieval(model, data, cfg)
    if cfg.model.closed_vocab:
        model.set_output_vocab([t for report in data.reports for t in report])
    if rank:  # DDP copies rank 0's weights at wrap time; dropout masks must differ between ranks
        torch.manual_seed(cfg.seed * 100_003 + 7919 * rank)
    if cuda:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm_names = lm_adapter_parameter_names(model)  # before any stage mask: the strategy's LM side
    per_epoch, total = schedule(cfg, len(data.reports), world)
    stages = stage_plan(cfg, per_epoch, total)
    model = accelerator.prepare_model(model)
    core: MedVLM = accelerator.unwrap_model(model)

    ckpt_path = Path(cfg.train.checkpoint_dir) / strategy / CHECKPOINT
    step, log_rows, resumed_from, state = 0, [], None, None
    if resume:
        state, why = load_checkpoint(ckpt_path, signature)
        if state is not None:
            core.load_trainable_state_dict(state["trainable"])
            rngs = state.get("rng_ranks")  # every rank's own RNG state (older checkpoints: rank 0's only)
            torch.set_rng_state(rngs[rank] if rngs and len(rngs) == world else state["rng"])
            step, log_rows, resumed_from = state["step"], state["log"], state["step"]
            accelerator.print(f"resuming {strategy} from {ckpt_path} at step {step}/{total}")
        elif why != "no checkpoint":
            accelerator.print(f"{ckpt_path}: {why}, starting {strategy} afresh")

    n_trainable = sum(p.numel() for n, p in core.named_parameters() if n in core.trainable_names)
    rank_log = _RankLog(Path(cfg.train.out_dir) / strategy, rank, fresh=step == 0) if cfg.train.rank_log else None
    model.train()
    tracked = mlflow_run(cfg, run_name=f"train-{strategy}", tags={"stage": "train", "strategy": strategy}) \
        if accelerator.is_main_process else nullcontext(None)  # one MLflow run per training, not one per rank
    with tracked as run:
        log_params(run, {"strategy": strategy, "trainable_params": n_trainable, "total_steps": total,
                         "pretrain.enabled": cfg.pretrain.enabled, "vision_init": vision_init,
                         **flatten(cfg.model.model_dump(), "model."), **flatten(cfg.train.model_dump(), "train.")})
        stepper = _Stepper(cfg, model, data, accelerator)
        with Loop(f"train {strategy}", total, per_epoch=per_epoch, done=step, log_every=cfg.train.log_every,
                  quiet=not accelerator.is_main_process) as loop:
            for stage_index, stage in enumerate(stages):
                if loop.step >= stage.end:
                    continue
                _set_stage_mask(core, stage, lm_names)
                optimizer, scheduler = _stage_optimizer(core, cfg, stage)
                if state is not None and state.get("stage", 0) == stage_index:  # resumed inside this stage
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                state = None  # a checkpoint from an earlier stage holds that stage's optimizer: start afresh
                optimizer = accelerator.prepare_optimizer(optimizer)
                trained = [p for p in model.parameters() if p.requires_grad]
                if len(stages) > 1:
                    accelerator.print(f"{strategy} stage {stage.name}: steps {stage.start + 1}..{stage.end}, "
                                      f"{sum(p.numel() for p in trained)} parameters train", flush=True)

                def after_step(done: StepDone, stage_index=stage_index, optimizer=optimizer, scheduler=scheduler) -> bool:
                    if rank_log is not None:
                        rank_log.write(done.step, done.epoch, stepper.last_ids, weights_digest(core))
                    if done.logged:
                        row = {"step": done.step, "epoch": done.epoch,
                               **{k: round(v, 5) for k, v in {"loss": done.out.loss, **done.out.parts}.items()},
                               "lr": done.lr, "samples_per_s": round(done.samples_per_s, 3)}
                        log_rows.append(row)
                        log_metrics(run, {k: row[k] for k in ("loss", "lm_loss", "disc_loss", "lr", "samples_per_s")},
                                    done.step)
                    if done.step % cfg.train.checkpoint_every == 0 or done.step == total:
                        _checkpoint(accelerator, ckpt_path, core, optimizer, scheduler, done.step, log_rows, signature,
                                    stage_index)
                    return stop_after is not None and stop_after <= done.step < total

                clip = lambda trained=trained: accelerator.clip_grad_norm_(trained, cfg.train.max_grad_norm)  # noqa: E731
                if loop.run(stepper, optimizer, scheduler, end=stage.end, clip=clip, after_step=after_step):
                    return {"strategy": strategy, "steps": loop.step, "stopped_early": True}
            step = loop.step
        out_dir = Path(cfg.train.out_dir) / strategy
        summary = {
            "strategy": strategy, "steps": step, "total_steps": total, "trainable_params": n_trainable,
            "seconds": round(time.perf_counter() - started, 2), "resumed_from": resumed_from,
            "final_loss": log_rows[-1]["loss"] if log_rows else None, "train_samples": len(data.reports),
            "out_dir": str(out_dir), "run_id": run.info.run_id if run is not None else None,
        }
        if len(stages) > 1:
            summary["stages"] = [{"name": s.name, "steps": s.end - s.start} for s in stages]
        if cfg.pretrain.enabled:
            summary["vision_init"] = vision_init
        if accelerator.is_main_process:
            thresholds = label_thresholds(core, data, cfg, accelerator.device)
            if thresholds:
                summary["dem_thresholds"] = thresholds
            paths = save_trained(core, cfg, strategy, out_dir, log_rows, summary)
            log_artifacts(run, [paths["config"], paths["log"]])
            log_metrics(run, {"train_seconds": summary["seconds"]})
    return summary


class _Stepper:
    """One optimizer step of MedVLM for the engine: cfg.train.grad_accum micro-batches of this rank's share of the
    global batch, each forward + backward (DDP averages gradients once per optimizer step, not per micro-step)."""

    def __init__(self, cfg: Config, model, data: TrainData, accelerator):
        self.cfg, self.model, self.data, self.accelerator = cfg, model, data, accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.last_ids: list[str] = []  # the study ids of the last step on this rank (rank_log)

    def __call__(self, epoch: int, in_epoch: int) -> StepOut:
        from contextlib import nullcontext

        cfg, data, accelerator, world = self.cfg, self.data, self.accelerator, self.world
        micro, accum = cfg.train.batch_size, cfg.train.grad_accum
        order, prompts = epoch_order(cfg, len(data.reports), epoch)
        sums = {"loss": 0.0, "lm_loss": 0.0, "disc_loss": 0.0}
        self.last_ids, samples = [], 0
        for k in range(accum):
            first = (in_epoch * accum + k) * micro * world
            idx = rank_batch(order, first, micro, world, self.rank)
            if len(idx) == 0:
                continue
            self.last_ids += [data.study_ids[i] for i in idx]
            last = k == accum - 1 or len(order) <= first + micro * world
            sync = nullcontext() if world == 1 or last else accelerator.no_sync(self.model)
            with sync, accelerator.autocast():
                out = self.model(data.features[idx].to(accelerator.device), [data.reports[i] for i in idx],
                                 data.labels[idx], [int(prompts[i]) for i in idx],
                                 [data.contexts[i] for i in idx] if data.contexts else None,
                                 [data.indications[i] for i in idx] if data.indications is not None else None)
            accelerator.backward(out["loss"] / accum)
            for key in sums:
                if key in out:
                    sums[key] += float(out[key].detach()) / accum
            samples += len(idx) * world
        if world > 1:  # the logged losses are the global batch's, the same on every rank
            mean = accelerator.reduce(torch.tensor([sums[k] for k in sums]), reduction="mean")
            sums = dict(zip(sums, mean.tolist()))
        return StepOut(sums.pop("loss"), samples, sums)


@torch.no_grad()
def label_logits(model: MedVLM, features: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor | None:
    """The model's label logits (DEM, or the clue module's) for cached trunk features, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(features), batch_size):
            _, logits = model.visual_queries(features[start : start + batch_size].to(device))
            if logits is None:
                return None
            out.append(logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else None


def label_thresholds(model: MedVLM, data: TrainData, cfg: Config, device) -> dict[str, float] | None:
    """Per-label F1-best cuts of the trained model's probabilities on the training split (saved with the model;
    evaluation and the prior-knowledge prompt at inference use them instead of a fixed 0.5)."""
    if not model.supervised_logits:
        return None
    logits = label_logits(model, data.features, device)
    if logits is None:
        return None
    return choose_thresholds(data.labels.numpy(), torch.sigmoid(logits).numpy(), cfg.data.label_names)


def _set_stage_mask(model: MedVLM, stage: Stage, lm_names: set[str]) -> None:
    """requires_grad for a stage: the strategy's trainable set, minus its LM side while the LM is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in model.trainable_names and (stage.train_lm or name not in lm_names))


def _stage_optimizer(model: MedVLM, cfg: Config, stage: Stage):
    """AdamW over what trains in this stage; warmup + cosine over the stage's own steps."""
    optimizer = build_optimizer(model, cfg)
    length = stage.end - stage.start
    return optimizer, lr_schedule(optimizer, length, warmup=round(cfg.train.warmup_ratio * length))


def _checkpoint(accelerator, path: Path, model: MedVLM, optimizer, scheduler, step: int, log_rows: list,
                signature: str, stage: int) -> None:
    """Every rank's RNG state goes in (gathered); rank 0 writes."""
    from accelerate.utils import gather_object

    rngs = gather_object([torch.get_rng_state()]) if accelerator.num_processes > 1 else [torch.get_rng_state()]
    if accelerator.is_main_process:
        save_checkpoint(path, {"step": step, "trainable": model.trainable_state_dict(),
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": torch.get_rng_state(), "rng_ranks": rngs, "log": log_rows,
                               "signature": signature, "stage": stage})


def save_trained(model: MedVLM, cfg: Config, strategy: str, out_dir: Path, log_rows: list, summary: dict) -> dict:
    """Write only what training changed, plus what Predictor.load needs to rebuild the rest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "trainable.safetensors"
    save_file({k: v.float().cpu() for k, v in model.trainable_state_dict().items()}, weights,
              metadata={"strategy": strategy, "medvlm": __version__})
    config_path = out_dir / "model_config.json"
    config_path.write_text(json.dumps({
        "strategy": strategy, "label_names": cfg.data.label_names, "lm": cfg.model.lm, "vision": cfg.model.vision,
        "output_vocab": model.output_vocab, "dem_thresholds": summary.get("dem_thresholds"),
        "medvlm_version": __version__, "train_summary": {k: v for k, v in summary.items() if k != "out_dir"},
        "config": cfg.model_dump(mode="json", by_alias=True),
    }, indent=2))
    if model.retrieval_index is not None:
        model.retrieval_index.save(out_dir)
    log_path = out_dir / "train_log.csv"
    with log_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(log_rows)
    return {"weights": weights, "config": config_path, "log": log_path}


class _RankLog:
    """train.rank_log: one JSON line per optimizer step of this rank (appended across resumes)."""

    def __init__(self, folder: Path, rank: int, fresh: bool):
        self.path = folder / "ranks" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        self.rank = rank

    def write(self, step: int, epoch: int, ids: list[str], digest: str) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "epoch": epoch, "rank": self.rank, "ids": ids, "weights": digest}) + "\n")
