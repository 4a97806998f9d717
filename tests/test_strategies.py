"""Each strategy trains exactly its intended parameters (with the optional clue modules on too); everything else
stays bit-identical after a step."""

import pytest
import torch
from tiny_medvlm import REPORTS, TRUNK_SHAPE, tiny_config

from medvlm.errors import ConfigError, ModelError
from medvlm.model.medvlm import MedVLM
from medvlm.model.strategies import check_strategy

ALWAYS = ("vision.tail.", "dem.", "bridge.", "clues.")
# new modules that are on only when configured: with them on they must train under every strategy
OPTIONAL_MODULES = {"plain": {}, "clues+prior": {"clues": True, "prior_prompt": True},
                    "clues, own classifier": {"clues": True, "discrimination": False}}


def _intended(name: str, strategy: str) -> bool:
    if name.startswith(ALWAYS):
        return True
    if strategy == "freeze":
        return name.startswith("lm.model.layers.1.")  # trainable_lm_layers [-1] of a 2-layer LM
    if strategy == "lora":
        return "lora_" in name
    return name.startswith("prefix.")


def _step(model: MedVLM) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    feats = torch.randn(2, *TRUNK_SHAPE)
    out = model(feats, [model.layout.encode_report(r) for r in REPORTS[:2]], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    out["loss"].backward()
    opt.step()


@pytest.mark.parametrize("modules", sorted(OPTIONAL_MODULES))
@pytest.mark.parametrize("strategy", ["freeze", "lora", "ptuning_v2"])
def test_exactly_the_intended_parameters_train(tmp_path, strategy, modules):
    torch.manual_seed(0)
    model = MedVLM(tiny_config(tmp_path, model=OPTIONAL_MODULES[modules]), strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    assert trainable == {n for n in names if _intended(n, strategy)}
    assert any(not n.startswith(ALWAYS) for n in trainable)  # the strategy adds LM-side parameters
    assert any(n.startswith("clues.") for n in trainable) == ("clues" in modules)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
            if name.startswith("clues."):  # a real gradient, not only weight decay moving it
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # LoRA A is zero-gradient until B moves; all else that trains must have moved after one step
    assert {n for n in trainable if "lora_A" not in n} <= changed
    assert changed <= trainable


def test_frozen_lm_weights_are_the_pretrained_ones(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = MedVLM(cfg, "lora")
    _step(model)
    from medvlm.model.lm import load_lm

    fresh, _ = load_lm(cfg.model)
    base = {k: v for k, v in model.lm.state_dict().items() if "lora_" not in k}
    for key, value in fresh.state_dict().items():
        peft_key = key.replace(".q_proj.weight", ".q_proj.base_layer.weight").replace(".v_proj.weight", ".v_proj.base_layer.weight")
        assert torch.equal(base[peft_key], value), key


def test_tune_vision_blocks_zero_freezes_the_whole_encoder(tmp_path):
    model = MedVLM(tiny_config(tmp_path, model={"tune_vision_blocks": 0}), "lora")
    assert not any(p.requires_grad for p in model.vision.parameters())


@pytest.mark.parametrize(
    "strategy, sections, error, match",
    [
        ("adapterx", {}, ConfigError, "unknown"),
        ("freeze", {"train": {"freeze": {"trainable_lm_layers": [5]}}}, ConfigError, "trainable_lm_layers"),
        ("freeze", {"train": {"freeze": {"trainable_lm_layers": []}}}, ConfigError, "empty"),
        ("lora", {"train": {"lora": {"target_modules": ["not_a_module"]}}}, ModelError, "target_modules"),
        ("lora", {"model": {"lm_layers": 9}}, ConfigError, "lm_layers"),
    ],
)
def test_impossible_strategy_settings_fail_in_one_line(tmp_path, strategy, sections, error, match):
    cfg = tiny_config(tmp_path, **{k: {**tiny_config(tmp_path).model_dump()[k], **v} for k, v in sections.items()})
    with pytest.raises(error, match=match) as info:
        MedVLM(cfg, strategy)
    assert "\n" not in str(info.value)


def test_unknown_strategy_fails_before_any_model_is_built(tmp_path, monkeypatch):
    import medvlm.model.medvlm as assembly

    monkeypatch.setattr(assembly, "load_lm", lambda *a: pytest.fail("loaded the LM for a bad strategy"))
    with pytest.raises(ConfigError):
        check_strategy(tiny_config(tmp_path), "prompt_tuning")
    with pytest.raises(ConfigError):
        MedVLM(tiny_config(tmp_path), "prompt_tuning")


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_cache_geometry_and_zero_start(tmp_path, projection):
    """P-Tuning v2 prefixes: one (key, value) pair per layer shaped like the LM's KV heads, zero at the start."""
    from medvlm.model.strategies import PrefixKV

    model = MedVLM(tiny_config(tmp_path), "lora")
    prefix = PrefixKV(model.lm, num_virtual_tokens=5, projection=projection)
    cache = prefix.cache(batch_size=3, dtype=torch.float32)
    assert len(cache.layers) == 2
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 8)  # (batch, kv heads, virtual tokens, head dim) of the tiny Llama
    assert torch.count_nonzero(keys) == 0
    assert sum(p.numel() for p in prefix.parameters()) > 0
