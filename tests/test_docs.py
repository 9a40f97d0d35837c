"""Every cross-reference a reader can follow leads somewhere: in each tracked .py and .md file,
every `docs/<file>.md` (with its `#anchor`, or `Sec. N` of docs/spec.md), every relative markdown
link and every citation of a README section names a file, heading or section that exists; every
documented command runs from the root as written (each `python -m tools.<name>` answers --help,
each `python <file>.py` names a file there), and no page names a moved file where it was."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import tracked

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
            "[a link](docs/distributed.md#the-lock)", "[here](#quick-start)",
            'README, "Quick start"']
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


# ----------------------------------------------------------------------------- documented commands
TOOL_COMMAND = re.compile(r"python -m (tools\.\w+)")
ROOT_COMMAND = re.compile(r"(?:python|torchrun)\b[^\n`]*?\s([\w/]+\.py)\b")
MOVED = sorted(os.path.basename(name) for name in tracked("infra/*.py", "tools/*.py")
               if not name.endswith("__init__.py"))


def documented(pattern: re.Pattern) -> dict[str, list[str]]:
    """Each target of `pattern` in the tracked .md and .py files -> the files that name it."""
    found: dict[str, list[str]] = {}
    for name in tracked("*.md", "*.py"):
        for target in set(pattern.findall(read(os.path.join(ROOT, name)))):
            found.setdefault(target, []).append(name)
    return found


DOCUMENTED_TOOLS = sorted(documented(TOOL_COMMAND))  # "tools.bench_cuda", ...


def test_every_tool_is_documented_as_a_command_of_the_root():
    tools = {f"tools.{os.path.basename(name)[:-3]}" for name in tracked("tools/*.py")
             if "__init__" not in name}
    assert len(tools) == 6 and set(DOCUMENTED_TOOLS) == tools


# `python -m <module> --help` for each module in turn, as `python -m` runs it (runpy), in one
# process started in the root: one import of torch for all of them.
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
answers = {}
for module in sys.argv[1:]:
    sys.argv, printed, code = [module, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(printed):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code or 0
    answers[module] = [code, printed.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_of_each_tool():
    result = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *DOCUMENTED_TOOLS],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", DOCUMENTED_TOOLS)
def test_each_documented_tool_command_answers_help_from_the_root(module, help_of_each_tool):
    code, printed = help_of_each_tool[module]
    assert code == 0 and printed.startswith(f"usage: python -m {module} ")


@pytest.mark.parametrize("module", DOCUMENTED_TOOLS)
def test_a_tool_run_as_a_file_says_how_to_run_it(module):
    path = module.replace(".", "/") + ".py"
    result = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: run it from the repository root: python -m {module} ...\n"


def test_every_documented_python_file_command_names_a_file_of_the_root():
    found = documented(ROOT_COMMAND)
    assert {"train.py", "compare.py", "simulate.py"} <= set(found)
    missing = {target: names for target, names in found.items()
               if not os.path.isfile(os.path.join(ROOT, target))}
    assert not missing, missing


def test_no_page_and_no_root_module_names_a_moved_file_where_it_was():
    """README.md, docs/ and the root's modules name infra/ and tools/ files with their folder."""
    bare = re.compile(rf"(?<![\w/.])({'|'.join(map(re.escape, MOVED))})\b")
    pages = [name for name in tracked("*.md", "*.py") if "/" not in name or
             name.startswith("docs/")]
    stale = {name: bare.findall(read(os.path.join(ROOT, name))) for name in pages}
    assert len(MOVED) == 13 and not {name: hits for name, hits in stale.items() if hits}


def test_no_page_holds_a_figure_still_to_fill():
    """A page drafted before its measurement marks the figure's place {{NAME}}; none may ship."""
    left = {name: re.findall(r"\{\{\w+\}\}", read(os.path.join(ROOT, name)))
            for name in tracked("*.md")}
    assert not {name: marks for name, marks in left.items() if marks}
