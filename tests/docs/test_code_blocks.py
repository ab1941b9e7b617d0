"""Every code block in docs/ and the README runs, or is an excerpt of a file a test runs.

See docs_blocks.py for the conventions. keras.md's blocks run in test_keras_page.py.
"""

from __future__ import annotations

import re

import pytest
from docs_blocks import (
    COMMAND_TESTS,
    EXCERPTS,
    LANGUAGES,
    PAGES,
    README,
    ROOT,
    blocks,
    check_command,
    commands,
    python_pages,
    run_page,
)

ALL_BLOCKS = [b for page in [*PAGES, README] for b in blocks(page)]


def ids(items):
    return [getattr(i, "where", getattr(i, "name", str(i))) for i in items]


def test_the_docs_have_code_blocks_of_every_kind():
    langs = {b.lang for b in ALL_BLOCKS}
    assert langs == LANGUAGES
    assert sum(b.snippets() is not None for b in ALL_BLOCKS) >= 4


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=ids(ALL_BLOCKS))
def test_block_language_is_known(block):
    assert block.lang in LANGUAGES, (
        f"{block.where}: a ```{block.lang or '(no language)'} block; use python (run), bash "
        "(commands, parsed), yaml (excerpt) or text (output, not run)"
    )


EXCERPT_BLOCKS = [b for b in ALL_BLOCKS if b.snippets() is not None]


@pytest.mark.parametrize("block", EXCERPT_BLOCKS, ids=ids(EXCERPT_BLOCKS))
def test_snippet_excerpts_name_a_tested_file_and_section(block):
    assert block.page != README, f"{block.where}: GitHub does not render snippets"
    for snippet in block.snippets():
        path, section = snippet["path"], snippet["section"]
        assert path in EXCERPTS, f"{block.where}: {path} is not a file a test runs (EXCERPTS)"
        assert (ROOT / EXCERPTS[path]).is_file()
        assert path.split("/")[1] in (ROOT / EXCERPTS[path]).read_text()
        text = (ROOT / path).read_text()
        if section:
            assert f"--8<-- [start:{section}]" in text, f"{path}: no section {section!r}"
            assert f"--8<-- [end:{section}]" in text


MARKED_BLOCKS = [b for b in ALL_BLOCKS if b.excerpt_of is not None]


@pytest.mark.parametrize("block", MARKED_BLOCKS, ids=ids(MARKED_BLOCKS))
def test_readme_excerpts_appear_verbatim(block):
    assert block.excerpt_of in EXCERPTS, f"{block.where}: {block.excerpt_of} is not tested"

    def squash(text):
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    body, source = squash(block.body), squash((ROOT / block.excerpt_of).read_text())
    assert any(source[i : i + len(body)] == body for i in range(len(source))), (
        f"{block.where} is not a verbatim excerpt of {block.excerpt_of}"
    )


YAML_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "yaml"]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=ids(YAML_BLOCKS))
def test_yaml_blocks_are_excerpts(block):
    assert block.snippets() is not None or block.excerpt_of is not None, (
        f"{block.where}: a yaml block must be an excerpt of a tested config"
    )


BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=ids(BASH_BLOCKS))
def test_shell_commands_parse(block):
    found = commands(block)
    assert found, f"{block.where}: an empty bash block"
    for words in found:
        try:
            check_command(words)
        except AssertionError as exc:
            raise AssertionError(f"{block.where}: {exc}") from None


def test_documented_commands_are_run_by_tests():
    documented = {
        " ".join(w[:2]) for b in BASH_BLOCKS for w in commands(b) if w[0] == "energy-callbacks"
    }
    assert documented <= set(COMMAND_TESTS), documented - set(COMMAND_TESTS)
    for command, test in COMMAND_TESTS.items():
        sub = command.split()[1]
        assert re.search(rf'\[\s*"{sub}"', (ROOT / test).read_text()), f"{test} runs {command}"


PAGES_TO_RUN = [p for p in python_pages() if p.name != "keras.md"]


@pytest.mark.parametrize("page", PAGES_TO_RUN, ids=[p.name for p in PAGES_TO_RUN])
def test_python_blocks_run(page, tmp_path):
    run_page(page, tmp_path, {"KERAS_BACKEND": "torch"})


PATH_NAMED = re.compile(
    r"\b((?:tests|integrations|benchmarks|energy_callbacks)/[\w/.-]*\.(?:py|yaml))"
)


@pytest.mark.parametrize("page", [*PAGES, README], ids=lambda p: p.name)
def test_files_the_docs_name_exist(page):
    """A file moved or renamed must take its mentions in the docs along."""
    missing = sorted({m for m in PATH_NAMED.findall(page.read_text()) if not (ROOT / m).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"
