"""The docs' code blocks and how each kind is checked (used by tests/docs/test_*.py).

Conventions, also stated in docs/architecture.md ("The docs"):

- ```python blocks of one page run in order, in one fresh Python process (the
  page is one session), in an empty temporary directory. Examples use the
  bundled digits and a few epochs, so a page runs in seconds.
- A block whose body is only ``--8<-- "PATH:SECTION"`` lines is an excerpt,
  included by pymdownx.snippets when the site is built: PATH must exist, hold
  the section markers, and be a file that a test runs (:data:`EXCERPTS`).
- ```bash blocks hold commands: each must parse against what it names (the
  CLI's own parser, the Makefile's targets, a script in the repository, the
  package's extras). The tests named in :data:`COMMAND_TESTS` run them.
- ```yaml blocks must be excerpts.
- ```text blocks are program output and diagrams; they are not run.
- A page can set its process's environment with a line
  ``<!-- docs-test env: NAME=value ... -->`` (distributed.md runs on JAX with
  two host devices).
- README.md, which GitHub renders without snippets, marks an excerpt with an
  ``<!-- excerpt: PATH -->`` line before the block, and the block must appear
  in PATH verbatim (up to indentation).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README = ROOT / "README.md"
LANGUAGES = {"python", "bash", "yaml", "text"}

EXCERPTS = {
    # excerpted file: the test that runs it
    "integrations/lightning_cli/config.yaml": "tests/integrations/test_lightning_cli.py",
    "integrations/lightning_cli/train.py": "tests/integrations/test_lightning_cli.py",
    "integrations/keras_fit/train.py": "tests/integrations/test_keras_fit.py",
    "integrations/torch_loop/train.py": "tests/integrations/test_torch_loop.py",
    "integrations/hf_trainer/train.py": "tests/integrations/test_hf_trainer.py",
    "integrations/continual/train.py": "tests/integrations/test_continual.py",
    "tests/lightning/ddp_run.py": "tests/lightning/test_ddp.py",
    "tests/lightning/model_parallel_run.py": "tests/lightning/test_model_parallel.py",
    "integrations/fsdp/train.py": "tests/integrations/test_fsdp.py",
    "tests/lightning/test_pipeline.py": "tests/lightning/test_pipeline.py",
}
COMMAND_TESTS = {
    "energy-callbacks demo": "tests/test_demo.py",
    "energy-callbacks plot": "tests/test_plot.py",
    "energy-callbacks reproduce": "tests/test_reproduce.py",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
_SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
_EXCERPT_MARK = re.compile(r"^<!-- excerpt: (?P<path>\S+) -->$")
_PAGE_ENV = re.compile(r"^<!-- docs-test env: (?P<pairs>.+) -->$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    excerpt_of: str | None = None  # README's <!-- excerpt: PATH --> mark

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def snippets(self) -> list[re.Match[str]] | None:
        """The ``--8<--`` lines if the whole body is made of them, else None."""
        lines = [ln.strip() for ln in self.body.splitlines() if ln.strip()]
        matches = [_SNIPPET.match(ln) for ln in lines]
        if lines and all(matches):
            return [m for m in matches if m is not None]
        return None


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, indentation (lists, admonitions) removed."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, indent = i, fence["indent"]
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page}:{start + 1}: code block never closed")
        mark = _EXCERPT_MARK.match(lines[start - 1].strip()) if start else None
        found.append(
            Block(page, start + 1, fence["lang"], "\n".join(body) + "\n", mark and mark["path"])
        )
        i += 1
    return found


def python_pages() -> list[Path]:
    return [p for p in [*PAGES, README] if any(_runs(b) for b in blocks(p))]


def _runs(block: Block) -> bool:
    return block.lang == "python" and block.snippets() is None and block.excerpt_of is None


RUNNER = """
import json, sys
for where, source in json.load(open(sys.argv[1])):
    exec(compile(source, where, "exec"), globals())
"""


def run_page(page: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
    """Run the page's python blocks in one process; fail with the block's location."""
    sources = [(b.where, textwrap.dedent(b.body)) for b in blocks(page) if _runs(b)]
    script = workdir / "blocks.json"
    script.write_text(json.dumps(sources))
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", **(env or {}))
    environment.update(page_env(page))
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the python blocks of {page.name} failed:\n{proc.stderr[-4000:]}")


def page_env(page: Path) -> dict[str, str]:
    """The page's ``<!-- docs-test env: ... -->`` settings."""
    found = _PAGE_ENV.search(page.read_text())
    return dict(pair.split("=", 1) for pair in found["pairs"].split()) if found else {}


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m[1] for m in re.finditer(r"^([\w.-]+):", text, re.MULTILINE)}


def extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return {m[1] for m in re.finditer(r"^([\w-]+)\s*=", section, re.MULTILINE)}


def commands(block: Block) -> list[list[str]]:
    """The commands of a bash block, continuation lines joined, comments dropped."""
    text = block.body.replace("\\\n", " ")
    return [words for ln in text.splitlines() if (words := shlex.split(ln, comments=True))]


def check_command(words: list[str]) -> None:
    """Raise AssertionError unless the command parses against what it names."""
    from energy_callbacks.cli import build_parser

    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    program, args = words[0], words[1:]
    if program == "make":
        unknown = set(args) - makefile_targets()
        assert not unknown, f"make: no target {sorted(unknown)} in the Makefile"
    elif program == "energy-callbacks":
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"energy-callbacks {' '.join(args)}: does not parse") from exc
    elif program in ("python", "python3"):
        if args[:1] == ["-m"]:
            assert args[1] in ("energy_callbacks.cli", "pytest"), f"python -m {args[1]}"
        else:
            assert (ROOT / args[0]).is_file(), f"python {args[0]}: no such file"
    elif program == "pip":
        assert args[0] == "install"
        for arg in args[1:]:
            names = re.fullmatch(r"(?:-e )?'?(?:\.|energy-callbacks)\[([\w,-]+)\]'?", arg)
            if names:
                unknown = set(names[1].split(",")) - extras()
                assert not unknown, f"pip install: no extra {sorted(unknown)} in pyproject.toml"
            else:
                assert arg in ("-e", "."), f"pip install {arg}: only this package's extras"
    elif program == "torchrun":  # torchrun [options] SCRIPT [script arguments]
        scripts = [a for a in args if a.endswith(".py")]
        assert scripts and (ROOT / scripts[0]).is_file(), f"torchrun: no script in {args}"
    elif program == "tensorboard":
        assert args[:1] == ["--logdir"]
    else:
        raise AssertionError(f"{program}: not a command the docs test knows how to check")
