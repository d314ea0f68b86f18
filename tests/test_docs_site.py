"""The documentation site: `mkdocs build --strict` from the notebooks the suite executes
(tests/notebook_runs.py), then the built site served on localhost and opened in headless
Chromium: every notebook page shows its figures, every API page lists its module's public names,
no internal link is broken. The browser test saves the screenshots docs/img/site_landing.png and
docs/img/site_notebook.png that the README and docs/site.md show."""

from __future__ import annotations

import fcntl
import functools
import http.server
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import threading
import time
import types
from html.parser import HTMLParser
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urldefrag, urljoin, urlparse
from urllib.request import urlopen

import pytest
from notebook_runs import NOTEBOOKS, ROOT, executed, shared_dir

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None
)
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
API_PAGES = {  # page -> the modules whose __all__ it must list
    "api/core/": ["loopscope"],
    "api/analysis/": ["loopscope.analysis"],
    "api/probes/": ["loopscope.probes"],
    "api/circuits/": ["loopscope.circuits"],
    "api/models/": ["loopscope.models"],
    "api/tasks/": ["loopscope.tasks"],
    "api/zoo/": ["loopscope.zoo"],
    "api/figures/": ["loopscope.figures"],
    "api/experiments/": [  # a package of experiment modules, each with its __all__
        f"loopscope.experiments.{m.name}"
        for m in pkgutil.iter_modules([str(ROOT / "loopscope" / "experiments")])
    ],
}
SCREENSHOT_NOTEBOOK = "notebooks/01_convergence_vs_correctness/"


