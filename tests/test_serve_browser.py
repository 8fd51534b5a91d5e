"""The page of `edge2dexit serve` in a real headless browser: Debian's chromium (`apt-get install chromium`, as
.ci/run does), driven by the playwright package; playwright's own browser download is never used. A review is typed
into the page, and the label, the scores, and each sentence's read / not-read mark appear as the stream decides."""

from __future__ import annotations

import re
import shutil

import pytest

from edge2dexit.measure.serve import running_service

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = [pytest.mark.llama,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")]

POSITIVE = ["I loved this film, it was wonderful and moving.", "The acting was superb.",
            "Great fun from start to end.", "The music was lovely and the story was brilliant.",
            "A masterpiece, I will watch it again.", "Everyone should see it.", "The cast was excellent.",
            "Best movie of the year."]
WORDS_DECIDE = "Brilliant. A masterpiece."
NEGATIVE = "What a waste of time. The plot made no sense at all. The acting was wooden. Avoid it."


@pytest.fixture(scope="module")
def url():
    with running_service("--n-ctx", "512") as service:
        yield service.url


@pytest.fixture()
def page(url):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        playwright.expect(page.locator("#status")).to_have_text("connected", timeout=30_000)
        yield page
        browser.close()


def test_typing_a_review_shows_the_label_and_which_sentences_were_read(page):
    expect = playwright.expect
    page.locator("#text").click()
    page.keyboard.type(POSITIVE[0] + " ", delay=5)  # keystroke by keystroke
    for sentence in POSITIVE[1:]:
        page.keyboard.insert_text(sentence + " ")  # as typed in bursts, or pasted
    expect(page.locator("#label")).to_have_text("positive", timeout=30_000)
    expect(page.locator(".sentence")).to_have_count(len(POSITIVE), timeout=30_000)  # the last, at the pause
    read, unread = page.locator(".sentence.read"), page.locator(".sentence.unread")
    assert read.count() >= 1 and unread.count() >= 1, "an early exit leaves sentences unread"
    assert read.count() + unread.count() == len(POSITIVE)
    expect(read.first.locator(".depth")).to_contain_text(re.compile(r"layers 1–\d+ of 30"))
    expect(unread.first.locator(".depth")).to_have_text("not read")
    expect(page.locator(".score")).to_have_count(3)  # two labels and the cost
    expect(page.locator("#cost")).to_contain_text("token-layers computed")
    expect(page.locator("#exit")).to_contain_text("early exit")

    page.fill("#text", NEGATIVE)  # an edit that is no addition: the page starts the text again
    expect(page.locator("#label")).to_have_text("negative", timeout=30_000)
    expect(page.locator(".sentence")).to_have_count(4, timeout=30_000)

    # at the pause the stream finishes: the LLM answers what it read, the page says what the words thought, and
    # every sentence the deciding head read is shaded by its share of the answer
    page.fill("#text", WORDS_DECIDE)
    expect(page.locator("#exit")).to_contain_text("the words alone would say positive", timeout=30_000)
    expect(page.locator("#exit")).to_contain_text("the LLM decided")
    weighed = page.locator(".sentence.read[data-weight]")
    expect(weighed).to_have_count(page.locator(".sentence.read").count())
    assert page.locator(".sentence.read.towards").count() >= 1
