"""The documentation stays inside the repository: every link resolves to a file here, and no URL appears.

The project's documents are read offline (no network at run time), so a link must point to a file of
the repository, never to the web; a moved or renamed module must not leave a dead link behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO_ROOT = Path(__file__).resolve().parent.parent

# `[text](target "title")` and `![alt](target)`; link text may hold one level of brackets (`[a[0]]`).
_INLINE = re.compile(
    r"!?\[(?:[^\[\]\n]|\[[^\[\]\n]*\])*\]\(\s*(<[^>\n]*>|[^)\s]*)(?:\s+(?:\"[^\"\n]*\"|'[^'\n]*'|\([^)\n]*\)))?\s*\)"
)
# `[label]: target` reference definitions.
_REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*(<[^>\n]*>|\S+)", re.MULTILINE)
# Raw HTML links and images.
_HTML = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_BARE_URL = re.compile(r"https?://", re.IGNORECASE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)[^\n]*?\1")


def _blank_code(text: str) -> str:
    """`text` with fenced code blocks and inline code spans replaced by spaces (offsets and newlines kept).

    Brackets inside code are not links; a URL inside code is still a URL (checked on the raw text).
    """
    out, fence = [], None
    for line in text.splitlines(keepends=True):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)[0]
            out.append(re.sub(r"[^\n]", " ", line))
        elif fence is not None:
            if opened and opened.group(1)[0] == fence:
                fence = None
            out.append(re.sub(r"[^\n]", " ", line))
        else:
            out.append(_CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
    return "".join(out)


def _target_problem(target: str, md_file: Path, root: Path) -> str | None:
    """Why a link target does not point to an existing path inside `root`, or None when it does."""
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1].strip()
    if not target:
        return "empty link target"
    if target.startswith("#"):
        return None  # an anchor in the same document
    if _SCHEME.match(target):
        return "points outside the repository (a URL or other scheme); link a file of the repository"
    if target.startswith(("/", "\\", "~")):
        return "absolute path; use a path relative to this file"
    path = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
    if not path:
        return None  # `?query#anchor` only: still this document
    resolved = (md_file.parent / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return "escapes the repository root"
    if not resolved.exists():
        return f"{path} does not exist (relative to {md_file.parent.relative_to(root)}/)"
    return None


def link_problems(md_file: Path, root: Path = REPO_ROOT) -> list[str]:
    """Every link, image or bare URL of one Markdown file that does not stay inside `root`.

    Returns:
        One `file:line: ...` message per problem, naming the link.
    """
    text = md_file.read_text(encoding="utf-8")
    name = md_file.relative_to(root)

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    problems = []
    code_free = _blank_code(text)
    found = [(m.start(), m.group(1)) for pattern in (_INLINE, _REFERENCE, _HTML) for m in pattern.finditer(code_free)]
    for offset, target in sorted(found):
        why = _target_problem(target.strip(), md_file, root)
        if why:
            problems.append(f"{name}:{line_of(offset)}: link {target!r}: {why}")
    for m in _BARE_URL.finditer(text):
        end = re.search(r"[\s)>\]\"'`]|$", text[m.start() :]).start()
        problems.append(f"{name}:{line_of(m.start())}: URL {text[m.start() : m.start() + end]!r} in the text")
    return problems


def documents(root: Path = REPO_ROOT) -> list[Path]:
    """The Markdown files whose links are checked: the top-level README and everything under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def test_every_link_stays_inside_the_repository() -> None:
    docs = documents()
    assert (REPO_ROOT / "docs" / "README.md") in docs, "docs/README.md (the index) is missing"
    problems = [p for doc in docs for p in link_problems(doc)]
    assert not problems, "links that leave the repository or point nowhere:\n" + "\n".join(problems)


def test_the_docs_index_lists_every_document() -> None:
    index = (REPO_ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {(REPO_ROOT / "docs" / m.group(1)).resolve() for m in _INLINE.finditer(_blank_code(index))}
    unlisted = [p.name for p in sorted((REPO_ROOT / "docs").glob("*.md")) if p.name != "README.md" and p not in linked]
    assert not unlisted, f"docs/README.md does not link {unlisted}"


def test_the_checker_reports_each_bad_link_with_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("")
    (tmp_path / "outside.md").write_text("")  # exists, but outside the repository
    doc = root / "docs" / "guide.md"
    lines = [
        "# Guide",  # 1
        "Good: [mod](../pkg/mod.py), [folder](../pkg), [self](#guide), [t](guide.md#x 'title').",  # 2
        "Missing: [gone](../pkg/gone.py).",  # 3
        "Web: [site](https://example.org/page).",  # 4
        "Mail: [me](mailto:someone@example.org).",  # 5
        "Absolute: [abs](/etc/passwd).",  # 6
        "Escaping: [out](../../outside.md).",  # 7
        "Image: ![plot](../plots/loss.png).",  # 8
        "Bare: see http://example.org for more.",  # 9
        "Code is not a link: `[x](nowhere.md)`",  # 10
        "```",  # 11
        "[y](nowhere.md)",  # 12
        "```",  # 13
        "[ref]: ../pkg/missing.py",  # 14
    ]
    doc.write_text("\n".join(lines) + "\n")

    problems = link_problems(doc, root)
    reported = {int(p.split(":")[1]) for p in problems}
    assert reported == {3, 4, 5, 6, 7, 8, 9, 14}, "\n".join(problems)
    assert all(p.startswith("docs/guide.md:") for p in problems)
    by_line = {int(p.split(":")[1]): p for p in problems if "link" in p}
    assert "'../pkg/gone.py'" in by_line[3] and "does not exist" in by_line[3]
    assert "outside the repository" in by_line[4] and "outside the repository" in by_line[5]
    assert "absolute path" in by_line[6]
    assert "escapes the repository root" in by_line[7]
    assert "'../plots/loss.png'" in by_line[8]
    # The URL of line 4 is caught twice: as a link leaving the repository and as a URL in the text.
    urls = [p for p in problems if "URL 'http" in p]
    assert [int(p.split(":")[1]) for p in urls] == [4, 9]
    assert "'http://example.org'" in urls[1]
