"""The plain-torch inference runtime (model/runtime.py) against the transformers / peft modules it stands in for:
same parameter names, same query tokens, logits and reports, for every strategy; and the generate path imports no
tracking, orchestration or transformers code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medvlm.generation import generate_ids
from medvlm.model.medvlm import MedVLM
from tiny_medvlm import TRUNK_SHAPE, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _pair(tmp_path: Path, strategy: str, **model):
    cfg = tiny_config(tmp_path, model=model) if model else tiny_config(tmp_path)
    torch.manual_seed(0)
    ref = MedVLM(cfg, strategy).eval()
    with torch.no_grad():  # LoRA B and the prefix start at zero: move every trained weight off its init
        gen = torch.Generator().manual_seed(1)
        for name, p in ref.named_parameters():
            if name in ref.trainable_names:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    fast = MedVLM(cfg, strategy, runtime=True).eval()
    assert fast.runtime
    assert set(fast.trainable_names) == set(ref.trainable_names)
    fast.load_trainable_state_dict(ref.trainable_state_dict())
    return cfg, ref, fast


@pytest.mark.parametrize("strategy", ["freeze", "lora", "ptuning_v2"])
def test_runtime_matches_transformers(tmp_path, strategy):
    cfg, ref, fast = _pair(tmp_path, strategy)
    assert fast.layout.pre == ref.layout.pre and fast.layout.posts == ref.layout.posts
    assert (fast.layout.eos, fast.layout.pad, fast.layout.bos) == (ref.layout.eos, ref.layout.pad, ref.layout.bos)
    feats = torch.randn((3, *TRUNK_SHAPE), generator=torch.Generator().manual_seed(2)).abs()
    with torch.no_grad():
        q_ref, l_ref = ref.visual_queries(feats)
        q_fast, l_fast = fast.visual_queries(feats)
        torch.testing.assert_close(q_fast, q_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(l_fast, l_ref, rtol=1e-4, atol=1e-5)
        # one decoder pass over [prompt | queries | post] with a pre-filled cache where the strategy has one
        embeds = torch.cat([ref.embed_ids(torch.tensor([ref.layout.pre] * 3)), q_ref,
                            ref.embed_ids(torch.tensor([ref.layout.posts[0]] * 3))], dim=1)
        mask = torch.ones(3, ref.prefix_length() + embeds.shape[1], dtype=torch.long)
        pos = torch.arange(embeds.shape[1]).unsqueeze(0).expand(3, -1)
        h_ref = ref.run_decoder(embeds, mask, pos, ref.new_cache(3, embeds.dtype))
        h_fast = fast.run_decoder(embeds, mask, pos, fast.new_cache(3, embeds.dtype))
        torch.testing.assert_close(fast.lm_head(h_fast), ref.lm_head(h_ref), rtol=1e-4, atol=1e-4)
    ids_ref, p_ref = generate_ids(ref, feats, cfg.generate)
    ids_fast, p_fast = generate_ids(fast, feats, cfg.generate)
    assert ids_fast == ids_ref
    torch.testing.assert_close(p_fast, p_ref, rtol=1e-4, atol=1e-5)
    assert [fast.layout.decode(i) for i in ids_fast] == [ref.layout.decode(i) for i in ids_ref]


def test_runtime_prior_prompt_tokenizes_like_transformers(tmp_path):
    _, ref, fast = _pair(tmp_path, "freeze", prior_prompt=True)
    for probs in ([0.9, 0.1], [0.2, 0.3], [0.7, 0.8]):
        assert fast.layout.post_ids(1, probs) == ref.layout.post_ids(1, probs)
    assert fast.layout.encode_report("small nodule in the right upper lobe .") == \
        ref.layout.encode_report("small nodule in the right upper lobe .")


def test_runtime_tokenizer_matches_smollm2_when_converted():
    """The real LM's chat template and byte-level BPE (only where the converted LM cache exists)."""
    from medvlm.model.lm import cache_dir
    from medvlm.model.runtime import Tokenizer

    path = cache_dir() / "lm" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path}: converted LM cache absent (created by the first training run)")
    from transformers import AutoTokenizer

    ref, fast = AutoTokenizer.from_pretrained(path), Tokenizer(path)
    messages = [{"role": "system", "content": "You are a radiologist."},
                {"role": "user", "content": "Describe the findings. Indication: fever, cough for 5 days."}]
    text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert fast(text)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    ids = ref("Ground-glass opacity in the right lower lobe; no effusion.", add_special_tokens=False)["input_ids"]
    assert fast.decode(ids + [ref.eos_token_id], skip_special_tokens=True) == ref.decode(
        ids + [ref.eos_token_id], skip_special_tokens=True)
    assert (fast.eos_token_id, fast.pad_token_id, fast.bos_token_id) == (
        ref.eos_token_id, ref.pad_token_id if ref.pad_token_id is not None else ref.eos_token_id, ref.bos_token_id)


HEAVY = ("mlflow", "prefect", "great_expectations", "evidently", "dvc", "transformers", "peft", "pandas", "sklearn")


def test_generate_path_imports_no_tracking_or_training_stack(tmp_path):
    """Everything `medvlm generate` imports up to the first report: no MLflow, Prefect, GX, Evidently, DVC, and
    (for a Llama-family LM) no transformers / peft / pandas."""
    cfg = tiny_config(tmp_path)
    from medvlm.model.medvlm import MedVLM as _M  # noqa: F401 (the tiny LM folder exists now)

    torch.manual_seed(0)
    model = MedVLM(cfg, "lora")
    out = tmp_path / "models" / "lora"
    out.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(model.trainable_state_dict(), out / "trainable.safetensors")
    (out / "model_config.json").write_text(json.dumps({"strategy": "lora", "label_names": list(cfg.data.label_names),
                                                      "config": cfg.model_dump(mode="json", by_alias=True)}))
    from PIL import Image

    Image.new("L", (80, 80), 90).save(tmp_path / "one.png")
    # read sys.modules in an exit handler: generate ends through the exit handlers and os._exit (cli._App)
    code = f"""
import atexit, sys
atexit.register(lambda: print("HEAVY", sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))
from medvlm.cli import app
app(["--params", {str(REPO / 'params.yaml')!r}, "-S", "generate.max_new_tokens=6", "generate",
     {str(tmp_path / 'one.png')!r}, "--model", {str(out)!r}, "--format", "json"])
"""
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout, done.stdout[-500:]
    assert '"report"' in done.stdout
