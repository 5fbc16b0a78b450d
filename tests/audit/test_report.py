"""The HTML report: self-contained, every round in it, plots that are real non-empty PNGs."""

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest

from securefed.audit import render_report
from securefed.audit.keys import key_paths
from securefed.errors import InvalidInput
from tests.audit.helpers import write_log


class Page(HTMLParser):
    """Ids of elements, image sources, external references and the visible text of a page."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.images, self.external, self.text = set(), [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def pngs(page):
    import matplotlib.image

    out = []
    for src in page.images:
        head, b64 = src.split(",", 1)
        assert head == "data:image/png;base64"
        raw = base64.b64decode(b64)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        out.append(matplotlib.image.imread(io.BytesIO(raw), format="png"))
    return out


def test_report_has_every_round_and_three_nonempty_plots(dp_log, tmp_path):
    out = tmp_path / "report.html"
    res = render_report(dp_log, out, pubkey=key_paths(dp_log)[1])
    assert res.ok, res.summary()
    page = Page(out.read_text())
    assert not page.external  # self-contained
    for r in range(1, 7):
        assert f"round-{r}" in page.ids and f"round-{r}-detail" in page.ids
    images = pngs(page)
    assert len(images) == 3  # epsilon, participants and dropouts, loss and accuracy
    for img in images:
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert np.std(img[..., :3]) > 0.05  # something is drawn, not a blank canvas
    text = " ".join(page.text)
    assert "VERIFIED" in text and "0 (upload: no_reply), 4 (upload: no_reply)" in text
    assert text.count("gaussian z=1.1 q=0.5") == 6  # the mechanism of each round, in its row


def test_report_of_a_failing_log_says_so_and_lists_the_failures(plain_log, tmp_path):
    bad = tmp_path / "bad.jsonl"
    data = bytearray(plain_log.read_bytes())
    data[300] ^= 0x20
    bad.write_bytes(bytes(data))
    out = tmp_path / "bad.html"
    res = render_report(bad, out)
    assert not res.ok
    page = Page(out.read_text())
    text = " ".join(page.text)
    assert "VERIFICATION FAILED" in text and "VERIFIED:" not in text
    assert all(f.field in text for f in res.failures)


def test_report_without_dp_or_metrics_still_renders(tmp_path):
    path = tmp_path / "p.jsonl"
    write_log(path, rounds=2)
    out = tmp_path / "p.html"
    assert render_report(path, out).ok
    page = Page(out.read_text())
    assert {"round-1", "round-2"} <= page.ids and len(pngs(page)) == 2
    with pytest.raises(InvalidInput):
        render_report(tmp_path / "missing.jsonl", out)
