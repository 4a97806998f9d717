"""Offline Data Docs: the CDN tags of Great Expectations' page templates become local copies or are dropped."""

from pathlib import Path

import pytest

from medvlm.data.data_docs import make_offline
from medvlm.errors import DataError

HEAD = """<html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>
<link rel="stylesheet" href="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css" />
<style>.navbar-brand a { background: url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png') }</style>
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-lite@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@6"></script>
<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js" integrity="sha384-x" crossorigin="anonymous"></script>
<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" integrity="sha384-y" crossorigin="anonymous"></script>
<script src="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js"></script>
<link rel="shortcut icon" href="../../static/images/favicon.ico" type="image/x-icon"/>
</head><body><img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=1"/>
<a href="https://greatexpectations.io">Great Expectations</a>
"""


def _docs(tmp_path: Path, pages: dict[str, str]) -> Path:
    docs = tmp_path / "docs"
    for rel, html in pages.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(html)
    (docs / "static" / "images").mkdir(parents=True)
    for name in ("favicon.ico", "logo-long.png"):
        (docs / "static" / "images" / name).write_bytes(b"x")
    return docs


def test_tags_become_local_copies_and_vega_only_where_a_chart_is_drawn(tmp_path):
    chart = "<div id='c'></div><script>vegaEmbed('#c', {});</script></body></html>"
    docs = _docs(tmp_path, {"index.html": HEAD + "</body></html>", "validations/a/b/chart.html": HEAD + chart})
    counts = make_offline(docs)
    assert counts["pages"] == 2

    index = (docs / "index.html").read_text()
    assert "https://" not in index.replace('href="https://greatexpectations.io"', "")  # a plain link stays a link
    assert '<script src="static/vendor/bootstrap/js/bootstrap.bundle.min.js"></script>' in index
    assert "integrity" not in index and "popper" not in index and "bootstrap-dark" not in index
    assert "vega" not in index  # no chart on this page
    assert 'href="static/images/favicon.ico"' in index  # GX's ../../ re-pointed at the docs' own static/
    assert "url('static/images/logo-long.png')" in index and 'src="static/images/logo-long.png"' in index

    page = docs / "validations" / "a" / "b" / "chart.html"
    html = page.read_text()
    for name in ("vega5.js", "vega-lite5.js", "vega-embed6.js"):
        assert f'<script src="../../../static/vendor/vega/{name}"></script>' in html
        assert (page.parent / f"../../../static/vendor/vega/{name}").resolve().is_file()
    for rel in ("bootstrap/css/bootstrap.min.css", "jquery/jquery.min.js", "medvlm/data_docs_table.js",
                "SOURCES.txt"):
        assert (docs / "static" / "vendor" / rel).is_file(), rel
    assert "XStatic-Bootstrap==4.5.3.1" in (docs / "static" / "vendor" / "SOURCES.txt").read_text()

    assert make_offline(docs) == {**counts, "tags_local": 0, "tags_dropped": 0}  # a second pass changes nothing
    assert (docs / "index.html").read_text() == index


def test_an_unknown_cdn_asset_is_an_error_naming_it(tmp_path):
    docs = _docs(tmp_path, {"index.html": '<script src="https://cdn.example.org/new-widget.js"></script>'})
    with pytest.raises(DataError, match=r"index\.html: Data Docs load https://cdn\.example\.org/new-widget\.js"):
        make_offline(docs)
