"""The Great Expectations side of the validation stage: one expectation per quarantine reason over the per-row
check columns (medvlm.data.validate computes them), an ephemeral context writing one local Data Docs site, and a
suite run that turns each failed expectation's unexpected rows into row -> reasons."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from medvlm.config import Config
from medvlm.data.sources import SPLITS
from medvlm.errors import ValidationFailed

ROW = "row_idx"

CROSS_ROW = ("duplicate_study_id", "duplicate_image_label_conflict")  # reasons judged after the per-row ones


def expectation_specs(cfg: Config) -> list[tuple[str, str, dict]]:
    """(reason, expectation class name, kwargs). Reasons are what quarantine.csv and the summary count.
    The CROSS_ROW reasons compare rows; they run in a second suite, over the rows that passed the others."""
    vcfg = cfg.validation
    specs = [
        ("load_error", "ExpectColumnValuesToBeNull", {"column": "load_error"}),
        ("report_missing", "ExpectColumnValuesToNotBeNull", {"column": "report_is_text"}),
        ("report_not_text", "ExpectColumnValuesToBeInSet", {"column": "report_is_text", "value_set": [True]}),
        (
            "report_length",
            "ExpectColumnValueLengthsToBeBetween",
            {"column": "report", "min_value": vcfg.min_report_chars, "max_value": vcfg.max_report_chars},
        ),
        ("image_outside_root", "ExpectColumnValuesToBeInSet", {"column": "images_in_root", "value_set": [True]}),
        ("image_missing", "ExpectColumnValuesToBeInSet", {"column": "images_exist", "value_set": [True]}),
        ("image_undecodable", "ExpectColumnValuesToBeInSet", {"column": "images_decode", "value_set": [True]}),
        (
            "image_too_small",
            "ExpectColumnValuesToBeBetween",
            {"column": "image_min_side", "min_value": vcfg.min_image_side},
        ),
        ("label_keys", "ExpectColumnValuesToBeInSet", {"column": "label_keys_match", "value_set": [True]}),
        *(
            ("label_value", "ExpectColumnValuesToBeInSet", {"column": f"label__{name}", "value_set": [0, 1]})
            for name in cfg.data.label_names
        ),
        ("split_value", "ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}),
        *_volume_specs(cfg),
        ("duplicate_study_id", "ExpectColumnValuesToBeInSet", {"column": "study_id_repeat", "value_set": [False]}),
        (
            "duplicate_image_label_conflict",
            "ExpectColumnValuesToBeInSet",
            {"column": "hash_label_conflict", "value_set": [False]},
        ),
    ]
    return specs


def _volume_specs(cfg: Config) -> list[tuple[str, str, dict]]:
    """Volume expectations (volume.*): rows without a volume have None there and are skipped."""
    vol = cfg.volume
    between = "ExpectColumnValuesToBeBetween"
    return [
        ("volume_slices", between, {"column": "volume_slices", "min_value": vol.min_slices, "max_value": vol.max_slices}),
        ("volume_spacing", between, {"column": "volume_spacing_min", "min_value": vol.min_spacing_mm}),
        ("volume_spacing", between, {"column": "volume_spacing_max", "max_value": vol.max_spacing_mm}),
        ("volume_hu_range", between, {"column": "volume_hu_min", "min_value": vol.min_hu, "max_value": vol.air_hu}),
        ("volume_hu_range", between, {"column": "volume_hu_max", "max_value": vol.max_hu}),
        ("volume_shape", between, {"column": "volume_min_side", "min_value": vol.min_side}),
    ]


def gx_context(docs_dir: Path):
    import great_expectations as gx  # imported here: ~5 s, only this stage needs it
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    if docs_dir.exists():
        shutil.rmtree(docs_dir)  # the docs show this run only
    docs_dir.mkdir(parents=True)
    # in-memory stores, one local Data Docs site (no temp-dir default site), no analytics, no progress bars
    site_store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())}
    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            "local": {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": site_store,
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=project, mode="ephemeral")


def run_suite(
    context, name: str, specs: list[tuple[str, str, dict]], checks: pd.DataFrame, schema: list[str]
) -> tuple[list[dict], dict[int, list[str]]]:
    """One suite (named `name`) over the check table: per-expectation results and row index -> reasons."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(gx.expectations.ExpectTableColumnsToMatchSet(column_set=schema, exact_match=False))
    for reason, class_name, kwargs in specs:
        expectation = getattr(gx.expectations, class_name)(**kwargs, meta={"reason": reason})
        suite.add_expectation(expectation)
    suite = context.suites.add(suite)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all_rows")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"validate_{name}",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
        )
    )
    frame = checks.drop(columns=["labels_json"]).reset_index(drop=True)
    result = checkpoint.run(batch_parameters={"dataframe": frame})

    detail = {"image_undecodable": "image_error", "image_missing": "image_error", "image_outside_root": "image_error",
              "load_error": "load_error", **_VOLUME_DETAIL}
    reasons: dict[int, list[str]] = {}
    summaries = []
    for run in result.run_results.values():
        for res in run.results:
            config = res.expectation_config
            reason = (config.meta or {}).get("reason")
            unexpected = res.result.get("unexpected_index_list") or []
            summaries.append(
                {
                    "expectation": config.type,
                    "column": config.kwargs.get("column"),
                    "reason": reason,
                    "success": bool(res.success),
                    "unexpected_count": int(res.result.get("unexpected_count") or 0),
                }
            )
            if reason is None:
                if not res.success:  # a table-level rule: the check columns themselves are wrong (a bug here)
                    raise ValidationFailed(f"validation: {config.type} failed on the row-check table")
                continue
            for hit in unexpected:
                row = int(hit[ROW])
                why = checks.iloc[row][detail[reason]] if reason in detail else None
                reasons.setdefault(row, []).append(f"{reason}: {why}" if why else reason)
    index = list(checks.index)
    return summaries, {index[row]: list(dict.fromkeys(why)) for row, why in reasons.items()}


_VOLUME_DETAIL = {"volume_slices": "volume_detail", "volume_spacing": "volume_detail",
                  "volume_hu_range": "volume_detail", "volume_shape": "volume_detail"}
