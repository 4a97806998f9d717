"""Great Expectations Data Docs that render offline: no stylesheet, script or image from a CDN.

Great Expectations 1.24 writes pages that load Bootstrap, jQuery, Popper, Font Awesome, bootstrap-table (and its
filter-control extension), bootstrap-datepicker, bootstrap-dark and Vega from CDNs, and its logo from its own
bucket. make_offline() rewrites every page after GX wrote it: each of those <link>/<script> tags points at a copy
under the docs' static/vendor/, copied from an installed registry package, or is dropped where none ships it:

    CDN asset (GX 1.24.1)             local copy under static/vendor/, from
    Bootstrap 4.3.1 css and js        XStatic-Bootstrap 4.5.3.1 (bootstrap.bundle.min.js, which carries Popper,
    + Popper 1.12.9                     so Popper's own tag is dropped)
    jQuery 3.7.1                      XStatic-jQuery 3.7.1.1
    Font Awesome 6.6.0                XStatic-Font-Awesome 6.2.1.2 (css/all.min.css and its webfonts/)
    Vega 5, Vega-Lite 5, Vega-Embed 6 django-js-lib-vega-embed 6.29.0.3 (plain files; Django is not needed), only on
                                        pages that draw a chart (vegaEmbed); dropped elsewhere
    bootstrap-table 1.19.1            no registry package ships it: data_docs_table.js of this package renders the
                                        same index tables (all rows, sortable columns, one search box, row links);
                                        no per-column filter controls, no pagination
    bootstrap-table filter-control,   dropped (no package; only bootstrap-table's filter controls used them)
    bootstrap-datepicker 1.9.0
    bootstrap-dark 1.1.0              dropped (no package): the page is Bootstrap's light theme, GX's own
                                        dark-mode rules (dark tables) still apply
    GX's logo images (its bucket)     static/images/logo-long.png, which GX writes itself

GX's favicon link on a validation page points one folder too high; every static/ link is re-pointed at the docs'
own static/. A CDN tag that is not in RULES (a GX upgrade) is an error naming it, not silently left online.
static/vendor/SOURCES.txt lists each copied file's package and version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medvlm.errors import DataError

VENDOR = "static/vendor"
TABLE_JS = "data_docs_table.js"  # beside this module


@dataclass(frozen=True)
class Asset:
    """Files of one installed package (module folder relative -> vendor folder relative); the tag uses the first."""

    distribution: str
    module: str
    files: tuple[tuple[str, str], ...]
    tag: str  # "css" or "js"


def _fonts() -> tuple[tuple[str, str], ...]:
    names = ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")
    return tuple((f"data/webfonts/{n}.{ext}", f"font-awesome/webfonts/{n}.{ext}") for n in names for ext in ("woff2", "ttf"))


BOOTSTRAP_CSS = Asset("XStatic-Bootstrap", "xstatic.pkg.bootstrap",
                      (("data/css/bootstrap.min.css", "bootstrap/css/bootstrap.min.css"),), "css")
BOOTSTRAP_JS = Asset("XStatic-Bootstrap", "xstatic.pkg.bootstrap",
                     (("data/js/bootstrap.bundle.min.js", "bootstrap/js/bootstrap.bundle.min.js"),), "js")
JQUERY = Asset("XStatic-jQuery", "xstatic.pkg.jquery", (("data/jquery.min.js", "jquery/jquery.min.js"),), "js")
FONT_AWESOME = Asset("XStatic-Font-Awesome", "xstatic.pkg.font_awesome",
                     (("data/css/all.min.css", "font-awesome/css/all.min.css"),
                      ("data/LICENSE.txt", "font-awesome/LICENSE.txt"), *_fonts()), "css")
VEGA = Asset("django-js-lib-vega-embed", "js_lib_vega_embed",
             (("static/js_lib_vega_embed/vega5.js", "vega/vega5.js"),), "js")
VEGA_LITE = Asset("django-js-lib-vega-embed", "js_lib_vega_embed",
                  (("static/js_lib_vega_embed/vega-lite5.js", "vega/vega-lite5.js"),), "js")
VEGA_EMBED = Asset("django-js-lib-vega-embed", "js_lib_vega_embed",
                   (("static/js_lib_vega_embed/vega-embed6.js", "vega/vega-embed6.js"),), "js")
TABLE = Asset("medvlm", "medvlm.data", ((TABLE_JS, f"medvlm/{TABLE_JS}"),), "js")
CHART = "chart"  # Vega: copied only for a page that draws a chart
DROP = None

# (pattern on the CDN address, what replaces it); the first match wins
RULES: tuple[tuple[re.Pattern, Asset | str | None], ...] = tuple(
    (re.compile(pattern), action)
    for pattern, action in (
        (r"/bootstrap/4\.[\d.]+/css/bootstrap\.min\.css$", BOOTSTRAP_CSS),
        (r"/bootstrap/4\.[\d.]+/js/bootstrap\.min\.js$", BOOTSTRAP_JS),
        (r"/popper\.js/1\.[\d.]+/umd/popper\.min\.js$", DROP),  # inside bootstrap.bundle.min.js
        (r"/jquery-3\.[\d.]+\.min\.js$", JQUERY),
        (r"/font-awesome/6\.[\d.]+/css/all\.min\.css$", FONT_AWESOME),
        (r"/npm/vega@5$", (CHART, VEGA)),
        (r"/npm/vega-lite@5$", (CHART, VEGA_LITE)),
        (r"/npm/vega-embed@6$", (CHART, VEGA_EMBED)),
        (r"/bootstrap-table@1\.[\d.]+/dist/bootstrap-table\.min\.js$", TABLE),
        (r"/bootstrap-table@1\.[\d.]+/dist/bootstrap-table\.min\.css$", DROP),
        (r"/bootstrap-table@1\.[\d.]+/dist/extensions/filter-control/bootstrap-table-filter-control(\.min)?\.(css|js)$",
         DROP),
        (r"/bootstrap-datepicker/1\.[\d.]+/(css|js)/bootstrap-datepicker\.min\.(css|js)$", DROP),
        (r"/@forevolve/bootstrap-dark@1\.[\d.]+/dist/css/bootstrap-prefers-dark\.css$", DROP),
    )
)

_LINK = re.compile(r"<link\b[^>]*?\bhref=\"(https?://[^\"]+)\"[^>]*>")
_SCRIPT = re.compile(r"<script\b[^>]*?\bsrc=\"(https?://[^\"]+)\"[^>]*>\s*</script>")
_GX_IMAGES = re.compile(r"https://great-expectations-web-assets\.s3[\w.-]*\.amazonaws\.com/[\w.-]+\.png(\?[^\"')]*)?")
_STATIC_REF = re.compile(r"(\b(?:href|src)=\")((?:\.\.?/)*static/([^\"]+))\"")
_REMOTE_LOAD = re.compile(r"<(?:link|script|img)\b[^>]*?\b(?:href|src)=\"https?://[^\"]*\"|url\(['\"]?https?://")


def make_offline(docs_dir: Path) -> dict[str, int]:
    """Rewrite every page under docs_dir to load only local files; copy those files into static/vendor/.

    Returns counts: pages, tags_local, tags_dropped. Raises DataError (one line) when a page loads a CDN asset
    RULES does not know, or when a package that ships an asset is not installed.
    """
    docs_dir = Path(docs_dir)
    pages = sorted(docs_dir.rglob("*.html"))
    used: dict[str, Asset] = {}
    counts = {"pages": len(pages), "tags_local": 0, "tags_dropped": 0}
    for page in pages:
        html = page.read_text("utf-8")
        new = _rewrite_page(html, page, docs_dir, used, counts)
        if new != html:
            page.write_text(new, "utf-8")
    _copy_assets(used, docs_dir)
    return counts


def _rewrite_page(html: str, page: Path, docs_dir: Path, used: dict[str, Asset], counts: dict[str, int]) -> str:
    charts = "vegaEmbed(" in html
    to_static = Path(os.path.relpath(docs_dir / "static", page.parent)).as_posix()

    def replace(match: re.Match) -> str:
        url = match.group(1)
        action = _rule(url, page)
        if isinstance(action, tuple):  # (CHART, asset): local on a page with a chart, dropped elsewhere
            action = action[1] if charts else DROP
        if action is DROP:
            counts["tags_dropped"] += 1
            return ""
        used[action.files[0][1]] = action
        counts["tags_local"] += 1
        href = f"{to_static}/vendor/{action.files[0][1]}"
        return f'<link rel="stylesheet" href="{href}">' if action.tag == "css" else f'<script src="{href}"></script>'

    html = _LINK.sub(replace, html)
    html = _SCRIPT.sub(replace, html)
    html = _GX_IMAGES.sub(f"{to_static}/images/logo-long.png", html)  # the light logo; GX does not ship the dark one
    html = _STATIC_REF.sub(lambda m: f'{m.group(1)}{to_static}/{m.group(3)}"', html)
    left = _REMOTE_LOAD.search(html)
    if left:
        raise DataError(f"{page}: Data Docs still load {left.group(0)!r} from the network; add it to "
                        "medvlm.data.data_docs.RULES")
    return html


def _rule(url: str, page: Path):
    for pattern, action in RULES:
        if pattern.search(url):
            return action
    raise DataError(f"{page}: Data Docs load {url}, which medvlm has no local copy of (a Great Expectations "
                    "upgrade?); add it to medvlm.data.data_docs.RULES")


def _copy_assets(used: dict[str, Asset], docs_dir: Path) -> None:
    vendor = docs_dir / VENDOR
    sources = []
    for asset in sorted(set(used.values()), key=lambda a: a.files[0][1]):
        folder = _module_dir(asset)
        version = _version(asset.distribution)
        for rel, dest in asset.files:
            src = folder / rel
            if not src.is_file():
                raise DataError(f"{src}: missing from {asset.distribution}=={version}, which the Data Docs copy "
                                f"{dest} from")
            target = vendor / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            sources.append(f"{dest}  <-  {asset.distribution}=={version} {asset.module}/{rel}")
    if sources:
        (vendor / "SOURCES.txt").write_text(
            "Local copies of what Great Expectations' Data Docs load from CDNs (written by medvlm.data.data_docs)\n"
            + "\n".join(sources) + "\n", "utf-8")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # medvlm itself, run from a source tree
        return "source"


def _module_dir(asset: Asset) -> Path:
    try:
        spec = importlib.util.find_spec(asset.module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{asset.module}: not installed; the offline Data Docs need the package "
                        f"{asset.distribution} (pinned in requirements.lock)")
    return Path(next(iter(spec.submodule_search_locations)))
