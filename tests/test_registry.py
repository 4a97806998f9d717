"""Registry: pyfunc wrapper, registration, the champion/challenger gate, racing promotions, --model resolution."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lifecycle_fakes import FACTORY, LABELS, make_model_dir, write_png
from medvlm.config import config_from_dict
from medvlm.errors import ModelError, RegistryError
from medvlm.selection import decide_promotion, metric_ci, metric_value, pick_best
from medvlm.resolve import resolve_model

TESTS = Path(__file__).resolve().parent


def make_cfg(root: Path, **register):
    return config_from_dict(
        {
            "data": {"label_names": LABELS, "primary_label": LABELS[0]},
            "train": {"strategies": ["freeze", "lora"], "out_dir": str(root / "models")},
            "evaluate": {"out_dir": str(root / "reports")},
            "split": {"out_dir": str(root / "split")},
            "register": {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "cache_dir": str(root / "cache"), **register},
        }
    )


def write_candidate(cfg, strategy: str, cider: float, bleu: float, bias: float, data_hash: str = "testhash") -> None:
    make_model_dir(Path(cfg.train.out_dir) / strategy, bias=bias)
    metrics = Path(cfg.evaluate.out_dir) / "metrics" / f"{strategy}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"CIDEr": {"value": cider, "ci": [cider - 0.1, cider + 0.1]}, "BLEU_4": bleu,
                                   "test_data_hash": data_hash}))


def view(version, primary, tie=0.0, data_hash="h"):
    return {"version": version, "primary": primary, "tie_break": tie, "data_hash": data_hash}


def test_gate_decisions():
    assert decide_promotion(view("1", 0.5), None, 0.0)[0]
    assert decide_promotion(view("2", 0.6), view("1", 0.5), 0.0)[0]
    assert not decide_promotion(view("2", 0.4), view("1", 0.5), 0.0)[0]
    assert not decide_promotion(view("2", 0.55), view("1", 0.5), 0.1)[0]  # margin not reached
    assert decide_promotion(view("2", 0.5, tie=0.3), view("1", 0.5, tie=0.2), 0.0)[0]  # tie-break
    assert not decide_promotion(view("2", 0.5, tie=0.2), view("1", 0.5, tie=0.2), 0.0)[0]  # a tie keeps the champion
    promote, reason = decide_promotion(view("2", 0.9, data_hash="a"), view("1", 0.1, data_hash="b"), 0.0)
    assert not promote and "not comparable" in reason


def test_metric_parsing_and_pick_best():
    m = {"metrics": {"CIDEr": {"value": 0.4, "ci_low": 0.3, "ci_high": 0.5}}, "BLEU_4": 0.2}
    assert metric_value(m, "CIDEr") == 0.4 and metric_value(m, "BLEU_4") == 0.2 and metric_value(m, "x") is None
    assert metric_ci(m, "CIDEr") == (0.3, 0.5)
    best = pick_best([{"strategy": "a", "primary": 0.5, "tie_break": 0.1}, {"strategy": "b", "primary": 0.5, "tie_break": 0.2}])
    assert best["strategy"] == "b"
    with pytest.raises(RegistryError):
        pick_best([])


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """One tracking store shared by the scenario tests below (creating a sqlite store costs ~3 s)."""
    from medvlm.registry import register

    root = tmp_path_factory.mktemp("registry")
    cfg = make_cfg(root)
    write_candidate(cfg, "freeze", 0.30, 0.10, bias=0.0)
    write_candidate(cfg, "lora", 0.50, 0.20, bias=0.1)
    first = register(cfg, predictor_factory=FACTORY)
    return root, cfg, first


def test_first_registration_becomes_champion_with_card(lifecycle):
    from mlflow import MlflowClient

    root, cfg, first = lifecycle
    assert first["registered"]["strategy"] == "lora" and first["decision"]["promoted"]
    assert first["champion"]["version"] == first["challenger"] == "1"
    saved = json.loads((Path(cfg.evaluate.out_dir) / "registry.json").read_text())
    assert saved["champion"]["version"] == "1"
    client = MlflowClient(cfg.register.tracking_uri)
    version = client.get_model_version("medvlm", "1")
    assert "testhash" in version.description and "CIDEr" in version.description
    assert version.tags["metric.CIDEr"] == "0.5" and version.tags["data_hash"] == "testhash"
    model_dir = resolve_model("champion", cfg)
    assert json.loads((model_dir / "model_config.json").read_text())["bias"] == 0.1
    card = model_dir.parent / "model_card.md"  # the card travels inside the registered model
    assert "Limits" in card.read_text() and "testhash" in card.read_text()


def test_pyfunc_predict_on_fake(lifecycle, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    root, cfg, _ = lifecycle
    model = mlflow.pyfunc.load_model("models:/medvlm@champion")
    png = write_png(tmp_path / "a.png", value=200)
    frame = pd.DataFrame({"image": [base64.b64encode(png.read_bytes()).decode()]})
    out = model.predict(frame)
    assert list(out.columns) == ["report", "prob_pneumonia", "prob_nodule"]
    assert "consolidation" in out.loc[0, "report"] and out.loc[0, "prob_nodule"] > 0.8
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"]
    assert sig.params.to_dict() == [{"name": "explain", "type": "boolean", "default": False, "shape": None}]
    # the param reaches the wrapper (MLflow drops undeclared ones): the fake has nothing to explain, one line
    with pytest.raises(ModelError, match="cannot produce heatmaps") as err:
        model.predict(frame, params={"explain": True})
    assert "\n" not in str(err.value)


def test_worse_is_not_promoted_better_is_and_repeats_change_nothing(lifecycle):
    from medvlm.registry import promote, register

    root, cfg, _ = lifecycle
    write_candidate(cfg, "lora", 0.40, 0.20, bias=0.2)  # new weights, worse score
    worse = register(cfg, predictor_factory=FACTORY)
    assert worse["challenger"] == "2" and not worse["decision"]["promoted"]
    assert worse["champion"]["version"] == "1" and "does not beat" in worse["decision"]["reason"]

    write_candidate(cfg, "lora", 0.70, 0.20, bias=0.3)  # better
    better = register(cfg, predictor_factory=FACTORY)
    assert better["decision"]["promoted"] and better["champion"]["version"] == "3"

    again = register(cfg, predictor_factory=FACTORY)  # same weights, same test set: no new version
    assert again["registered"]["reused_existing_version"] and again["registered"]["version"] == "3"
    assert again["champion"]["version"] == "3"
    same = promote(cfg, "3")
    assert same["decision"]["changed"] is False and same["champion"]["version"] == "3"
    with pytest.raises(RegistryError):
        promote(cfg, "99")


def test_racing_gated_promotions_leave_the_best_champion(lifecycle):
    """Versions 2 (0.40) and 3 (0.70) race against champion 1 (0.50): whatever the order, 3 must win. A smoke test
    (no errors, one champion): with these scores every interleaving ends with 3, lock or not; the race that needs
    the lock is forced in test_racing_challengers_that_both_beat_the_champion."""
    from medvlm.registry import champion_version, promote

    root, cfg, _ = lifecycle
    promote(cfg, "1")  # by hand: reset the champion
    errors = []

    def run(version):
        try:
            promote(cfg, version, gate=True)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in ("3", "2", "3", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and champion_version(cfg) == "3"

    # and two OS processes promoting by hand: exactly one wins, the store stays consistent
    promote(cfg, "1")
    code = (
        "import sys; sys.path.insert(0, %r); from test_registry import make_cfg; from medvlm.registry import promote;"
        "from pathlib import Path; promote(make_cfg(Path(%r)), sys.argv[1])"
    ) % (str(TESTS), str(root))
    procs = [subprocess.Popen([sys.executable, "-c", code, v]) for v in ("2", "3")]
    assert all(p.wait(timeout=90) == 0 for p in procs)
    assert champion_version(cfg) in {"2", "3"}


def _race_two_challengers(cfg, monkeypatch, first: str, second: str, wait_s: float = 2.0) -> None:
    """Gated promotions of `first` and `second`, forced to interleave where a race would hurt: `first` reads the
    champion, then waits (up to wait_s) until `second` has read it too; `second` swaps only after `first` is
    done. With the promotion lock `second` cannot read before `first` is done, so the waits just time out."""
    from medvlm import registry

    first_read, second_read, first_done = threading.Event(), threading.Event(), threading.Event()
    gate = registry.decide_promotion  # called between reading the champion and swapping the alias

    def slow_gate(challenger, champion, margin):
        if challenger["version"] == first:
            first_read.set()
            second_read.wait(wait_s)
        else:
            second_read.set()
            first_done.wait(wait_s)
        return gate(challenger, champion, margin)

    monkeypatch.setattr(registry, "decide_promotion", slow_gate)
    errors = []

    def run(version, done=None):
        try:
            registry.promote(cfg, version, gate=True)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    threads = [threading.Thread(target=run, args=(first, first_done)), threading.Thread(target=run, args=(second,))]
    threads[0].start()
    assert first_read.wait(60)
    threads[1].start()
    for t in threads:
        t.join(timeout=90)
    assert not errors and not any(t.is_alive() for t in threads)


def _disagreements(cfg) -> list[str]:
    """Where the champion alias, reports/registry.json and the version tags tell different stories."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.register.tracking_uri)
    name = cfg.register.model_name
    alias = str(client.get_model_version_by_alias(name, "champion").version)
    problems = []
    saved = json.loads((Path(cfg.evaluate.out_dir) / "registry.json").read_text())
    if saved["champion"]["version"] != alias:
        problems.append(f"registry.json names v{saved['champion']['version']}, the alias v{alias}")
    standing = sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")
                      if v.tags.get("gate") == "promoted" and "superseded_by" not in v.tags)
    if standing != [alias]:
        problems.append(f"tags: promoted and never superseded {standing}, the alias v{alias}")
    return problems


