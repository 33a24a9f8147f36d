"""Sphinx configuration of the lepton-flwr documentation site.

Build: ``make docs`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``).
Pages are Markdown (MyST); the API reference comes from the numpy-style docstrings
(autodoc + napoleon); the CLI page from the argparse parser itself (``_ext/cli_help.py``).
Nothing is fetched at build or view time: no intersphinx, and a theme that ships its assets.
"""

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "lepton-flwr"
author = "lepton-flwr contributors"
copyright = "lepton-flwr contributors"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "cli_help",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "screenshots"]

# Markdown: GitHub-style heading anchors, so that `page.md#a-heading` links work on GitHub
# and in the site alike.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# numpy-style docstrings; the reference shows members in source order.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# `name` in a docstring is code, as on GitHub, not a title reference.
default_role = "code"

html_theme = "furo"
html_title = "lepton-flwr"
html_static_path: list[str] = []
html_show_sourcelink = False


# Docstrings are written to read well in a terminal, where `|S|` is a set's size and a
# long list of parameter names may wrap. reST reads `|S|` as a substitution and napoleon a
# wrapped name list as two parameters; both are mended here, at build time, for the
# rendering only (the library's docstrings stay as they are).
_SIZE_BARS = re.compile(r"(?<![|\\\w])\|([^|\s`][^|`]{0,10}?)\|(?![|\w])")
_LITERAL = re.compile(r"(``.*?``)")
_SECTION = re.compile(r"^(Parameters|Other Parameters|Attributes|Returns|Raises)$")


def _escape_size_bars(line: str) -> str:
    parts = _LITERAL.split(line)
    return "".join(
        part if part.startswith("``") else _SIZE_BARS.sub(r"\\|\1\\|", part) for part in parts
    )


def _join_wrapped_names(lines: list[str]) -> list[str]:
    """Join ``a, b,`` and ``c`` on the next line, at a numpy section's margin: ``a, b, c``."""
    out: list[str] = []
    in_section = False
    for line in lines:
        if _SECTION.match(line.strip()) and not line.startswith(" "):
            in_section = True
        elif not line.strip() and out and not out[-1].strip():
            in_section = False
        if (
            in_section
            and out
            and out[-1].rstrip().endswith(",")
            and not out[-1].startswith(" ")
            and line
            and not line.startswith(" ")
        ):
            out[-1] = out[-1].rstrip() + " " + line.strip()
            continue
        out.append(line)
    return out


def _mend_docstring(app, what, name, obj, options, lines):
    lines[:] = [_escape_size_bars(line) for line in _join_wrapped_names(lines)]


def setup(app):
    """Mend docstrings before napoleon reads them."""
    app.connect("autodoc-process-docstring", _mend_docstring, priority=400)  # before napoleon
