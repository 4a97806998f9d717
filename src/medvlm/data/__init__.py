"""Data layer: sources -> one manifest shape -> validation (Great Expectations) -> leak-free split.

    sources.py     load_source(cfg): COV-CTR, R2Gen annotation.json, generic CSV/JSONL -> manifest DataFrame
    images.py      load_image(path): every image format (and DICOM) -> one grayscale PIL image; hashing; root guard
    validate.py    run_validation(cfg): per-row checks, quarantine with reasons, Data Docs, validated.jsonl
    split.py       run_split(cfg): seeded, stratified, grouped train/test split with a leakage check
    fetch.py       fetch_dataset(name, dest): download public data sets with checksum verification
    synthesize.py  synthesize(cfg): embedded synthetic CT data for CPU runs and tests, slices (phantom.py) or
                   volumes (phantom3d.py), findings sampled by phantom_study.py
"""