def test_racing_challengers_that_both_beat_the_champion(lifecycle, monkeypatch):
    """Champion v2 (0.40); v3 (0.70) and v1 (0.50) both beat it. v3 reads the champion first and v1 swaps last:
    only the lock (the champion re-read inside it) stops v1 from replacing v3."""
    from medvlm.registry import champion_version, promote

    root, cfg, _ = lifecycle
    promote(cfg, "2")  # by hand
    assert not _disagreements(cfg)
    _race_two_challengers(cfg, monkeypatch, first="3", second="1")
    assert champion_version(cfg) == "3"
    assert not _disagreements(cfg)
    saved = json.loads((Path(cfg.evaluate.out_dir) / "registry.json").read_text())
    assert saved["champion"]["primary"] == 0.7


def test_the_race_test_detects_a_missing_lock(lifecycle, monkeypatch):
    """The same race with the lock replaced by a no-op: v1 (0.50) ends as champion over v3 (0.70), and v3's tags
    still say it was promoted and never superseded. So the test above fails without the lock."""
    from contextlib import nullcontext

    from medvlm import registry

    root, cfg, _ = lifecycle
    registry.promote(cfg, "2")
    with monkeypatch.context() as patched:
        patched.setattr(registry, "promotion_lock", lambda cfg: nullcontext())
        _race_two_challengers(cfg, patched, first="3", second="1")
    assert registry.champion_version(cfg) == "1"
    assert any("tags" in problem for problem in _disagreements(cfg))
    registry.promote(cfg, "3")  # by hand: leave the store as the lock would have