def _build(folder: Path) -> dict:
    """Build the site into ``folder/site`` from the executed notebooks: the strict build's
    return code, its stderr and its wall time."""
    runs = [executed(p, folder) for p in NOTEBOOKS]
    failed = [r.path.name for r in runs if r.error]
    if failed:
        return {"returncode": -1, "stderr": f"notebooks failed to execute: {failed}", "seconds": 0}
    paper = folder / "paper_out"  # a one-figure report for the paper page
    subprocess.run(
        [sys.executable, "-m", "loopscope", "paper", "--quick", "--quiet", "--jobs", "1"]
        + ["--only", "memorization", "--out", str(paper)],
        check=True,
        capture_output=True,
    )
    env = dict(
        os.environ,
        LOOPSCOPE_DOCS_NOTEBOOKS=str(folder / "notebooks"),
        LOOPSCOPE_DOCS_EXECUTE="false",
        LOOPSCOPE_DOCS_PAPER=str(paper),
        NO_MKDOCS_2_WARNING="1",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    return {"returncode": proc.returncode, "stderr": proc.stderr[-6000:], "seconds": seconds}


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site built strictly from the executed notebooks, once per test run (the xdist
    workers share it like the notebooks)."""
    folder = shared_dir(tmp_path_factory)
    status = folder / "site.json"
    with open(folder / "site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not status.exists():
            status.write_text(json.dumps(_build(folder)))
    build = json.loads(status.read_text())
    assert build["returncode"] == 0, build["stderr"]
    print(f"mkdocs build --strict: {build['seconds']:.1f} s")
    return folder / "site"


def test_strict_build_renders_every_notebook_with_its_figures(site):
    for nb in NOTEBOOKS:
        page = site / "notebooks" / nb.stem / "index.html"
        assert page.exists(), f"no page for {nb.name}"
        html = page.read_text(encoding="utf-8")
        assert "data:image/png;base64," in html, f"{nb.name}: no figure on its page"


def test_the_paper_page_shows_the_report(site):
    html = (site / "paper" / "index.html").read_text(encoding="utf-8")
    assert "Memorization: correctness vs subgraph frequency" in html
    assert (site / "paper" / "memorization.png").stat().st_size > 0
    assert 'src="memorization.png"' in html


def _public_ids(modules: list[str]) -> list[str]:
    """The heading ids the API page of ``modules`` must have: one per name in ``__all__``
    (subpackages left out: they have pages of their own)."""
    ids = []
    for module in modules:
        mod = importlib.import_module(module)
        ids += [
            f"{module}.{n}"
            for n in mod.__all__
            if not n.startswith("__") and not isinstance(getattr(mod, n), types.ModuleType)
        ]
    return ids


def test_api_pages_are_generated_for_every_public_name(site):
    for page, modules in API_PAGES.items():
        html = (site / page / "index.html").read_text(encoding="utf-8")
        missing = [i for i in _public_ids(modules) if f'id="{i}"' not in html]
        assert not missing, f"{page}: no entry for {missing}"


# -- in a browser ---------------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served(site):
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
        pytest.skip(
            "headless Chromium is not installed (apt-get install chromium chromium-driver; "
            ".ci/run does this where apt is available)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("a", "link") and a.get("href"):
            self.hrefs.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.hrefs.append(a["src"])


def _crawl(root: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Every page reachable from ``root`` by internal links, and the broken links
    ``(page, href, why)``: a missing target, or a ``#fragment`` the target page lacks."""
    pages, broken, seen, queue, cache = [], [], set(), [root], {}

    def fetch(url):
        if url not in cache:
            try:
                with urlopen(url) as r:
                    body = r.read()
                    cache[url] = (r.status, r.headers.get_content_type(), body)
            except HTTPError as e:
                cache[url] = (e.code, "", b"")
        return cache[url]

    while queue:
        page = queue.pop()
        if page in seen:
            continue
        seen.add(page)
        status, kind, body = fetch(page)
        if kind != "text/html":
            continue
        pages.append(page)
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for href in parser.hrefs:
            url = urljoin(page, href)
            if urlparse(url).netloc != urlparse(root).netloc or url.startswith("data:"):
                continue
            target, fragment = urldefrag(url)
            status, kind, body = fetch(target)
            if status != 200:
                broken.append((page, href, f"HTTP {status}"))
                continue
            if fragment and kind == "text/html":
                html = body.decode("utf-8", "replace")
                if f'id="{fragment}"' not in html and f'name="{fragment}"' not in html:
                    broken.append((page, href, "no such anchor"))
            if kind == "text/html" and target not in seen:
                queue.append(target)
    return pages, broken


def test_in_a_browser(served, browser):
    pages, broken = _crawl(served)
    assert not broken, f"broken internal links: {broken[:20]}"
    paths = {urlparse(p).path for p in pages}
    for nb in NOTEBOOKS:
        assert f"/notebooks/{nb.stem}/" in paths, f"{nb.name}: its page is not linked from the site"
    assert all(f"/{p}" in paths for p in API_PAGES), "an API page is not linked from the site"

    def load(path):
        browser.get(urljoin(served, path))
        browser.execute_script(
            "window.scrollTo(0, document.body.scrollHeight);"
            "document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager');"
        )
        deadline = time.time() + 30
        while time.time() < deadline:  # every image either loaded or failed
            if browser.execute_script("return Array.from(document.images).every(i => i.complete);"):
                break
            time.sleep(0.2)
        browser.execute_script("window.scrollTo(0, 0);")

    for nb in NOTEBOOKS:
        load(f"notebooks/{nb.stem}/")
        widths = browser.execute_script(
            "return Array.from(document.querySelectorAll('.jupyter-wrapper img'))"
            ".map(i => i.naturalWidth);"
        )
        assert widths, f"{nb.name}: no figure shown"
        assert all(w > 0 for w in widths), f"{nb.name}: a figure did not load ({widths})"
        if f"notebooks/{nb.stem}/" == SCREENSHOT_NOTEBOOK:  # its first figure, in view
            browser.execute_script(
                "document.querySelector('.jupyter-wrapper img').scrollIntoView({block: 'center'});"
            )
            time.sleep(1)  # the theme's header swaps its title on scroll, animated
            browser.save_screenshot(str(ROOT / "docs" / "img" / "site_notebook.png"))

    load("paper/")
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('article img')).map(i => i.naturalWidth);"
    )
    assert widths and all(w > 0 for w in widths), f"paper report figures: {widths}"

    for path, modules in API_PAGES.items():
        load(path)
        shown = set(
            browser.execute_script(
                "return Array.from(document.querySelectorAll('[id]')).map(e => e.id);"
            )
        )
        missing = [i for i in _public_ids(modules) if i not in shown]
        assert not missing, f"{path}: public names not listed: {missing}"

    load("")
    assert "loopscope" in browser.title
    browser.save_screenshot(str(ROOT / "docs" / "img" / "site_landing.png"))
