"""The portal in a real browser (Playwright driving Debian's chromium) through the real
mitmdump: the seed's admin logs in, is made to change the password, creates a user and a
key, copies the token; the official openai SDK uses it through the proxy; the usage page
shows the billed tokens on its chart and in its table. Screenshots of each page go to the
test's tmp dir (and to ``$PORTAL_SCREENSHOTS`` when set, e.g. docs/screenshots)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from stripe_double import StripeDouble
from test_portal import STRIPE_ENV

from conftest import Proxy, openai_client, start_proxy, stop_proxy, wait_for_events, write_config
from fake_upstream import FakeUpstream
from llm_billing.web.portal.accounts import DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium")


@pytest.fixture(scope="module")
def portal(tmp_path_factory, mongo_uri: str, db, upstream: FakeUpstream,
           stripe_double: StripeDouble) -> Iterator[Proxy]:
    db.billing.portal_accounts.delete_many({})  # a fresh install
    tmp = tmp_path_factory.mktemp("portal-browser")
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9",
                          f'[stripe]\napi_base = "{stripe_double.url}"\n')
    proxy = start_proxy(tmp, mongo_uri, config, "--set", "portal_signup=true", env=STRIPE_ENV)
    yield proxy
    stop_proxy(proxy)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(15_000)
        yield page
        browser.close()


class Screenshots:
    def __init__(self, page: Page, directory: Path) -> None:
        self.page, self.directory = page, directory
        self.extra = Path(os.environ["PORTAL_SCREENSHOTS"]) if os.environ.get(
            "PORTAL_SCREENSHOTS") else None

    def __call__(self, name: str) -> None:
        path = self.directory / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        if self.extra:
            self.extra.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.extra / path.name)


def test_admin_creates_a_key_and_sees_its_usage(portal: Proxy, page: Page, db, tmp_path: Path,
                                                 test_id: str):
    shot = Screenshots(page, tmp_path)
    while db.billing.portal_accounts.find_one({"role": "admin"}) is None:
        page.wait_for_timeout(50)
    page.goto(f"{portal.url}/portal")
    assert page.url.endswith("/portal/login")
    shot("01-login")
    page.fill("input[name=email]", DEFAULT_ADMIN_EMAIL)
    page.fill("input[name=password]", DEFAULT_ADMIN_PASSWORD)
    page.click("button[type=submit] >> text=Log in")
    page.wait_for_url("**/portal/password")
    assert "initial password" in page.content()
    shot("02-forced-password-change")
    new_password = "a much better admin password"
    page.fill("input[name=current]", DEFAULT_ADMIN_PASSWORD)
    page.fill("input[name=new]", new_password)
    page.fill("input[name=confirm]", new_password)
    page.click("text=Change password")
    page.wait_for_url("**/portal/users")

    user = f"acme-{test_id[:6]}"
    page.fill("form[action='/portal/users'] input[name=user]", user)
    page.fill("form[action='/portal/users'] input[name=email]", f"ops@{user}.example")
    page.select_option("form[action='/portal/users'] select[name=plan]", "starter")
    page.click("text=Create user")
    page.wait_for_selector(f"#users >> text={user}")
    shot("03-users")

    page.goto(f"{portal.url}/portal/keys?user={user}")
    page.fill("form[action='/portal/keys'] input[name=name]", "production")
    page.click("text=Create key")
    token = page.inner_text("#token").strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", token)
    shot("04-key-created")

    reply = openai_client(portal, token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello from the portal"}])
    assert reply.choices[0].message.content
    billed = wait_for_events(db, user, 1)[0]["tokens_billed"]

    page.goto(f"{portal.url}/portal/keys?user={user}")
    assert token not in page.content()  # shown once
    shot("05-keys")
    page.goto(f"{portal.url}/portal/usage?user={user}")
    assert page.inner_text("#total-tokens") == f"{billed:,}"
    assert page.locator("#chart-days rect").count() >= 1
    assert page.locator("#chart-models title", has_text=f"gpt-4o-mini: {billed:,}").count() == 1
    assert page.locator("#usage tbody tr td", has_text="gpt-4o-mini").count() == 1
    shot("06-usage")
    for name in ("events", "plans"):
        page.goto(f"{portal.url}/portal/{name}")
        shot(f"07-{name}")
    page.goto(f"{portal.url}/docs")
    assert page.locator("pre code", has_text="from openai import OpenAI").count() >= 1
    shot("10-docs")
    assert token not in portal.log
    assert len(list(tmp_path.glob("*.png"))) == 9


def test_user_signs_up_and_upgrades(portal: Proxy, page: Page, db, tmp_path: Path,
                                    stripe_double: StripeDouble, test_id: str):
    shot = Screenshots(page, tmp_path)
    email, password = f"dev-{test_id[:6]}@example.com", "a password of mine"
    page.goto(f"{portal.url}/portal/login")
    page.click("text=Sign up")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.fill("input[name=confirm]", password)
    shot("08-signup")
    page.click("text=Create account")
    page.wait_for_url("**/portal/login")
    page.fill("input[name=password]", password)  # the email is filled in
    page.click("button:has-text('Log in')")
    page.wait_for_url("**/portal/me")
    db.billing.users.update_one({"_id": email}, {"$set": {"plan": "free"}})
    page.reload()
    assert page.inner_text("#tokens-left") == "10,000"
    shot("09-my-plan")
    # Stripe's hosted page is not reachable offline: the browser gets a stand-in
    page.route("https://checkout.stripe.com/**", lambda route: route.fulfill(
        body="<h1>Stripe Checkout (stand-in)</h1>", content_type="text/html"))
    page.click("#upgrade-starter")
    page.wait_for_url("https://checkout.stripe.com/c/pay/cs_test_*")
    call = stripe_double.calls("/v1/checkout/sessions")[-1].params
    assert call["client_reference_id"] == email
    assert call["line_items"]["0"]["price"] == "price_starter_llmgateway"