def test_resolve_model_specs(lifecycle, tmp_path):
    root, cfg, _ = lifecycle
    local = make_model_dir(tmp_path / "local")
    assert resolve_model(str(local), cfg) == local
    by_version = resolve_model("1", cfg)
    assert json.loads((by_version / "model_config.json").read_text())["bias"] == 0.1
    assert resolve_model("models:/medvlm/1", cfg) == by_version  # cached download reused
    with pytest.raises(RegistryError, match="not in the registry"):
        resolve_model("nosuchalias", cfg)
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path), cfg)  # a folder without model_config.json


def test_missing_or_unreachable_store_is_one_line_error(tmp_path):
    from medvlm.registry import register

    cfg = make_cfg(tmp_path)
    with pytest.raises(RegistryError, match="no tracking store"):
        resolve_model("champion", cfg)
    write_candidate(cfg, "freeze", 0.3, 0.1, bias=0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    down = make_cfg(tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(RegistryError, match="unreachable") as err:
        register(down, predictor_factory=FACTORY)
    assert "\n" not in str(err.value)
    missing_dir = make_cfg(tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'no' / 'where.db'}")
    with pytest.raises(RegistryError, match="does not exist"):
        register(missing_dir, predictor_factory=FACTORY)
    assert not (Path(cfg.evaluate.out_dir) / "registry.json").exists()


def test_resolve_champion_follows_promotion_and_skips_mlflow_once_cached(lifecycle):
    """The alias is read from the store on every call (a new champion is picked up at once); a version already
    downloaded is resolved by one sqlite query, without importing MLflow."""
    from medvlm.registry import promote

    root, cfg, _ = lifecycle
    promote(cfg, "1")
    assert json.loads((resolve_model("champion", cfg) / "model_config.json").read_text())["bias"] == 0.1
    promote(cfg, "3")
    assert json.loads((resolve_model("champion", cfg) / "model_config.json").read_text())["bias"] == 0.3
    code = (
        "import sys; from medvlm.config import config_from_dict; from medvlm.resolve import resolve_model;"
        "cfg = config_from_dict({'register': {'tracking_uri': %r, 'cache_dir': %r}});"
        "print(resolve_model('champion', cfg).relative_to(cfg.register.cache_dir).parts[0]);"
        "print('mlflow' in sys.modules, 'pandas' in sys.modules)"
    ) % (cfg.register.tracking_uri, cfg.register.cache_dir)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split() == ["medvlm-v3", "False", "False"]
    promote(cfg, "1")  # both versions are cached now: the cache must not keep serving the old champion (v3)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split() == ["medvlm-v1", "False", "False"]
    with pytest.raises(RegistryError, match="not in the registry"):
        resolve_model("models:/medvlm/42", cfg)
