"""render_report on a hand-built FeatureSelection: structure, escaping, links, no external resources."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from sae_unlearn.features import FeatureSelection, SelectedFeature
from sae_unlearn.features.contexts import FeatureExamples
from sae_unlearn.features.report import SORT_KEYS, render_report

EVIL = "<script>alert(\"x\")</script> & 'quoted'"


def _feature(layer: int, index: int, score: float, relative: float) -> SelectedFeature:
    return SelectedFeature(
        layer=layer,
        index=index,
        score=score,
        forget_count=120.0,
        retain_count=3.0,
        forget_sum=300.0,
        retain_sum=4.0,
        forget_max=9.5,
        retain_max=1.5,
        forget_rate=0.012,
        retain_rate=0.0003,
        relative=relative,
    )


def _selection(neuronpedia_id: str | None = "gemma-2-2b/12-gemmascope-res-16k") -> FeatureSelection:
    features = [_feature(12, 7, 50.0, 60.0), _feature(12, 42, 80.0, 20.0), _feature(19, 3, 10.0, float("inf"))]
    ex = FeatureExamples(
        top={
            "forget": [(9.5, EVIL, "<tok>", " right & more"), (2.0, "a\nb", " c", "")],
            "retain": [(1.5, "plain left", " x", " y")],
        },
        hist={"forget": [0, 5, 100, *[1] * 17], "retain": [40, *[0] * 19]},
        bin_max=9.5,
    )
    return FeatureSelection(
        model="gemma-2-2b",
        model_source="google/gemma-2-2b",
        saes=[
            {"layer": 12, "spec": "gemmascope:12", "d_sae": 16384, "neuronpedia_id": neuronpedia_id},
            {"layer": 19, "spec": "local:<sae>", "d_sae": 16384, "neuronpedia_id": ""},
        ],
        concept="harry <potter>",
        concept_fingerprint="abc",
        strategy="crisp",
        params={"k": 2, "min_ratio": 5.0},
        tokens={"forget": 10000, "retain": 12000},
        stats_key="key",
        features=features,
        examples={(12, 7): ex, (19, 3): FeatureExamples()},
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str | None]] = []
        self.options: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if "card" in (a.get("class") or "").split():
            self.cards.append({**a, "_parent": self.stack[-1] if self.stack else None})
        if tag == "option":
            self.options.append(a.get("value") or "")
        if tag not in ("meta", "rect", "line", "br"):
            self.stack.append(a.get("id") or tag)

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("meta", "rect", "line", "br") and self.stack:
            self.stack.pop()


@pytest.fixture(scope="module")
def page() -> str:
    return render_report(_selection())


@pytest.fixture(scope="module")
def parsed(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def test_one_card_per_feature(page: str, parsed: _Collector) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert len(parsed.cards) == 3
    assert [(c["data-layer"], c["data-index"]) for c in parsed.cards] == [("12", "7"), ("12", "42"), ("19", "3")]
    for title in ("L12 #7", "L12 #42", "L19 #3"):
        assert title in page
    assert "no examples" in page  # (12, 42) has none
    assert page.count("<svg") == 2  # histograms only where examples exist


def test_data_attributes_for_sorting(parsed: _Collector) -> None:
    assert set(parsed.options) == set(SORT_KEYS)
    for card in parsed.cards:
        assert card["_parent"] == "cards"  # cards are direct children of the container the JS reorders
        for key in [*SORT_KEYS, "index"]:
            value = card[f"data-{key}"]
            assert value is not None
            float(value)  # parseFloat-compatible (Infinity included)
    assert parsed.cards[2]["data-relative"] == "Infinity"


def test_data_text_is_escaped(page: str) -> None:
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quoted&#x27;" in page
    assert "&lt;tok&gt;" in page and "harry &lt;potter&gt;" in page and "local:&lt;sae&gt;" in page
    assert "<tok>" not in page and "<potter>" not in page
    assert page.count("<script") == 1  # only the inline sorting script


def test_highlight_scaled_by_activation(page: str) -> None:
    alphas = [float(a) for a in re.findall(r'<mark style="background:rgba\(255,165,0,([0-9.]+)\)">', page)]
    assert alphas[:2] == [1.0, pytest.approx(0.15 + 0.85 * 2.0 / 9.5, abs=0.01)]


def test_neuronpedia_link_only_with_id(page: str) -> None:
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == [
        "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/7",
        "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/42",
    ]
    assert "neuronpedia.org" not in render_report(_selection(neuronpedia_id=None))


def test_no_external_resources(page: str, parsed: _Collector) -> None:
    for tag, attrs in parsed.tags:
        assert "src" not in attrs, tag
        if tag != "a":
            assert "href" not in attrs, tag
    assert not any(tag in ("link", "iframe", "img") for tag, _ in parsed.tags)
    outside_anchors = re.sub(r'<a href="https://www\.neuronpedia\.org/[^"]*"', "", page)
    assert "url(" not in page and "@import" not in page
    assert "http" not in outside_anchors
    assert "//" not in re.sub(r"<script>.*?</script>", "", outside_anchors, flags=re.S)
