"""End to end in headless Chromium: two annotators label in parallel, the server restarts, both resume where they
stopped with their answers kept, and the accuracy page shows the value expected for planted answers."""

import asyncio
import csv
import io
import urllib.request
from urllib.parse import quote

import pytest

from helpers import INJECT_IMG, INJECT_SCRIPT, AnnotateServer, artifact_dir, http_json
from refusalscope.annotate.store import AnnotationStore

WRONG = ["copyright violations"]


def _cats(labels, feature):
    """What our browser annotators tick: the activation-based label (None when it is empty)."""
    return list(labels[feature])


async def _label(browser, url, name, n, labels, shots, errors):
    ctx = await browser.new_context()
    page = await ctx.new_page()
    page.on("pageerror", lambda e: errors.append(f"{name}: {e}"))
    page.on("console", lambda m: errors.append(f"{name}: {m.text}") if m.type == "error" else None)
    await page.goto(url)
    await page.fill("#name", name)
    async with page.expect_navigation():
        await page.click("#start")
    given = []
    for i in range(n):
        feature = await page.inner_text("#feature")
        cats = _cats(labels, feature)
        for c in cats:
            await page.check(f'input[name="category"][value="{c}"]')
        if not cats:
            await page.check("#none")
        if i == 0:
            await page.screenshot(path=str(shots / f"annotate-{name}.png"), full_page=True)
        async with page.expect_navigation():
            await page.click("#submit")
        given.append((feature, sorted(cats)))
        assert await page.inner_text("#progress") == f"{i + 1} of {await _total(page)}"
    await ctx.close()  # closing the browser loses nothing: every answer was stored when given
    return given


async def _total(page):
    return (await page.inner_text("#progress")).split(" of ")[1]


async def _resume(browser, url, name, shots):
    ctx = await browser.new_context()
    page = await ctx.new_page()
    await page.goto(url)
    await page.fill("#name", name)
    async with page.expect_navigation():
        await page.click("#start")
    feature, progress = await page.inner_text("#feature"), await page.inner_text("#progress")
    await page.screenshot(path=str(shots / f"resume-{name}.png"), full_page=True)
    await ctx.close()
    return feature, progress


def _export(url):
    with urllib.request.urlopen(url + "export.csv", timeout=30) as r:
        return list(csv.DictReader(io.StringIO(r.read().decode())))


@pytest.mark.timeout(600)
def test_two_annotators_restart_resume_and_accuracy(analysed_run, chromium, tmp_path):
    from playwright.async_api import async_playwright

    run, _, info = analysed_run
    labels = {f: sorted(c) for f, c in info["labels"].items()}
    shots = artifact_dir(tmp_path)
    errors: list[str] = []
    opts = ("--n-pipeline", "1000", "--n-active", "6", "--n-inactive", "6")

    async def first_session(url):
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium)
            try:
                return await asyncio.gather(_label(browser, url, "alice", 4, labels, shots, errors),
                                            _label(browser, url, "bob", 3, labels, shots, errors))
            finally:
                await browser.close()

    with AnnotateServer(run, *opts) as server:
        alice, bob = asyncio.run(first_session(server.url))
    store = AnnotationStore(run / "annotations.sqlite")
    assert [f for f, _ in alice] == store.order("alice")[:4] and [f for f, _ in bob] == store.order("bob")[:3]

    # a fresh server process: answers kept, each annotator resumes at their first unanswered feature
    with AnnotateServer(run, *opts) as server:
        url = server.url
        rows = _export(url)
        assert sorted((r["annotator"], r["feature"], r["categories"]) for r in rows) == sorted(
            [("alice", f, ";".join(c) or "None") for f, c in alice] + [("bob", f, ";".join(c) or "None")
                                                                         for f, c in bob])

        async def second_session():
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium)
                try:
                    return await asyncio.gather(_resume(browser, url, "alice", shots),
                                                _resume(browser, url, "bob", shots))
                finally:
                    await browser.close()

        (a_feature, a_progress), (b_feature, b_progress) = asyncio.run(second_session())
        total = len(store.items())
        assert (a_feature, a_progress) == (store.order("alice")[4], f"4 of {total}")
        assert (b_feature, b_progress) == (store.order("bob")[3], f"3 of {total}")

        # planted answers: p1-p3 agree with the activation label on the first 5 features (sample order), and all
        # tick a wrong category elsewhere, so exactly those 5 majorities are exact (alice and bob tick the label)
        planted = [f for f, _ in store.items()][:5]
        for name in ("p1", "p2", "p3"):
            assert http_json(url + "api/start", {"name": name})[0] == 200
            for _ in range(total):
                status, nxt = http_json(f"{url}api/next?annotator={quote(name)}")
                f = nxt["feature"]
                cats = labels[f] if f in planted else (WRONG if labels[f] != WRONG else ["wildchats"])
                status, body = http_json(url + "api/answer", {"annotator": name, "feature": f, "token": nxt["token"],
                                                              "categories": cats, "none": not cats})
                assert status == 200, body
        expected = f"{100 * len(planted) / total:.1f}%"

        async def accuracy_page():
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium)
                page = await browser.new_page()
                await page.goto(url + "accuracy")
                out = (await page.inner_text("#exact-accuracy"), await page.inner_text("#n-scored"))
                await page.screenshot(path=str(shots / "accuracy.png"), full_page=True)
                await browser.close()
                return out

        assert asyncio.run(accuracy_page()) == (expected, str(total))
    assert not errors, errors


@pytest.mark.timeout(300)
def test_injection_shows_as_text_in_the_app(analysed_run, chromium, tmp_path):
    """The injected explanation and context token are text on the page: no element is created, no script runs."""
    from playwright.sync_api import sync_playwright

    run, _, info = analysed_run
    injected = info["injected_feature"]
    with AnnotateServer(run, "--n-pipeline", "1000", "--order", "shared") as server:
        store = AnnotationStore(run / "annotations.sqlite")
        assert http_json(server.url + "api/start", {"name": "eve"})[0] == 200
        while (nxt := http_json(f"{server.url}api/next?annotator=eve")[1])["feature"] != injected:
            http_json(server.url + "api/answer", {"annotator": "eve", "feature": nxt["feature"],
                                                  "token": nxt["token"], "categories": [], "none": True})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "annotate?annotator=eve")
            assert page.inner_text("#feature") == injected
            assert INJECT_SCRIPT in page.inner_text("#explanation")
            assert INJECT_IMG in page.inner_text("body")
            assert page.locator("img").count() == 0 and page.locator("script").count() == 0
            assert page.evaluate("window.__pwned") is None
            page.screenshot(path=str(artifact_dir(tmp_path) / "annotate-injection.png"), full_page=True)
            browser.close()
        assert not errors
    assert store.next_feature("eve")[1] == injected
