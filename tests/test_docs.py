"""The documentation site builds without a warning, and every link inside it leads somewhere.

`make docs` builds docs/ with Sphinx (MyST pages, autodoc API reference) with warnings as
errors; this test does the same into a temporary folder, then reads every HTML page it
wrote and checks each local `href` and `src`: the file exists, and an `#anchor` names an
id in it. It also checks that the site needs nothing from the network to display (no
script, stylesheet or image from another host), and that the README's relative links, which
GitHub follows, point at files of the repository. No internet needed; about 10-20 s.
"""

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"

if not os.environ.get("CI"):
    pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="the docs extra: pip install -e '.[docs]'")


class _Page(HTMLParser):
    """The ids a page defines, and the links (tag, attribute, value) it holds."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif name in ("href", "src"):
                self.links.append((tag, name, value))


def _read(page: Path) -> _Page:
    parsed = _Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    return parsed


def broken_local_links(site: Path) -> list[str]:
    """Every local link of the built site that names a missing file or anchor."""
    pages = {page: _read(page) for page in site.rglob("*.html")}
    broken = []
    for page, parsed in pages.items():
        for _, _, value in parsed.links:
            parts = urlsplit(value)
            if parts.scheme or value.startswith("//"):
                continue  # another host (not fetched here), mailto:, data:
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {value} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _read(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {value} (no such anchor)")
    return broken


def remote_assets(site: Path) -> list[str]:
    """Scripts, stylesheets, images and CSS `url()`s a browser would fetch from another host."""
    found = []
    for page in site.rglob("*.html"):
        for tag, attribute, value in _read(page).links:
            remote = urlsplit(value).scheme in ("http", "https") or value.startswith("//")
            if remote and (attribute == "src" or tag == "link"):
                found.append(f"{page.relative_to(site)}: <{tag} {attribute}={value}>")
    for sheet in site.rglob("*.css"):
        for value in re.findall(r"url\(\s*['\"]?([^'\")]+)", sheet.read_text(encoding="utf-8")):
            if urlsplit(value).scheme in ("http", "https") or value.startswith("//"):
                found.append(f"{sheet.relative_to(site)}: url({value})")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + [str(DOCS), str(out / "html"), "-d", str(out / "doctrees")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "html"


def test_the_site_builds_with_warnings_as_errors(site):
    for page in ["index", "api/strategies", "api/cli", "guides/own-app", "guides/guarantees"]:
        assert (site / f"{page}.html").is_file(), page


def test_every_local_link_of_the_site_resolves(site):
    assert broken_local_links(site) == []


def test_the_site_fetches_nothing_from_another_host(site):
    assert remote_assets(site) == []


def test_the_api_reference_is_generated_from_the_docstrings(site):
    strategies = (site / "api/strategies.html").read_text(encoding="utf-8")
    for name in ["HEFedAvg", "DPFedAvg", "HEDPFedAvg", "CheckedFedAvg"]:
        assert f'id="lepton_flwr.strategies.{name}"' in strategies, name
    assert 'id="lepton_flwr.mods.he_dp_mod"' in (site / "api/mods.html").read_text("utf-8")
    assert 'id="lepton_flwr.dp.LeptonAccountant"' in (site / "api/dp.html").read_text("utf-8")
    cli = (site / "api/cli.html").read_text(encoding="utf-8")
    for command in ["keygen", "decrypt", "certs", "node-key", "check-node"]:
        assert f'id="lepton-flwr-{command}"' in cli, command


def test_the_home_page_is_the_readme(site):
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Privacy-preserving federated learning for" in home
    assert 'id="the-two-commands"' in home and 'id="results"' in home
    assert 'href="guides/deployment.html"' in home  # README's docs/guides/deployment.md


def test_the_readme_links_point_at_files_of_the_repository():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t for t in targets if not urlsplit(t).scheme and not t.startswith("#")]
    assert len(local) >= 10  # the Documentation list, the figure
    for target in local:
        assert (REPO_ROOT / urlsplit(target).path).is_file(), target


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.html").write_text(
        '<p id="here"><a href="b.html">b</a> <a href="a.html#here">ok</a>'
        ' <a href="#gone">x</a> <img src="img/none.png"> <a href="https://x.org">far</a></p>'
    )
    assert broken_local_links(tmp_path) == [
        "a.html: b.html (no such file)",
        "a.html: #gone (no such anchor)",
        "a.html: img/none.png (no such file)",
    ]
    (tmp_path / "b.html").write_text('<script src="https://cdn.example/x.js"></script>')
    (tmp_path / "c.css").write_text('a{background:url("data:x")} b{src:url(//f.example/a)}')
    assert remote_assets(tmp_path) == [
        "b.html: <script src=https://cdn.example/x.js>",
        "c.css: url(//f.example/a)",
    ]
