"""Clinical indication: phantom indications correlate with the findings (and are off by default), the manifest
carries the optional column, the prompt holds it only with model.indication, CLI and REST pass it through."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlm.config import config_from_dict
from medvlm.data.phantom_study import INDICATIONS, indication_for, sample_study
from medvlm.data.synthesize import synthesize
from medvlm.model.prompt import PromptLayout, indication_text
from tiny_medvlm import make_tokenizer, tiny_config


def _phantom_cfg(tmp_path: Path, **synth):
    return config_from_dict({"synthesize": {"out_dir": str(tmp_path / "phantom"), "incoming_dir": str(tmp_path / "inc"),
                                            "n_images": 6, "n_incoming": 1, "image_size": 64, **synth}})


def test_phantom_indications_off_by_default_and_on_when_asked(tmp_path):
    synthesize(_phantom_cfg(tmp_path / "off"))
    rows = [json.loads(x) for x in (tmp_path / "off" / "phantom" / "annotation.jsonl").read_text().splitlines()]
    assert all("indication" not in r for r in rows)  # the default data set is byte-for-byte what it was
    synthesize(_phantom_cfg(tmp_path / "on", indications=True))
    on = [json.loads(x) for x in (tmp_path / "on" / "phantom" / "annotation.jsonl").read_text().splitlines()]
    assert all(isinstance(r["indication"], str) and r["indication"] for r in on)
    assert [r["report"] for r in on] == [r["report"] for r in rows]  # nothing else moves


def test_phantom_indications_correlate_with_findings():
    hits = {"infection": [0, 0], "normal": [0, 0]}
    for i in range(400):
        rng = np.random.default_rng([0, 0, i, 0])
        _, findings = sample_study(rng, normal=i % 3 == 0)
        text = indication_for(findings, np.random.default_rng([0, 0, i, 3]))
        kind = "normal" if not findings else "infection" if {f["type"] for f in findings} & {
            "ground_glass", "consolidation", "crazy_paving"} else None
        if kind is None:
            continue
        templates = [t.split("{")[0] for t in INDICATIONS[kind]]
        hits[kind][0] += any(text.startswith(t) for t in templates)
        hits[kind][1] += 1
    for kind, (hit, total) in hits.items():
        assert total > 30 and hit / total > 0.6, (kind, hit, total)  # a clue, with noise, not the answer


def test_manifest_keeps_the_optional_column(tmp_path):
    from medvlm.data.sources import load_source

    root = tmp_path / "data"
    root.mkdir()
    Image.new("L", (64, 64), 100).save(root / "a.png")
    rows = [{"image": "a.png", "report": "no finding at all here .", "label": 0, "indication": "fever, cough"},
            {"image": "a.png", "report": "no finding at all here either .", "label": 0}]
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"data": {"root": str(root), "manifest": "m.jsonl", "label_names": ["pneumonia"],
                                     "primary_label": "pneumonia"}})
    df = load_source(cfg)
    assert list(df["indication"].where(df["indication"].notna(), None)) == ["fever, cough", None]
    rows[0].pop("indication")
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "indication" not in load_source(cfg).columns  # manifests without it are unchanged


def test_prompt_holds_the_indication_only_when_on(tmp_path):
    tok = make_tokenizer()
    off = PromptLayout(tok, tiny_config(tmp_path))
    on = PromptLayout(tok, tiny_config(tmp_path, model={"indication": True}))
    assert off.post_ids(0, None, indication="fever , cough") == off.posts[0]
    assert on.post_ids(0, None, indication=None) == on.posts[0]  # a study without indication: the plain prompt
    told = on.post_ids(0, None, indication="fever , cough")
    assert told != on.posts[0] and told[-2:] == on.posts[0][-2:]  # ends with the assistant turn
    assert indication_text(" fever,  cough for 5 days. ") == "Indication: fever, cough for 5 days."
    assert indication_text(None) == "" and indication_text(float("nan")) == ""


class _Recorder:
    def __init__(self):
        self.seen = []

    def predict(self, images, indications=None):
        self.seen.append(indications)
        return [{"report": "ok .", "probabilities": {"pneumonia": 0.5}} for _ in images]


def test_cli_and_rest_pass_the_indication(tmp_path):
    from fastapi.testclient import TestClient

    from medvlm.predict import generate_reports
    from medvlm.serve import create_app

    cfg = config_from_dict({})
    Image.new("L", (64, 64), 90).save(tmp_path / "one.png")
    (tmp_path / "model_config.json").write_text("{}")  # what makes a folder a model folder for --model
    rec = _Recorder()
    out = io.StringIO()
    code = generate_reports([tmp_path / "one.png"], str(tmp_path), cfg, "json", predictor_factory=lambda d, cfg: rec,
                            stdout=out, indication="fever, cough for 5 days")
    assert code == 0 and rec.seen == [["fever, cough for 5 days"]]

    client = TestClient(create_app(rec, cfg, {"model": "fake"}))
    image = base64.b64encode((tmp_path / "one.png").read_bytes()).decode()
    assert client.post("/predict", json={"image": image, "indication": "dyspnoea"}).status_code == 200
    assert client.post("/predict", json={"image": image}).status_code == 200
    with (tmp_path / "one.png").open("rb") as fh:
        assert client.post("/predict", files={"file": fh}, data={"indication": "chest pain"}).status_code == 200
    assert rec.seen[-3:] == [["dyspnoea"], None, ["chest pain"]]
    bad = client.post("/predict", json={"image": image, "indication": 5})
    assert bad.status_code == 422 and "indication" in bad.json()["error"]
    assert client.post("/predict", json={"image": image, "indication": "x" * 5000}).status_code == 422


@pytest.mark.parametrize("prior", [False, True])
def test_training_forward_uses_the_indication(tmp_path, prior):
    import torch

    from medvlm.model.medvlm import MedVLM

    cfg = tiny_config(tmp_path, model={"indication": True, "prior_prompt": prior})
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze").eval()
    feats = torch.rand(2, 192, 2, 2)
    report = model.layout.encode_report("small nodule in the right upper lobe .")
    with torch.no_grad():
        a = model(feats, [report] * 2, torch.zeros(2, 2), [0, 0], indications=["fever", None])["loss"]
        b = model(feats, [report] * 2, torch.zeros(2, 2), [0, 0], indications=[None, None])["loss"]
    assert not torch.isclose(a, b)
