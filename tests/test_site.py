"""The site's own checks can fail: a broken local link, a missing image, a lab page with fewer
images than its executed notebook's figures; code links become text, anchors match GitHub's."""

import json
from pathlib import Path

from shared import site


def executed(tmp: Path, figures: int) -> Path:
    outputs = [{"output_type": "display_data", "data": {"image/png": "AAAA"}, "metadata": {}}]
    nb = {"cells": [{"cell_type": "code", "source": "", "outputs": outputs, "metadata": {}}
                    for _ in range(figures)], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp / "lab.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_check_finds_broken_links_and_missing_figures(tmp_path):
    out = tmp_path / "site"
    (out / "labs").mkdir(parents=True)
    (out / "_images").mkdir()
    (out / "_images" / "a.png").write_bytes(b"png")
    (out / "index.html").write_text('<a href="labs/good.html">ok</a> <a href="nope.html">x</a>'
                                    '<a href="https://arxiv.org/abs/1">ext</a><a href="#top">t</a>')
    img = '<img src="../_images/a.png">'
    (out / "labs" / "good.html").write_text(f'{img}{img}<a href="../index.html#labs">up</a>')
    (out / "labs" / "thin.html").write_text('<img src="../_images/gone.png">')
    pages = {"good": executed(tmp_path, 2), "thin": executed(tmp_path, 2)}
    problems = site.check(out, pages)
    assert problems == ["index.html: broken link nope.html",
                        "labs/thin.html: broken link ../_images/gone.png",
                        "labs/thin.html: 1 images, the executed lab has 2"]
    pages["good"] = executed(tmp_path, 3)                       # one figure short now
    assert "labs/good.html: 2 images, the executed lab has 3" in site.check(out, pages)


def test_code_links_become_text_and_doc_links_stay():
    text = "[the kernel](../kernels/x.py#L3) and [card](../papers/vllm.md) [web](https://a.b/c)"
    assert site._demote_code_links(text, Path("labs")) == (
        "the kernel (`kernels/x.py` in the repository) and [card](../papers/vllm.md) "
        "[web](https://a.b/c)")


def test_anchors_are_githubs():
    assert site.github_slug("Triton's interpreter") == "tritons-interpreter"
    assert site.github_slug("6.3 The prediction, at occupancy") == "63-the-prediction-at-occupancy"
