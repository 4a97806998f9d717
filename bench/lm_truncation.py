"""How much language a *frozen*, truncated LM keeps -> reports/bench/lm_truncation.json.

The CPU profile keeps the first model.lm_layers of SmolLM2's 30 decoder layers and puts the final norm + LM head on
top of that layer. Strategies that train LM layers (freeze: the last kept layer; LoRA: adapters in every kept
layer) can re-map that hidden state to the head; P-Tuning v2 cannot (only key/value prefixes train). This measures
the report-token negative log-likelihood (nats per token, the report and its end token after the chat prompt, no
image) of the frozen LM for several layer subsets on the test split's reference reports. ln(vocab) = 10.8 is the
uniform guess: a subset above it predicts report tokens worse than chance.

    python bench/lm_truncation.py [--params params.yaml] [--overlay ...] [--split data/split/test.jsonl] [--n 96]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medvlm.config import load_config  # noqa: E402
from medvlm.manifest import read_manifest  # noqa: E402
from medvlm.model.lm import load_lm  # noqa: E402
from medvlm.strategies.freeze import decoder_layers  # noqa: E402


def subsets(total: int) -> dict[str, list[int]]:
    return {"first 4 (CPU default)": list(range(4)), "first 8": list(range(8)),
            "first 3 + last": [0, 1, 2, total - 1], "first 7 + last": [*range(7), total - 1],
            f"all {total}": list(range(total))}


@torch.no_grad()
def report_nll(lm, prompt_ids: list[int], reports: list[list[int]]) -> float:
    total, count = 0.0, 0
    for report in reports:
        ids = torch.tensor([prompt_ids + report])
        logits = lm(ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
        total += F.cross_entropy(logits.float(), torch.tensor(report), reduction="sum").item()
        count += len(report)
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overlay", action="append", default=[])
    ap.add_argument("--split", default=None, help="a split manifest (default: <split.out_dir>/test.jsonl)")
    ap.add_argument("--n", type=int, default=96, help="reports to score")
    ap.add_argument("--out", default="reports/bench/lm_truncation.json")
    args = ap.parse_args()
    cfg = load_config(args.params, overlays=args.overlay)
    split = Path(args.split or Path(cfg.split.out_dir) / "test.jsonl")
    texts = [str(r) for r in read_manifest(split)["report"]][: args.n]
    lm, tok = load_lm(cfg.model.model_copy(update={"lm_layers": 0}))
    messages = [{"role": "system", "content": cfg.model.system_prompt}] if cfg.model.system_prompt else []
    messages.append({"role": "user", "content": cfg.model.prompts[0]})
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    reports = [tok(t, add_special_tokens=False)["input_ids"][: cfg.model.max_report_tokens] + [tok.eos_token_id]
               for t in texts]
    layers = list(decoder_layers(lm))
    base = lm.get_decoder()
    results = {}
    for name, keep in subsets(len(layers)).items():
        base.layers = torch.nn.ModuleList([layers[i] for i in keep])
        lm.config.num_hidden_layers = len(keep)
        started = time.perf_counter()
        results[name] = {"layers": keep, "report_nll": round(report_nll(lm, prompt, reports), 3),
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name:24s} report-token NLL {results[name]['report_nll']:.3f} nats", flush=True)
    out = {"lm": cfg.model.lm, "split": str(split), "n_reports": len(reports),
           "uniform_nll": round(math.log(lm.config.vocab_size), 3), "subsets": results,
           "convention": "frozen LM, no image; chat prompt (system + first model.prompts) then report + end token; "
                         "mean NLL over report tokens"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
