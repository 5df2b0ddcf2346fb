"""The HTML report: self-contained, escaped, one SVG per chart, strict about its input; PCA against
points on a known plane."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.report import render_report, write_report
from shipyard.pipeline.report_charts import pca_2d

NASTY = '<b>&"'


def example(**changes: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", NASTY]
    data: dict[str, Any] = {
        "title": f"report for {NASTY}",
        "notes": ["random weights: numbers say nothing about CLIP"],
        "protocol": "clean: last epoch, mean over seeds 1, 2",
        "table": [
            {"method": "zero-shot", "base": 61.25, "new": 70.5, "h": 65.55, "gzsl_seen": None,
             "gzsl_unseen": None, "gzsl_h": None, "seeds": 2},
            {"method": "tip-adapter+ship", "base": 80.75, "new": 68.1, "h": 73.9, "gzsl_seen": 72.0,
             "gzsl_unseen": 40.0, "gzsl_h": 51.43, "seeds": 2, "base_std": 1.5, "new_std": 0.25},
        ],
        "per_class": {"zero-shot": {c: 50.0 + i for i, c in enumerate(classes)},
                      "tip-adapter+ship": {c: 70.0 + i for i, c in enumerate(classes)}},
        "projection": {"classnames": classes,
                       "real": {"features": rng.normal(size=(12, 8)), "labels": [0, 1, 2] * 4},
                       "synthetic": {"features": rng.normal(size=(4, 8)).tolist(), "labels": [2] * 4}},
        "curves": {"loss": [2.0, 1.5, 1.1, 0.9], "val H": [40.0, 50.0, None, 55.0]},
    }
    data.update(changes)
    return data


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S))


def test_report_is_one_file_without_external_resources() -> None:
    page = render_report(example())
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    lowered = page.lower()
    for forbidden in ('src="http', "<link", "<script", "@import", "url(", "http://", "https://"):
        assert forbidden not in lowered, forbidden


def test_table_holds_the_values_and_marks_the_best() -> None:
    page = render_report(example())
    table = sections(page)["results"]
    for text in ("61.25", "70.50", "65.55", "80.75", "68.10", "73.90", "72.00", "40.00", "51.43",
                 "zero-shot", "tip-adapter+ship", "&plusmn;1.50"):
        assert text in table, text
    best = re.findall(r'<td class="best">([\d.]+)', table)
    # Row by row: zero-shot's New, then tip-adapter's Base and H; a GZSL column with a single value
    # has nothing to beat and stays plain.
    assert best == ["70.50", "80.75", "73.90"]
    assert "&mdash;" in table  # zero-shot has no GZSL numbers
    assert "nan" not in table.lower() and "none" not in table.lower()


def test_a_column_where_every_method_ties_has_no_best() -> None:
    rows = [{"method": m, "base": 20.0, "new": 20.0, "h": 20.0, "gzsl_seen": 0.0,
             "gzsl_unseen": 20.0, "gzsl_h": 0.0, "seeds": 3} for m in ("a", "b", "c")]
    rows[2]["base"] = 34.67  # one column with a winner
    table = sections(render_report(example(table=rows)))["results"]
    assert re.findall(r'<td class="best">([\d.]+)', table) == ["34.67"]
    assert '<div class="table-wrap"><table>' in table  # scrolls inside a narrow window


def test_charts_keep_one_colour_per_method_and_tell_the_sides_apart() -> None:
    from shipyard.pipeline.report_charts import CLASS_PALETTE, OTHER, PALETTE

    data = example(curves={"tip-adapter+ship": {"seed 1": [2.0, 1.0], "seed 2": [2.5, 1.5]},
                           "SHIP generator": [3.0, 2.0]}, curves_y="loss",
                   sides={"base": ["cat", "dog"], "new": [NASTY]},
                   per_class={"zero-shot": {"cat": 0.0, "dog": 50.0, NASTY: None},
                              "tip-adapter+ship": {"cat": 10.0, "dog": 20.0, NASTY: 30.0}})
    parts = sections(render_report(data))
    bars, curves = parts["per-class"], parts["curves"]
    # Methods keep their table colour in the bars and the curves; a zero is a visible bar.
    assert f'height="2.0" fill="{PALETTE[0]}"' in bars
    assert bars.count(f'fill="{PALETTE[1]}"') >= 3 and f'stroke="{PALETTE[1]}"' in curves
    assert f'stroke="{OTHER}"' in curves  # the generator is no method
    assert "base classes" in bars and "new classes" in bars
    assert curves.count("stroke-dasharray") == 1  # the second seed is dashed
    assert ">loss</text>" in curves
    projection = parts["projection"]
    assert CLASS_PALETTE[0] in projection and f'fill="{PALETTE[0]}"' not in projection


def test_text_is_escaped_everywhere() -> None:
    page = render_report(example())
    assert NASTY not in page
    escaped = "&lt;b&gt;&amp;&quot;"
    assert page.count(escaped) >= 4  # title, heading, bar label, projection legend


def test_one_svg_per_chart_section() -> None:
    parts = sections(render_report(example()))
    assert list(parts) == ["results", "per-class", "projection", "curves"]
    assert parts["results"].count("<svg") == 0
    for name in ("per-class", "projection", "curves"):
        assert parts[name].count("<svg") == 1, name


def test_projection_draws_every_point_by_kind() -> None:
    svg = sections(render_report(example()))["projection"]
    assert svg.count("<circle") == 12  # real: filled circles
    assert svg.count("l6 6m0 -6l-6 6") == 4  # synthetic: crosses


def test_a_missing_value_breaks_the_curve() -> None:
    curves = sections(render_report(example()))["curves"]
    assert curves.count("<polyline") == 3  # loss: one line; val H: two pieces around the gap


def test_optional_sections_may_be_missing_or_none() -> None:
    data = example()
    del data["projection"], data["curves"]
    assert list(sections(render_report(data))) == ["results", "per-class"]
    assert list(sections(render_report(example(projection=None, curves=None, per_class={})))) == ["results"]


def test_nan_accuracies_render_as_a_dash() -> None:
    table = example()["table"]
    table[0] = {**table[0], "new": math.nan, "h": math.nan}
    page = render_report(example(table=table, per_class={"zero-shot": {"cat": math.nan, "dog": None}}))
    assert "nan" not in sections(page)["results"].lower()
    assert sections(page)["per-class"].count("no data") == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"table": None}, "table must be a list"),
    ({"curve": {}}, "unknown 'curve'"),
    ({"table": [{"method": "m", "base": "high"}]}, "table[0] lacks 'new'"),
    ({"table": [{"method": "m", "base": "high", "new": 1.0, "h": 1.0, "gzsl_seen": None,
                 "gzsl_unseen": None, "gzsl_h": None, "seeds": 1}]}, "table[0].base must be a number"),
    ({"per_class": {"m": {"cat": "50%"}}}, "per_class['m']['cat'] must be a number or None"),
    ({"projection": {"classnames": ["a"], "real": {"features": [[0.0, 1.0]], "labels": [3]},
                     "synthetic": {"features": [], "labels": []}}}, "projection.real.labels must be ints"),
    ({"projection": {"classnames": ["a"], "real": {"features": [[0.0, 1.0], [1.0]], "labels": [0, 0]},
                     "synthetic": {"features": [], "labels": []}}}, "not numeric and rectangular"),
])
def test_malformed_input_is_refused_with_a_clear_message(change: dict[str, Any], message: str) -> None:
    data = example()
    data.update(change)
    with pytest.raises(UsageError, match=re.escape(message)):
        render_report(data)


def test_missing_title_is_named() -> None:
    data = example()
    del data["title"]
    with pytest.raises(UsageError, match="lacks 'title'"):
        render_report(data)


def test_write_report_publishes_atomically(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "demo.html"
    assert write_report(example(), target) == target
    assert target.read_text(encoding="utf-8") == render_report(example())
    with pytest.raises(UsageError):
        write_report(example(table="oops"), target)
    assert target.read_text(encoding="utf-8") == render_report(example())  # old report intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo.html"]  # no temporary left


def test_rendering_is_deterministic() -> None:
    assert render_report(example()) == render_report(example())


def test_pca_recovers_a_plane_up_to_rotation() -> None:
    rng = np.random.default_rng(7)
    plane = rng.normal(size=(40, 2)) * [5.0, 1.0]  # (N, 2) coordinates on the plane
    basis, _ = np.linalg.qr(rng.normal(size=(16, 2)))  # (16, 2) orthonormal columns
    points = plane @ basis.T + rng.normal(size=16)  # (N, 16): the plane, rotated and shifted
    got, share = pca_2d(points)

    def distances(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x[:, None] - x[None], axis=-1)

    np.testing.assert_allclose(distances(got), distances(plane), atol=1e-9)
    np.testing.assert_allclose(got.mean(axis=0), 0.0, atol=1e-9)
    assert share.sum() == pytest.approx(1.0) and share[0] > share[1]


def test_pca_of_degenerate_inputs_does_not_fail() -> None:
    one, share = pca_2d(np.ones((1, 5)))
    assert one.shape == (1, 2) and not share.any()
    line, _ = pca_2d(np.arange(6.0).reshape(6, 1))  # D = 1: the second axis stays zero
    np.testing.assert_allclose(np.abs(line[:, 0]), np.abs(np.arange(6.0) - 2.5))
    assert not line[:, 1].any()


@pytest.mark.parametrize("values", [
    [1.9e-7, 2.9e-7, 2.4e-7],  # nearly flat: a tick step far below 1e-6
    [0.5, 0.5, 0.5],  # constant
    [float("nan"), None],  # nothing finite
    [],  # no epochs
    [0.25],  # a single point
    [1e9, -1e9, 3.0],  # huge range
])
def test_curves_render_for_every_kind_of_series(values: list) -> None:
    html = render_report(example(curves={"loss": values}))
    curves = sections(html)["curves"]
    assert curves.count("<svg") == 1
    finite = [v for v in values if v is not None and v == v]
    assert curves.count("<circle") == len(finite)
    if not finite:
        assert "no finite values" in curves


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser (apt-get install chromium)")
@pytest.mark.parametrize("width", [1200, 480])
def test_the_report_renders_in_a_real_browser(tmp_path: Path, width: int) -> None:
    """Screenshots of the page, wide and narrow: drawn, not blank, as wide as the window."""
    from PIL import Image

    page = write_report(example(curves={"zero-shot": {"seed 1": [2.0, 1.0], "seed 2": [3.0, 1.5]}},
                                curves_y="loss", sides={"base": ["cat", "dog"], "new": [NASTY]}),
                        tmp_path / "r.html")
    shot = tmp_path / f"shot{width}.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1600",
                    f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (width, 1600)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 100  # text, table shading, bars: far from a blank page
