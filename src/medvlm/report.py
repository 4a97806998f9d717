"""report: one results table over every evaluated model and baseline, CI bar charts, qualitative examples.

Reads reports/metrics/<name>.json and reports/generations/<name>.jsonl (written by evaluate) and writes
reports/results.md, reports/plots/<metric>.png, reports/examples.html (with, per model with a DEM, the heatmap of
each study's most probable finding over its thumbnail) and reports/summary.json (flat name -> metric -> value, for
`dvc metrics show/diff`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import EvaluationError
from medvlm.paths import RUN_OUTPUTS, rebase_outputs

TABLE_METRICS = ["BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "medvlm_BLEU_4", "medvlm_METEOR",
                 "CE_accuracy", "CE_f1", "CE_auroc", "CE_macro_f1", "DEM_accuracy", "DEM_auroc", "DEM_macro_f1",
                 "collapse_unique_share",
                 "RULE_micro_f1", "RULE_macro_f1"]
# per-label P/R/F1 tables, one per labeler whose figures are in the metrics files
PER_LABEL_FAMILIES = {"CE_": "report labeler (trained) on generated text vs test labels",
                      "RULE_": "rule labeler on generated vs reference reports"}
PLOT_METRICS = ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_f1"]


def _order(cfg: Config, found: list[str]) -> list[str]:
    preferred = [*cfg.train.strategies, *cfg.evaluate.baselines]
    return [n for n in preferred if n in found] + sorted(n for n in found if n not in preferred)


def _cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    if m.get("ci_low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def build_report(cfg: Config) -> dict:
    out = Path(cfg.evaluate.out_dir)
    metrics_dir = out / "metrics"
    results = {}
    for path in sorted(metrics_dir.glob("*.json")) if metrics_dir.is_dir() else []:
        if path.name == "summary.json":
            continue
        try:
            results[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}: not valid JSON ({exc.msg})") from None
    if not results:
        raise EvaluationError(f"{metrics_dir}: no evaluated models or baselines (run `medvlm evaluate NAME` first)")
    names = _order(cfg, list(results))
    hashes = {r.get("test_data_hash") for r in results.values()}
    columns = [m for m in TABLE_METRICS if any(m in results[n]["metrics"] for n in names)]
    lines = [
        "# Results on the test split",
        "",
        f"Mean [{cfg.evaluate.confidence:.0%} bootstrap CI] over {results[names[0]]['n_test']} test images "
        f"({cfg.evaluate.bootstrap_iterations} resamples, seed {cfg.evaluate.bootstrap_seed}).",
        f"Test data hash: `{', '.join(sorted(str(h) for h in hashes))}`"
        + ("  **(differs between rows: not comparable)**" if len(hashes) > 1 else ""),
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(results[n]["metrics"].get(m)) for m in columns) + " |")
    first = results[names[0]]
    lines += ["", "## Conventions", ""]
    lines += [f"- **{k}**: {v}" for k, v in first.get("conventions", {}).items()]
    quality = first.get("clinical_efficacy", {}).get("labeler_reference_quality")
    lines += ["", "## Clinical efficacy", "",
              "CE_* = the report labeler applied to the generated text, against the test labels. DEM_* = the model's own "
              "label probabilities from the image (retrieval: the neighbour's labels)."]
    if quality:
        lines.append(f"Labeler on the test split's reference reports: accuracy {quality['accuracy']:.3f}, "
                     f"micro F1 {quality['micro_f1']:.3f}, macro F1 {quality['macro_f1']:.3f} (n = {quality['n']}).")
    else:
        lines.append("No labeler was trained: CE_* figures are absent.")
    lines += per_label_tables(cfg.data.label_names, names, results)
    lines += chain_table(cfg.data.label_names, names, results)
    lines += collapse_table(names, results)
    lines += ["", "oracle picks the best training report by looking at the references: a ceiling, not a method.", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")
    plots = _plots(out / "plots", names, results)
    examples = _examples(cfg, out, names)
    summary = {n: {k: m["value"] for k, m in results[n]["metrics"].items() if m.get("value") is not None} for n in names}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return {"results": str(out / "results.md"), "plots": plots, "examples": str(examples),
            "summary": str(out / "summary.json"), "models": names}


def per_label_tables(label_names: list[str], names: list[str], results: dict) -> list[str]:
    """Markdown: per labeler family, one row per label (+ micro, macro), one `P / R / F1` column per model."""
    lines = []
    for prefix, what in PER_LABEL_FAMILIES.items():
        shown = [n for n in names if f"{prefix}micro_f1" in results[n]["metrics"]]
        if not shown:
            continue
        lines += ["", f"### Per-label clinical efficacy: {what} (precision / recall / F1)", "",
                  "| label | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for label in [*label_names, "micro", "macro"]:
            cells = []
            for n in shown:
                m = results[n]["metrics"]
                values = [m.get(f"{prefix}{label}_{k}", {}).get("value") for k in ("precision", "recall", "f1")]
                cells.append(" / ".join("–" if v is None else f"{v:.2f}" for v in values))
            lines.append(f"| {label if label in label_names else f'**{label}**'} | " + " | ".join(cells) + " |")
    return lines


def chain_table(label_names: list[str], names: list[str], results: dict) -> list[str]:
    """Markdown: per label, where a finding is kept or lost: the DEM from the image (AUROC, F1 at its per-label
    threshold), the text (labeler on the generated report, F1), and how the text follows the DEM."""
    shown = [n for n in names if "DEM_macro_f1" in results[n]["metrics"] and "CE_macro_f1" in results[n]["metrics"]]
    if not shown:
        return []
    lines = ["", "### Per-finding chain: image (DEM AUROC / F1) -> text (CE F1), and following", "",
             "DEM = the discrimination module on the image, cut at per-label thresholds chosen on the training split; "
             "CE = the report labeler on the generated text; written = P(written | detected), unsupported = "
             "P(not detected | written).", "",
             "| label | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for label in [*label_names, "macro"]:
        cells = []
        for n in shown:
            m = results[n]["metrics"]

            def v(key):
                value = m.get(key, {}).get("value")
                return "–" if value is None else f"{value:.2f}"

            cells.append(f"DEM {v(f'DEM_{label}_auroc')} / {v(f'DEM_{label}_f1')} · CE {v(f'CE_{label}_f1')} · "
                         f"written {v(f'follow_{label}_written')} · unsupported {v(f'follow_{label}_unsupported')}")
        lines.append(f"| {label if label in label_names else f'**{label}**'} | " + " | ".join(cells) + " |")
    return lines


COLLAPSE_COLUMNS = ["collapse_unique_share", "collapse_distinct_1", "collapse_distinct_2", "collapse_train_copy_rate",
                    "collapse_nearest_train_bleu4"]


def collapse_table(names: list[str], results: dict) -> list[str]:
    """Markdown: diversity and copying of every model's and baseline's generations, with a warning per collapse."""
    from medvlm.chain_metrics import COLLAPSE_UNIQUE_SHARE, collapsed

    shown = [n for n in names if "collapse_unique_share" in results[n]["metrics"]]
    if not shown:
        return []
    lines = ["", "### Collapse check (unique share, distinct-1/2, exact copies of a training report, BLEU-4 against "
             "the nearest training report)", "",
             "| model | " + " | ".join(c.removeprefix("collapse_") for c in COLLAPSE_COLUMNS) + " |",
             "|---|" + "---|" * len(COLLAPSE_COLUMNS)]
    for n in shown:
        m = results[n]["metrics"]
        lines.append(f"| {n} | " + " | ".join(_cell(m.get(c)) for c in COLLAPSE_COLUMNS) + " |")
    warned = [n for n in shown if collapsed(results[n]["metrics"])]
    lines += [""] + [f"**Warning: {n} collapsed** (unique share "
                     f"{results[n]['metrics']['collapse_unique_share']['value']:.2f} < {COLLAPSE_UNIQUE_SHARE}): "
                     + ("one fixed text by construction." if n == "consensus" else
                        "it writes nearly the same report for every image, whatever its n-gram scores.")
                     for n in warned]
    return lines


def _plots(folder: Path, names: list[str], results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in PLOT_METRICS:
        rows = [(n, results[n]["metrics"].get(metric)) for n in names]
        rows = [(n, m) for n, m in rows if m and m.get("value") is not None]
        if not rows:
            continue
        values = [m["value"] for _, m in rows]
        low = [m["value"] - (m["ci_low"] if m.get("ci_low") is not None else m["value"]) for _, m in rows]
        high = [(m["ci_high"] if m.get("ci_high") is not None else m["value"]) - m["value"] for _, m in rows]
        fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.2))
        ax.bar([n for n, _ in rows], values, yerr=[low, high], capsize=4, color="#4c72b0")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (bootstrap CI)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        path = folder / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def _thumbnail_image(cfg: Config, rel_paths: list[str]):
    from medvlm.data.images import load_images_for_study
    from medvlm.errors import DataError

    try:
        img = load_images_for_study(cfg.data.root, rel_paths)[0]
    except DataError:  # the examples page must not fail because one image moved; it says so instead
        return None
    img.thumbnail((cfg.evaluate.examples_thumbnail, cfg.evaluate.examples_thumbnail))
    return img


def _slice_thumbnail(cfg: Config, rel_paths: list[str], z: int):
    """Axial slice z of a volume study's first view, loaded as the model saw it (medvlm.data.volumes.load_volume,
    volume.shape), in the radiological view, thumbnail-sized; None when it cannot be loaded."""
    from medvlm.data.images import resolve_in_root
    from medvlm.data.volumes import load_volume
    from medvlm.errors import DataError
    from medvlm.explain_volume import slice_image

    try:
        volume = load_volume(resolve_in_root(cfg.data.root, rel_paths[0]), cfg.volume)
        img = slice_image(volume, int(z))
    except (DataError, OSError, RuntimeError, IndexError, ValueError):  # as for the thumbnail: the page says so instead of failing
        return None
    img.thumbnail((cfg.evaluate.examples_thumbnail, cfg.evaluate.examples_thumbnail))
    return img


def _png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _heatmap_cell(thumb, heatmap: dict | None) -> str:
    """The generation's heatmap (its most probable finding, from evaluate) over the thumbnail, as a JPEG (a page of
    colour PNGs per model and row grows large); "" without either."""
    if thumb is None or not heatmap or not heatmap.get("grid"):
        return ""
    from medvlm.explain import encode, overlay, upsample

    img = overlay(thumb, upsample(heatmap["grid"], thumb.size))
    data = base64.b64encode(encode(img, "JPEG")).decode("ascii")
    where = f", slice z={int(heatmap['slice'])}" if heatmap.get("slice") is not None else ""
    return (f"<br><img src='data:image/jpeg;base64,{data}' alt='heatmap'><div class='p'>heatmap: "
            f"{html.escape(str(heatmap['label']))} {float(heatmap['probability']):.2f}{where}</div>")


def _examples(cfg: Config, out: Path, names: list[str]) -> Path:
    from medvlm.manifest import read_manifest

    test_path = Path(cfg.split.out_dir) / "test.jsonl"
    images = {}
    if test_path.is_file():
        test = read_manifest(test_path)
        images = {str(s): list(i) for s, i in zip(test["study_id"], test["images"])}
    generations = {}
    for n in names:
        path = out / "generations" / f"{n}.jsonl"
        if path.is_file():
            generations[n] = {r["study_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    ids = next(iter(generations.values())).keys() if generations else []
    parts = ["<!doctype html><meta charset='utf-8'><title>medvlm examples</title>",
             "<style>body{font-family:sans-serif} td{vertical-align:top;border-bottom:1px solid #ccc;padding:4px}"
             " .p{color:#555;font-size:85%}</style><h1>Test-set examples</h1><table>"]
    slice_thumbs: dict[tuple[str, int], object] = {}  # a volume's heatmap is drawn over its own slice
    for sid in ids:
        thumb = _thumbnail_image(cfg, images[sid]) if sid in images else None
        first = next(iter(generations.values()))[sid]
        img = f"<img src='data:image/png;base64,{_png(thumb)}'>" if thumb is not None else "(image unavailable)"
        cells = [f"<td>{img}<br>{html.escape(sid)}</td>",
                 "<td><b>reference</b><br>" + "<hr>".join(html.escape(r) for r in first["references"]) + "</td>"]
        for n, gens in generations.items():
            g = gens.get(sid, {})
            probs = ", ".join(f"{k} {v:.2f}" for k, v in (g.get("probabilities") or {}).items())
            heat, base = g.get("heatmap"), thumb
            if heat and heat.get("slice") is not None:
                key = (sid, int(heat["slice"]))
                if key not in slice_thumbs:
                    slice_thumbs[key] = _slice_thumbnail(cfg, images[sid], key[1]) if sid in images else None
                base = slice_thumbs[key]
            cells.append(f"<td><b>{html.escape(n)}</b><br>{html.escape(g.get('generated', ''))}"
                         f"<div class='p'>{html.escape(probs)}</div>{_heatmap_cell(base, heat)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    path = out / "examples.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def build_ablation_table(cfg: Config, strategy: str, variants: list[str], root: str | Path = "runs/ablation") -> Path:
    """reports/ablation.md: the full model vs each variant, a run of `medvlm --out-root <root>/<variant>`
    (its metrics: <root>/<variant>/reports/metrics/<strategy>.json).

    Variants are the same strategy re-trained with one switch flipped (see `make ablation`); the full model's row is
    the main pipeline's evaluation, so every row is scored on the same test split (hashes are checked).
    """
    out = Path(cfg.evaluate.out_dir)
    rows = {"full": out / "metrics" / f"{strategy}.json"}
    for v in variants:
        variant_reports = Path(rebase_outputs(cfg, Path(root) / v, RUN_OUTPUTS).evaluate.out_dir)
        rows[v] = variant_reports / "metrics" / f"{strategy}.json"
    results = {}
    for label, path in rows.items():
        if not path.is_file():
            raise EvaluationError(f"{path}: missing (evaluate the {label!r} variant first)")
        results[label] = json.loads(path.read_text(encoding="utf-8"))
    hashes = {r.get("test_data_hash") for r in results.values()}
    if len(hashes) > 1:
        raise EvaluationError(f"ablation rows were scored on different test splits: {sorted(map(str, hashes))}")
    columns = [m for m in TABLE_METRICS if m in results["full"]["metrics"]]
    lines = [f"# Ablation of `{strategy}`", "",
             f"Mean [{cfg.evaluate.confidence:.0%} bootstrap CI], test data hash `{hashes.pop()}`.", "",
             "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(_cell(r["metrics"].get(m)) for m in columns) + " |")
    path = out / "ablation.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
