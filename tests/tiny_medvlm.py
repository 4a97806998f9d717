"""Tiny MedVLM pieces for fast tests: a word-level tokenizer with a chat template, a 2-layer Llama, synthetic
cached trunk features and split files. The real EfficientNet (17 MB, offline) is used at 64 px: 2 x 2 tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medvlm.config import config_from_dict

REPORTS = [
    "no abnormality is seen in either lung .",
    "ground glass opacity in the right lower lobe .",
    "consolidation in the left upper lobe with effusion .",
    "small nodule in the right upper lobe .",
]
LABELS = [{"pneumonia": 0, "effusion": 0}, {"pneumonia": 1, "effusion": 0},
          {"pneumonia": 1, "effusion": 1}, {"pneumonia": 0, "effusion": 0}]
PROMPTS = ["describe the findings .", "write the report ."]
SPECIAL = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
TRUNK_SHAPE = (192, 2, 2)  # EfficientNet-Lite0 trunk (all but the last block) at 64 px


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for text in REPORTS + PROMPTS + ["system user assistant you are a radiologist ."] for w in text.split()})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_lm_dir(path: Path, layers: int = 2) -> Path:
    """A random 2-layer Llama + tokenizer saved like any local model folder (model.lm = this path)."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_config(tmp: Path, **sections):
    """A Config for tiny models whose every output path lies under tmp."""
    lm_dir = tmp / "tiny_lm"
    if not lm_dir.exists():
        make_lm_dir(lm_dir)
    raw = {
        "seed": 0,
        "data": {"root": str(tmp / "data"), "label_names": ["pneumonia", "effusion"], "primary_label": "pneumonia"},
        "split": {"out_dir": str(tmp / "split")},
        "features": {"image_size": 64, "batch_size": 4, "out_dir": str(tmp / "features")},
        "model": {"lm": str(lm_dir), "lm_layers": 0, "qformer_hidden": 32, "qformer_layers": 1, "qformer_heads": 2,
                  "qformer_queries": 4, "label_embed_dim": 8, "max_report_tokens": 16, "tune_vision_blocks": 1,
                  "prompts": PROMPTS, "system_prompt": "you are a radiologist .",
                  # the plain prompt and an unweighted classifier: tests of the prior prompt turn it on themselves
                  "prior_prompt": False, "prior_source": "predicted", "disc_pos_weight_max": 0.0},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "lm_lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
                  "out_dir": str(tmp / "models"), "checkpoint_dir": str(tmp / "checkpoints"),
                  "freeze": {"trainable_lm_layers": [-1]}, "lora": {"r": 2, "alpha": 4, "dropout": 0.1,
                  "target_modules": ["q_proj", "v_proj"]}, "ptuning_v2": {"num_virtual_tokens": 3, "prefix_projection": False}},
        "generate": {"num_beams": 2, "max_new_tokens": 6, "repetition_penalty": 1.1, "batch_size": 3},
        "register": {"tracking_uri": "none"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def write_cached_split(cfg, n: int = 8, seed: int = 0, offset: int = 0) -> None:
    """Split files + matching cached trunk features (random tensors), as the split and features stages write them.
    `seed` draws other features, `offset` gives row i the report and labels of row i + offset: other data, same n."""
    from safetensors.torch import save_file

    from medvlm.features import feature_signature

    gen = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        rows = [{"study_id": f"{split}_{i}", "images": [f"images/{split}_{i}.png"], "report": REPORTS[(i + offset) % 4],
                 "report_zh": None, "labels": LABELS[(i + offset) % 4], "split": None, "group": f"{split}_{i}",
                 "source_row": i} for i in range(n)]
        Path(cfg.split.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.split.out_dir) / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        feats = torch.randn((n, *TRUNK_SHAPE), generator=gen).abs()
        Path(cfg.features.out_dir).mkdir(parents=True, exist_ok=True)
        save_file({"features": feats}, Path(cfg.features.out_dir) / f"{split}.safetensors",
                  metadata={**feature_signature(cfg), "study_ids": json.dumps([r["study_id"] for r in rows])})


def overfit(model, feats: torch.Tensor, target: list[int], steps: int, labels: torch.Tensor | None = None) -> None:
    """Train `model` on one (features, report ids[, labels]) example for `steps` AdamW steps, then eval mode
    (decoding in train mode would sample the Q-Former's dropout)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(feats, [target] * len(feats), labels)["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def greedy_reference(model, feats: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy decoding of one sample at a time that re-runs the whole sequence every step (no KV cache, no
    padding, no beam bookkeeping): what the batched decoder must reproduce."""
    out = []
    with torch.no_grad():
        soft, logits = model.visual_queries(feats)
        posts = model.post_ids([0] * len(feats), logits)
        for b in range(len(feats)):
            ids: list[int] = []
            for _ in range(steps):
                embeds = torch.cat([model.embed_ids(torch.tensor([model.layout.pre])), soft[b : b + 1],
                                    model.embed_ids(torch.tensor([posts[b] + ids]))], dim=1)
                mask = torch.ones(1, model.prefix_length() + embeds.shape[1], dtype=torch.long)
                hidden = model.run_decoder(embeds, mask, torch.arange(embeds.shape[1]).unsqueeze(0),
                                           model.prefix_cache(1, embeds.dtype))
                token = int(model.output_token(model.lm_head(hidden[:, -1]).argmax(-1)))
                if token == model.layout.eos:
                    break
                ids.append(token)
            out.append(ids)
    return out
