"""Fail when a built API page lacks its docstring: every object that ``docs/api.md`` lists
has a page under ``_build/html/generated/``, and every signature on it is followed by a
paragraph of text. Run by ``make docs`` after the build."""

from __future__ import annotations

import html
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUILT = os.path.join(HERE, "_build", "html", "generated")
# LapDDPM's page must document these, scvi-tools' conventions included
MODEL_METHODS = ("setup_anndata", "train", "generate", "posterior_predictive_sample",
                 "posterior_predictive_cells", "get_latent_representation",
                 "get_normalized_expression", "save", "load", "load_registry",
                 "view_setup_args")


def listed_objects() -> list[str]:
    with open(os.path.join(HERE, "api.md")) as handle:
        text = handle.read()
    return [f"scldiff.{name}" for name in re.findall(r"^   ([A-Za-z_][\w.]*)$", text, re.M)]


def undocumented(page: str) -> list[str]:
    """Signatures on ``page`` whose description has no paragraph of text."""
    with open(page) as handle:
        source = handle.read()
    missing = []
    for match in re.finditer(r'<dt class="sig sig-object py" id="([^"]+)">', source):
        body = source[match.end():]
        start = body.find("<dd>")
        end = body.find("</dd>", start)
        paragraph = re.search(r"<p>(.*?)</p>", body[start:end], re.S)
        text = html.unescape(re.sub(r"<[^>]+>", "", paragraph.group(1))) if paragraph else ""
        if len(text.strip()) < 10:
            missing.append(match.group(1))
    return missing


def main() -> int:
    problems = []
    for name in listed_objects():
        page = os.path.join(BUILT, f"{name}.html")
        if not os.path.exists(page):
            problems.append(f"{name}: no page (run `make docs`)")
            continue
        problems += [f"{name}: {obj} has no docstring on its page" for obj in undocumented(page)]
    model_page = os.path.join(BUILT, "scldiff.LapDDPM.html")
    if os.path.exists(model_page):
        with open(model_page) as handle:
            source = handle.read()
        problems += [f"scldiff.LapDDPM.{method} is not on the model's page"
                     for method in MODEL_METHODS
                     if f'id="scldiff.LapDDPM.{method}"' not in source]
    print("\n".join(problems) or f"API pages: {len(listed_objects())} objects, all documented")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
