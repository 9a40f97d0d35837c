"""Every cross-reference a reader can follow leads somewhere: in each tracked .py and .md file,
every `docs/<file>.md` (with its `#anchor`, or `Sec. N` of docs/spec.md), every relative markdown
link and every citation of a README section names a file, heading or section that exists."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS_REFERENCE = re.compile(r"docs/([\w-]+\.md)(#[\w-]+)?(?: Sec\. (\d+))?")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_SECTION = re.compile(r"README(?:\.md)?,? (?:section )?\"([^\"]+)\"")
FENCED_BLOCK = re.compile(r"^```.*?^```", flags=re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    """The headings of a markdown text, outside its fenced code blocks."""
    return re.findall(r"^#{1,6} +(.+?) *#*$", FENCED_BLOCK.sub("", text), flags=re.M)


def anchors(text: str) -> set[str]:
    """Every anchor GitHub gives the text's headings (a repeated one gets -1, -2, ...)."""
    result, counts = set(), {}
    for heading in headings(text):
        base = anchor(heading)
        count = counts.get(base, 0)
        counts[base] = count + 1
        result.add(f"{base}-{count}" if count else base)
    return result


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def tracked(*patterns: str) -> list[str]:
    return subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def broken_target(path: str, fragment: str | None) -> str | None:
    """Why `path` (absolute) with `#fragment` cannot be followed; None when it can."""
    if not os.path.exists(path):
        return f"no file {os.path.relpath(path, ROOT)}"
    if fragment and fragment not in anchors(read(path)):
        return f"no heading #{fragment} in {os.path.relpath(path, ROOT)}"
    return None


def broken_references(name: str, text: str) -> list[str]:
    """Every reference in the file `name` (relative to the root) that leads nowhere."""
    problems = []
    for match in DOCS_REFERENCE.finditer(text):
        target = os.path.join(ROOT, "docs", match[1])
        problem = broken_target(target, match[2] and match[2][1:])
        if problem is None and match[3]:
            sections = {h.split(".")[0] for h in headings(read(target))}
            problem = None if match[3] in sections else f"no Sec. {match[3]} in docs/{match[1]}"
        problems += [f"{match[0]}: {problem}"] if problem else []
    readme_anchors = anchors(read(os.path.join(ROOT, "README.md")))
    for match in README_SECTION.finditer(text):
        if anchor(match[1]) not in readme_anchors:
            problems.append(f"README section {match[1]!r}: no such heading")
    if name.endswith(".md"):
        for match in MARKDOWN_LINK.finditer(FENCED_BLOCK.sub("", text)):
            link = match[1]
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, fragment = link.partition("#")
            target = os.path.join(ROOT, os.path.dirname(name), path) if path else \
                os.path.join(ROOT, name)
            problem = broken_target(os.path.normpath(target), fragment)
            problems += [f"({link}): {problem}"] if problem else []
    return [f"{name}: {problem}" for problem in problems]


@pytest.mark.parametrize("heading, expected", [
    ("8. What the authors' public code does differently",
     "8-what-the-authors-public-code-does-differently"),
    ("Many runs: compare.py `--gpus` and SLURM arrays",
     "many-runs-comparepy---gpus-and-slurm-arrays"),
    ("Equations → code", "equations--code"),
])
def test_anchor_follows_githubs_rule(heading, expected):
    assert anchor(heading) == expected


def test_the_checker_finds_what_leads_nowhere():
    good = ["docs/spec.md#9-the-papers-reported-numbers", "docs/spec.md Sec. 7",
            "[a link](docs/distributed.md#the-lock)", "[here](#tests)", 'README, "Quick start"']
    bad = ["docs/spec.md#10-missing", "docs/spec.md Sec. 12", "docs/nope.md",
           'README, "Nothing lost, nothing silent"', "[a link](docs/training.md#no-such)",
           "[a link](docs/spec.md#ten)", "[a link](#no-such-section)", "[a link](nope.md)"]
    assert broken_references("README.md", " ".join(good)) == []
    for text in bad:
        assert broken_references("README.md", f"see {text}."), text
    # Relative to the file that links: docs/training.md's (spec.md#...) is docs/spec.md.
    assert broken_references("docs/training.md", "[Sec. 8](spec.md#8-what-the-authors-public-"
                                                 "code-does-differently)") == []
    assert broken_references("README.md", "[Sec. 8](spec.md)")


def test_every_cross_reference_leads_somewhere():
    problems = []
    for name in tracked("*.py", "*.md"):
        if name != "tests/test_docs.py":  # whose references are the examples above
            problems += broken_references(name, read(os.path.join(ROOT, name)))
    assert not problems, "\n".join(problems)
