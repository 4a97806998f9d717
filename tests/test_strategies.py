"""Each strategy trains exactly its intended parameters (with the optional clue modules on too); everything else
stays bit-identical after a step. A strategy is one module of medvlm.strategies: adding one is its file and its
params.yaml section."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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
        ("lora", {"train": {"lora": {"target_modules": []}}}, ConfigError, "target_modules is empty"),
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
    cfg = tiny_config(tmp_path, train={"ptuning_v2": {"num_virtual_tokens": 5, "prefix_projection": projection}})
    model = MedVLM(cfg, "ptuning_v2")
    cache = model.prefix_cache(batch_size=3, dtype=torch.float32)
    assert len(cache.layers) == 2
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, 5, 8)  # (batch, kv heads, virtual tokens, head dim) of the tiny Llama
    assert torch.count_nonzero(keys) == 0
    assert sum(p.numel() for p in model.prefix.parameters()) > 0


# (trainable tensors, trainable elements) of the tiny model per strategy, measured before the strategies became
# one module each: the refactor must not move them, in training and runtime builds alike
TRAINABLE = {"freeze": (58, 2777506), "lora": (57, 2768674), "ptuning_v2": (50, 2768418)}


@pytest.mark.parametrize("strategy", sorted(TRAINABLE))
def test_training_and_runtime_builds_train_the_same_parameters(tmp_path, strategy):
    cfg = tiny_config(tmp_path)
    built = {}
    for runtime in (False, True):
        model = MedVLM(cfg, strategy, runtime=runtime)
        assert model.runtime == runtime
        params = dict(model.named_parameters())
        built[runtime] = {n: params[n].numel() for n in model.trainable_names}
    assert built[False] == built[True]
    assert (len(built[False]), sum(built[False].values())) == TRAINABLE[strategy]


def test_the_registry_holds_the_strategy_modules_and_their_described_settings():
    from medvlm.config import TrainConfig
    from medvlm.model import STRATEGIES
    from medvlm.strategies import REGISTRY

    assert STRATEGIES == tuple(REGISTRY) == ("freeze", "lora", "ptuning_v2")
    for name, module in REGISTRY.items():
        assert TrainConfig.model_fields[name].annotation is module.Settings
        assert callable(module.check) and callable(module.apply)
        for field, info in module.Settings.model_fields.items():
            assert info.description, f"train.{name}.{field} has no help text"


def test_a_typo_in_a_strategy_section_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: Extra inputs are not permitted"):
        tiny_config(tmp_path, train={"lora": {"r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj"],
                                              "rank": 2}})
    with pytest.raises(ConfigError, match=r"train\.strategies\.1: Input should be 'freeze', 'lora' or 'ptuning_v2'"):
        tiny_config(tmp_path, train={"strategies": ["lora", "adapterx"]})


NEW_STRATEGY = '''"""norm_tuning: only the LM's final norm trains (added by this file and a params.yaml section)."""

from pydantic import Field

from medvlm.strategies._base import StrategySettings


class Settings(StrategySettings):
    scale: float = Field(gt=0, description="what the norm weights are multiplied by at the start")


def check(settings):
    """Nothing to check beyond the field ranges."""


def apply(model, settings, runtime):
    norm = model.lm.get_decoder().norm
    norm.weight.data.mul_(settings.scale)
    norm.requires_grad_(True)
'''

NEW_STRATEGY_RUN = '''
import json, sys
from pathlib import Path
import medvlm
from medvlm.errors import ConfigError
from medvlm.model.medvlm import MedVLM
from tiny_medvlm import tiny_config

tmp = Path(sys.argv[1])
assert Path(medvlm.__file__).is_relative_to(tmp), medvlm.__file__
cfg = tiny_config(tmp, train={"strategies": ["lora", "norm_tuning"]})
out = {"section": cfg.train.norm_tuning.model_dump(), "strategies": cfg.train.strategies}
for runtime in (False, True):
    model = MedVLM(cfg, "norm_tuning", runtime=runtime)
    out[f"lm_trainable_{runtime}"] = sorted(n for n in model.trainable_names if n.startswith("lm."))
try:
    tiny_config(tmp, train={"norm_tuning": {"lm_lr": None, "scale": 1.0, "scael": 2.0}})
except ConfigError as exc:
    out["typo"] = str(exc)
print(json.dumps(out))
'''


def test_a_new_strategy_is_its_module_and_its_params_section(tmp_path):
    """In a copy of the package: a strategy module dropped into medvlm/strategies/ and a train.<name> section in
    params.yaml, nothing else, make a section Config validates, a train.strategies value and a model build."""
    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "copy"
    shutil.copytree(repo / "src" / "medvlm", root / "src" / "medvlm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "pyproject.toml", root / "pyproject.toml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["norm_tuning"] = {"lm_lr": 2.0e-3, "scale": 0.5}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "src" / "medvlm" / "strategies" / "norm_tuning.py").write_text(NEW_STRATEGY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", NEW_STRATEGY_RUN, str(root)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["section"] == {"lm_lr": 2.0e-3, "scale": 0.5}
    assert out["strategies"] == ["lora", "norm_tuning"]
    assert out["lm_trainable_False"] == out["lm_trainable_True"] == ["lm.model.norm.weight"]
    assert "train.norm_tuning.scael" in out["typo"] and "\n" not in out["typo"]
