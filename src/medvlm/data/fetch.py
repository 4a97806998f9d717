"""Download public data sets with checksum verification and lay them out as the loaders expect.

`medvlm data fetch cov-ctr --dest data/cov_ctr` -> data/cov_ctr/{images/, annotation.jsonl, fetch.json}, the same
layout as the COV-CTR copy the project was built on. DATASETS below is the one place where URLs and checksums live.
A checksum of None means none is published: the file is accepted and its computed sha256 is printed (and kept
in fetch.json) so it can be pinned here.

Downloads stream into `<file>.part` and are renamed only after the checksum matched, so an interrupted run
resumes (HTTP Range) or restarts cleanly and never leaves a half file under the final name.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from medvlm.data.images import file_sha256, resolve_in_root
from medvlm.errors import DataError, first_line

_CHUNK = 1 << 20

# name -> files (file name -> url, sha256 or None) and the builder that turns the downloads into the layout
DATASETS: dict[str, dict] = {
    "cov-ctr": {
        "files": {
            # reports (Chinese findings + English translation, COVID column); sha256 of the served text
            "reports_ZH_EN.csv": {
                "url": "https://raw.githubusercontent.com/havecats/CLIP-Medical-Report-Generation/"
                "15deeffacad77db7b88bca494b78e6c628379e08/data/COV-CTR/reports_ZH_EN.csv",
                "sha256": "9f7cee1cbd407f6015e21a72f658c7e0b52c78ae3761f9f0d26cd0743f6bcc92",
            },
            # the images: UCSD-AI4H/COVID-CT release zips (folder = label); no published checksum
            "CT_COVID.zip": {
                "url": "https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/Images-processed/CT_COVID.zip",
                "sha256": None,
            },
            "CT_NonCOVID.zip": {
                "url": "https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/Images-processed/CT_NonCOVID.zip",
                "sha256": None,
            },
        },
        "builder": "cov_ctr",
    },
}


def fetch_dataset(
    name: str,
    dest: str | Path,
    sources: dict[str, dict] | None = None,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    echo: Callable[[str], None] = print,
) -> Path:
    """Download data set `name` into `dest` (downloads/ kept for resumes) and build its layout; return dest.

    sources: per-file overrides of DATASETS[name]["files"] ({"file": {"url": ..., "sha256": ...}}).
    base_url: fetch every file from `<base_url>/<file name>` instead (a mirror, or a local server in tests).
    """
    key = name.lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"{name}: unknown data set (known: {', '.join(sorted(DATASETS))})")
    spec = DATASETS[key]
    files = {fname: dict(entry) for fname, entry in spec["files"].items()}
    for fname, entry in (sources or {}).items():
        files.setdefault(fname, {}).update(entry)
    dest = Path(dest)
    downloads = dest / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for fname, entry in files.items():
        url = f"{base_url.rstrip('/')}/{fname}" if base_url else entry["url"]
        digest = download(url, downloads / fname, entry.get("sha256"), timeout=timeout, echo=echo)
        checksums[fname] = {"url": url, "sha256": digest}
    built = _BUILDERS[spec["builder"]](downloads, dest)
    record = {"dataset": key, "files": checksums, **built}
    (dest / "fetch.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    echo(f"{key}: {built['rows']} rows, {built['images']} images -> {dest}")
    return dest


def download(
    url: str, target: Path, sha256: str | None, *, timeout: float = 60.0, echo: Callable[[str], None] = print
) -> str:
    """Stream `url` to `target` via `target.part`, verify sha256 (when known); return the file's sha256."""
    if target.is_file():
        got = file_sha256(target)
        if sha256 is None or got == sha256:
            echo(f"{target.name}: already present (sha256 {got})")
            return got
        echo(f"{target.name}: present but sha256 {got} != {sha256}; downloading again")
        target.unlink()
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "medvlm-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the range: start over
            expected_len = response.headers.get("Content-Length")
            with part.open("ab" if offset else "wb") as fh:
                shutil.copyfileobj(response, fh, _CHUNK)
    except HTTPError as exc:
        if not (exc.code == 416 and offset):  # 416 on a resume: the part file is already complete
            raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        expected_len = None
    except (URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"{url}: download failed ({reason}); run again to resume") from None
    if expected_len is not None and part.stat().st_size < offset + int(expected_len):
        raise DataError(f"{url}: download interrupted at {part.stat().st_size} bytes; run again to resume")
    got = file_sha256(part)
    if sha256 is not None and got != sha256:
        part.unlink()
        raise DataError(f"{target.name}: sha256 mismatch, expected {sha256}, got {got} (from {url})")
    if sha256 is None:
        echo(f"{target.name}: sha256 {got} (no published checksum to compare with)")
    part.replace(target)
    return got


def build_cov_ctr_annotation(csv_path: str | Path, image_labels: dict[str, int]) -> list[dict]:
    """COV-CTR annotation rows from the report CSV: {image_id, image, label, report, report_zh, source_row}.

    label comes from the UCSD folder of the image (`image_labels`), the CSV's COVID column only for images
    found in neither zip; report = reports_En stripped (every value ends in a newline); report_zh = findings.
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # the original archive's CSV starts with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the report CSV ({first_line(exc)})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    needed = {"image_id", "findings", "COVID", "reports_En"}
    missing = needed - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{csv_path}: missing columns {sorted(missing)} (found {reader.fieldnames})")
    rows = []
    for index, record in enumerate(reader):
        image_id = record["image_id"]
        covid = record["COVID"].strip()
        label = image_labels.get(image_id, int(covid) if covid in ("0", "1") else covid)
        rows.append(
            {
                "image_id": image_id,
                "image": f"images/{image_id}",
                "label": label,
                "report": record["reports_En"].strip(),
                "report_zh": record["findings"],
                "source_row": index,
            }
        )
    return rows


def _build_cov_ctr(downloads: Path, dest: Path) -> dict:
    """Extract the images the reports name (original bytes) and write annotation.jsonl."""
    members: dict[str, tuple[Path, str, int]] = {}
    for zip_name, label in (("CT_COVID.zip", 1), ("CT_NonCOVID.zip", 0)):
        try:
            with zipfile.ZipFile(downloads / zip_name) as archive:
                for info in archive.infolist():
                    base = PurePosixPath(info.filename).name
                    if info.is_dir() or info.filename.startswith("__MACOSX") or base.startswith("._"):
                        continue
                    members.setdefault(base, (downloads / zip_name, info.filename, label))
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{downloads / zip_name}: not a readable zip ({exc})") from None
    labels = {base: label for base, (_, _, label) in members.items()}
    rows = build_cov_ctr_annotation(downloads / "reports_ZH_EN.csv", labels)
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(row["image_id"] for row in rows))
    missing = [image_id for image_id in wanted if image_id not in members]
    for zip_path in sorted({members[i][0] for i in wanted if i in members}):
        with zipfile.ZipFile(zip_path) as archive:
            for image_id in wanted:
                if image_id in members and members[image_id][0] == zip_path:
                    target = resolve_in_root(dest, f"images/{image_id}")  # an id with "../" must not leave dest
                    with archive.open(members[image_id][1]) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
    annotation = dest / "annotation.jsonl"
    tmp = annotation.with_name(annotation.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(annotation)
    images = len({row["image_id"] for row in rows}) - len(missing)
    return {"rows": len(rows), "images": images, "missing_images": missing}


_BUILDERS = {"cov_ctr": _build_cov_ctr}
