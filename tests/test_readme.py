"""The README tells the truth: the first command prints what it says, and its Python snippet runs as written."""
import contextlib
import io
import os
import re

from captioner.cli import main
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _block(after: str, lang: str = "") -> str:
    """The first fenced block after the line `after`."""
    rest = README[README.index(after):]
    m = re.search(rf"```{lang}\n(.*?)```", rest, re.S)
    assert m, after
    return m.group(1)


def test_first_command_prints_what_the_readme_shows(monkeypatch):
    monkeypatch.chdir(ROOT)
    shown = _block("The first prints one caption per photo:")
    images = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "captioner" / "assets" / "examples").glob("*.jpg"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["caption", *images]) == 0
    assert out.getvalue() == shown


def test_python_snippet_runs_as_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    code = _block("## Caption", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip() and os.getcwd() == str(ROOT)
