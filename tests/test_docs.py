"""The documentation: the configuration table is generated from the code, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from camserve.settings import PREFIX, Settings
from camserve.settings_doc import BEGIN, END, render, settings_table

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def _prose_lines(path: Path) -> list[str]:
    """The document's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _links(path: Path) -> list[str]:
    """Targets of the document's Markdown links and images (inline code and code blocks left out)."""
    return [target for line in _prose_lines(path) for target in LINK.findall(INLINE_CODE.sub("code", line))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links() -> list[tuple[Path, str, Path, str]]:
    """(document, link, file it points at, anchor) for every relative link of README.md and docs/*.md."""
    found = []
    for document in DOCUMENTS:
        for link in _links(document):
            if EXTERNAL.match(link):
                continue
            target, _, anchor = link.partition("#")
            path = (document.parent / target).resolve() if target else document
            found.append((document, link, path, anchor))
    return found


def test_configuration_table_is_generated_from_settings() -> None:
    committed = CONFIGURATION.read_text(encoding="utf-8")
    assert BEGIN in committed and END in committed
    assert render(committed) == committed, (
        "docs/configuration.md is stale: run `.venv/bin/python -m camserve.settings_doc docs/configuration.md`"
    )


def test_every_setting_has_a_row_with_its_default_and_bounds() -> None:
    settings, _, replaced = settings_table().partition("\n\n")
    rows = {line.split("|")[1].strip(): line for line in settings.splitlines() if line.startswith("| `CAMSERVE_")}
    assert set(rows) == {f"`{PREFIX}{name.upper()}`" for name in Settings.model_fields}
    assert "| `16` | integer, 1-1024 |" in rows["`CAMSERVE_MAX_BATCH_SIZE`"]
    assert "| `60` | number, > 0, <= 86400 |" in rows["`CAMSERVE_REQUEST_TIMEOUT_S`"]
    assert "| `auto` | `auto`, `cpu`, `cuda` |" in rows["`CAMSERVE_DEVICE`"]
    assert "| unset | path |" in rows["`CAMSERVE_MODELS_FILE`"]
    assert "`CAMSERVE_COMPILE`" in replaced  # the replaced settings follow, with what to set instead


def test_rendering_refuses_a_document_without_both_markers() -> None:
    with pytest.raises(ValueError, match="settings:begin"):
        render("# Configuration\n")
    with pytest.raises(ValueError):
        render(f"{END}\n{BEGIN}\n")


def test_every_relative_link_in_readme_and_docs_points_at_an_existing_file() -> None:
    links = _relative_links()
    assert len(links) > 20  # the pages link to each other; none found means the pattern broke
    missing = [f"{document.relative_to(ROOT)}: {link}" for document, link, path, _ in links if not path.exists()]
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_every_anchor_in_a_relative_link_names_a_heading_of_its_page() -> None:
    broken = []
    for document, link, path, anchor in _relative_links():
        if anchor and path.suffix == ".md" and path.exists() and anchor not in _anchors(path):
            broken.append(f"{document.relative_to(ROOT)}: {link}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_the_readme_stays_a_landing_page() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size < 12_000, f"README.md is {size} bytes: reference material belongs under docs/"
