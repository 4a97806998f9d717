"""GPU training benchmark in one command (`make gpu-bench`) -> reports/bench/gpu.json.

1. Checks the torch build: CUDA version it was built with, a visible device, bf16 support. A CPU build or no device
   stops with one line saying so (exit code 2), before anything is loaded.
2. Runs the real training step of medvlm.train (cached-trunk features -> vision tail, DEM, Q-Former, LM; bf16
   autocast, gradient checkpointing on CUDA; backward; gradient clipping; AdamW with the train.py parameter groups)
   for a fixed number of steps per strategy with the GPU profile (params.yaml + params/gpu.yaml), on synthetic
   trunk features and phantom-length reports (no data or earlier stage needed).
3. Writes per strategy: samples/s, tokens/s, model FLOPs utilisation, peak memory; and the memory table (peak
   allocated memory per strategy per batch size, OOM marked).

Model FLOPs of one training step (MFU = step FLOPs / step time / peak; attention score FLOPs and the recomputation
of gradient checkpointing are not counted, so this is MFU, not hardware FLOPs utilisation):
    forward          2 * N_m * T_m        every matrix m that runs (the frozen trunk does not: features are cached)
    backward, acts   2 * N_m * T_m        every matrix after the first trainable module: here all that run, since
                                          the Q-Former (before the LM) and the vision tail always train
    backward, wgrad  2 * N_m * T_m        trainable matrices only (LoRA adapters, trained LM layers, new modules)
  N_m: weights of matrix m (biases, norms, embedding look-ups and P-Tuning prefixes are not matmuls: left out);
  T_m: tokens it processes per step: LM decoder layers = batch x sequence tokens; LM head = batch x report tokens
  (logits are computed only where there is a label); Q-Former = batch x queries (its cross-attention key/value
  projections: batch x visual tokens); vision tail, DEM, clues = batch x visual tokens (spatial positions).
  So frozen LM weights cost 4 N T (no weight gradient) and trainable ones 6 N T; with everything trainable this is
  the usual 6 N T.
Peak: dense bf16 tensor-core FLOP/s by device name (PEAK_BF16, NVIDIA data sheets, no sparsity); --peak-flops to
override.

    python bench/gpu_bench.py [--steps 20] [--strategies lora] [--batch-sizes 8 16 32 64 128]
    python bench/gpu_bench.py --dry-run --params tiny.yaml   # the same code on CPU, tiny config (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from medvlm.config import load_config  # noqa: E402
from medvlm.model.medvlm import MedVLM  # noqa: E402
from medvlm.train import build_optimizer  # noqa: E402
from train_bench import REPORT  # noqa: E402  (the CPU benchmark's report: same sequence length on both)


# Dense bf16 tensor-core peak, FLOP/s (data sheets; first matching name wins, so specific names come first).
PEAK_BF16 = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),  # V100/T4: fp16 (no bf16)
]
DRY_RUN_PEAK = 1e12  # nominal: a dry run's MFU only proves the arithmetic runs


class BenchError(Exception):
    pass


def check_torch(dry_run: bool) -> dict:
    """What the torch build and the device offer; raises BenchError when a real run cannot use a GPU."""
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:
        info.update(device=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                    bf16=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
    if dry_run:
        return info
    if torch.version.cuda is None:
        raise BenchError(f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): install the CUDA "
                         "wheel of the same version (pip install torch==<version> --index-url "
                         "https://download.pytorch.org/whl/cu128) and re-run")
    if not info["cuda_available"]:
        raise BenchError(f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU "
                         "(driver? CUDA_VISIBLE_DEVICES?)")
    return info


def peak_flops(device_name: str) -> tuple[float, str]:
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value, f"{key} dense bf16"
    raise BenchError(f"no peak FLOP/s known for {device_name!r}: pass --peak-flops")


def flop_count(model: MedVLM, batch: int, seq_tokens: int, report_tokens: int, visual_tokens: int,
               queries: int) -> dict:
    """Model FLOPs of one training step (module docstring), split by part."""
    head_rows = len(model.output_vocab) if model.output_vocab is not None else model.lm.get_output_embeddings().weight.shape[0]
    hidden = model.lm.get_output_embeddings().weight.shape[1]
    parts: dict[str, float] = {}

    def add(part: str, n: int, tokens: int, trainable: bool) -> None:
        parts[part] = parts.get(part, 0.0) + (6 if trainable else 4) * n * tokens * batch

    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("vision.trunk.") or "embed_tokens" in name or name.startswith("prefix"):
            continue
        if name.startswith("lm."):
            if "lm_head" in name:
                continue  # counted below with its own token count (it may share the embedding matrix)
            add("lm_layers", p.numel(), seq_tokens, p.requires_grad)
        elif name.startswith("bridge."):
            cross_kv = "crossattention" in name and (".key." in name or ".value." in name)
            add("qformer", p.numel(), visual_tokens if cross_kv else queries, p.requires_grad)
        else:  # vision tail, DEM, clue module: per visual token (spatial position)
            add(name.split(".")[0], p.numel(), visual_tokens, p.requires_grad)
    head = model.lm.get_output_embeddings().weight
    add("lm_head", head_rows * hidden, report_tokens, head.requires_grad)
    return {"total": sum(parts.values()), "by_part": parts}


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # CPU: peak RSS of the process


class Bench:
    """One strategy's model, optimizer and synthetic batch, stepped like medvlm.train does."""

    def __init__(self, cfg, strategy: str, device: str):
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device
        self.model = MedVLM(cfg, strategy).to(device)
        if device == "cuda":  # what medvlm.train sets on CUDA
            self.model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        from PIL import Image

        pixels = self.model.vision.preprocess([Image.new("L", (cfg.features.image_size,) * 2)])
        self.trunk_shape = tuple(self.model.vision.trunk_features(pixels).shape[1:])
        self.report = self.model.layout.encode_report(REPORT)[: cfg.model.max_report_tokens]
        if cfg.model.closed_vocab:  # as medvlm.train does
            self.model.set_output_vocab(self.report)
        self.optimizer = build_optimizer(self.model, cfg)
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.visual_tokens = self.model.vision(torch.zeros(1, *self.trunk_shape, device=device)).shape[1]

    def step(self, batch: int) -> int:
        feats = torch.rand(batch, *self.trunk_shape, device=self.device)
        labels = torch.zeros(batch, len(self.cfg.data.label_names), device=self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast:
            out = self.model(feats, [self.report] * batch, labels)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(out["tokens"])

    def timed_steps(self, batch: int, steps: int, warmup: int) -> list[float]:
        times = []
        for i in range(warmup + steps):
            self._sync()
            start = time.perf_counter()
            self.step(batch)
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return times

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def sequence_tokens(self) -> int:
        m = self.model
        clue_tokens = m.clues.n_tokens if m.clues is not None and self.cfg.model.clue_tokens else 0
        return len(m.layout.pre) + self.cfg.model.qformer_queries + clue_tokens + len(m.layout.posts[0]) + len(self.report)


def bench_strategy(cfg, strategy: str, device: str, steps: int, warmup: int, batch_sizes: list[int],
                   peak: float) -> tuple[dict, dict]:
    bench = Bench(cfg, strategy, device)
    b = cfg.train.batch_size
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = bench.timed_steps(b, steps, warmup)
    step_s = sorted(times)[len(times) // 2]  # median
    seq = bench.sequence_tokens()
    flops = flop_count(bench.model, b, seq, len(bench.report), bench.visual_tokens, cfg.model.qformer_queries)
    result = {
        "strategy": strategy, "batch_size": b, "steps": steps, "warmup_steps": warmup,
        "sequence_tokens": seq, "report_tokens": len(bench.report), "visual_tokens": bench.visual_tokens,
        "step_seconds_median": round(step_s, 4), "step_seconds_min": round(min(times), 4),
        "samples_per_s": round(b / step_s, 2), "tokens_per_s": round(b * seq / step_s, 1),
        "trainable_params": sum(p.numel() for p in bench.trained),
        "params_run": sum(p.numel() for n, p in bench.model.named_parameters() if not n.startswith("vision.trunk.")),
        "model_flops_per_step": flops["total"], "flops_by_part": flops["by_part"],
        "mfu": float(f"{flops['total'] / step_s / peak:.4g}"), "peak_memory_mb": _peak_memory_mb(device),
    }
    memory: dict[str, float | str] = {}
    for size in sorted(batch_sizes):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            bench.timed_steps(size, 1, 1)  # two steps: the optimizer state exists from the first
            memory[str(size)] = _peak_memory_mb(device)
        except torch.OutOfMemoryError:
            bench.optimizer.zero_grad(set_to_none=True)
            memory[str(size)] = "OOM"
            break  # larger batches need more
    del bench
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--overlay", action="append", default=None, help="default: params/gpu.yaml (not in --dry-run)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per strategy (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--strategies", nargs="*")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s of the device (default: PEAK_BF16 by name)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the given (tiny) params, 2 steps: tests the code path")
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "gpu.json"))
    args = parser.parse_args(argv)
    try:
        info = check_torch(args.dry_run)
        device = "cpu" if args.dry_run else "cuda"
        overlays = args.overlay if args.overlay is not None else ([] if args.dry_run else [str(REPO / "params" / "gpu.yaml")])
        cfg = load_config(args.params, overlays=overlays)
        if args.peak_flops:
            peak, peak_source = args.peak_flops, "--peak-flops"
        elif args.dry_run:
            peak, peak_source = DRY_RUN_PEAK, "dry run: nominal 1 TFLOP/s"
        else:
            peak, peak_source = peak_flops(info["device"])
    except BenchError as exc:
        print(f"gpu-bench: {exc}", file=sys.stderr)
        return 2
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    results, memory = [], {}
    for strategy in args.strategies or cfg.train.strategies:
        result, table = bench_strategy(cfg, strategy, device, steps, warmup, args.batch_sizes, peak)
        results.append(result)
        memory[strategy] = table
        print(f"{strategy}: {result['samples_per_s']} samples/s, {result['tokens_per_s']} tokens/s, "
              f"MFU {result['mfu']:.1%}, peak {result['peak_memory_mb']} MB", flush=True)
    report = {
        "dry_run": args.dry_run, **info, "platform": platform.platform(), "params": args.params, "overlays": overlays,
        "lm": cfg.model.lm, "lm_layers": cfg.model.lm_layers, "peak_flops": peak, "peak_source": peak_source,
        "precision": "bf16 autocast + gradient checkpointing" if device == "cuda" else "fp32 (CPU)",
        "flop_formula": ("per step: sum over matrices m that run of (2 fwd + 2 bwd activation-grad + 2 bwd "
                         "weight-grad if trainable) * N_m * T_m; T = batch x (sequence tokens for LM layers, report "
                         "tokens for the LM head, queries / visual tokens for the Q-Former, visual tokens for the "
                         "vision tail, DEM, clues); no attention-score FLOPs, no checkpointing recompute"),
        "memory_note": "peak allocated (torch.cuda.max_memory_allocated) in MB over 2 steps per batch size" if device == "cuda"
        else "CPU: peak RSS of the process in MB (monotonic over the run)",
        "results": results, "memory_table_mb": memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
