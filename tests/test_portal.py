"""The portal through the real mitmdump: login, sessions, CSRF, throttling, admin pages,
keys shown once, usage, self-service (httpx; the browser walk-through is in
test_portal_browser.py)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from bson import Decimal128
from starlette.routing import Mount, Route
from stripe_double import StripeDouble

from conftest import (
    Proxy,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
    wait_for_usage,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.settings import read_config
from llm_billing.web.portal import Portal
from llm_billing.web.portal.accounts import DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD

NEW_ADMIN_PASSWORD = "correct horse battery staple"
STRIPE_ENV = {"STRIPE_SECRET_KEY": "sk_test_" + "p" * 24, "STRIPE_WEBHOOK_SECRET": "whsec_portal"}


@pytest.fixture(scope="module")
def portal(tmp_path_factory, mongo_uri: str, db, upstream: FakeUpstream,
           stripe_double: StripeDouble) -> Iterator[Proxy]:
    """A fresh install (no portal account yet), sign-up open, Stripe at the double."""
    db.billing.portal_accounts.delete_many({})
    tmp = tmp_path_factory.mktemp("portal")
    config = write_config(tmp / "config.toml", upstream.url, "http://127.0.0.1:9",
                          f'[stripe]\napi_base = "{stripe_double.url}"\n')
    proxy = start_proxy(tmp, mongo_uri, config, "--set", "portal_signup=true", env=STRIPE_ENV)
    yield proxy
    stop_proxy(proxy)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def browser(proxy: Proxy) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, follow_redirects=False, timeout=30)


def log_in(client: httpx.Client, email: str, password: str) -> httpx.Response:
    token = csrf_of(client.get("/portal/login").text)
    return client.post("/portal/login", data={"csrf": token, "email": email,
                                              "password": password})


def wait_for_admin(proxy: Proxy, db) -> None:
    deadline = time.monotonic() + 20
    while db.billing.portal_accounts.find_one({"role": "admin"}) is None:
        assert time.monotonic() < deadline, proxy.log
        time.sleep(0.05)


@pytest.fixture(scope="module")
def admin(portal: Proxy, db) -> Iterator[httpx.Client]:
    """A logged-in admin session, past the forced password change."""
    wait_for_admin(portal, db)
    with browser(portal) as client:
        response = log_in(client, DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD)
        if response.status_code == 401:  # an earlier test changed it already
            response = log_in(client, DEFAULT_ADMIN_EMAIL, NEW_ADMIN_PASSWORD)
        else:
            assert response.headers["location"] == "/portal/password"
            token = csrf_of(client.get("/portal/password").text)
            response = client.post("/portal/password", data={
                "csrf": token, "current": DEFAULT_ADMIN_PASSWORD, "new": NEW_ADMIN_PASSWORD,
                "confirm": NEW_ADMIN_PASSWORD})
        assert response.status_code == 303, response.text
        yield client


def test_portal_redirects_to_login(portal: Proxy):
    response = httpx.get(f"{portal.url}/portal")
    assert (response.status_code, response.headers["location"]) == (303, "/portal/login")
    login = httpx.get(f"{portal.url}/portal/login")
    assert login.status_code == 200 and 'type="password"' in login.text


def test_session_cookie_flags(portal: Proxy):
    response = httpx.get(f"{portal.url}/portal/login")
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("portal_session=")
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/portal" in cookie
    assert "secure" not in cookie  # plain http here; https gets Secure (test_portal_units)
    for header in ("content-security-policy", "x-frame-options"):
        assert header in response.headers
    assert response.headers["cache-control"] == "no-store"


def test_default_admin_must_change_password(portal: Proxy, db):
    wait_for_admin(portal, db)
    deadline = time.monotonic() + 10  # logged once the stored hash is checked, just after
    while "still has the default password" not in portal.log:
        assert time.monotonic() < deadline, portal.log
        time.sleep(0.05)
    account = db.billing.portal_accounts.find_one({"_id": DEFAULT_ADMIN_EMAIL})
    assert account["password_hash"].startswith("$argon2")
    assert DEFAULT_ADMIN_PASSWORD not in str(account)
    with browser(portal) as client:
        response = log_in(client, DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD)
        assert (response.status_code, response.headers["location"]) == (303, "/portal/password")
        # every page sends it back to the password form until the password is changed
        assert client.get("/portal/users").headers["location"] == "/portal/password"
        token = csrf_of(client.get("/portal/password").text)
        refused = client.post("/portal/password", data={
            "csrf": token, "current": DEFAULT_ADMIN_PASSWORD, "new": DEFAULT_ADMIN_PASSWORD,
            "confirm": DEFAULT_ADMIN_PASSWORD})
        assert refused.status_code == 400
        changed = client.post("/portal/password", data={
            "csrf": token, "current": DEFAULT_ADMIN_PASSWORD, "new": NEW_ADMIN_PASSWORD,
            "confirm": NEW_ADMIN_PASSWORD})
        assert (changed.status_code, changed.headers["location"]) == (303, "/portal/users")
    with browser(portal) as client:
        assert log_in(client, DEFAULT_ADMIN_EMAIL, DEFAULT_ADMIN_PASSWORD).status_code == 401
        response = log_in(client, DEFAULT_ADMIN_EMAIL, NEW_ADMIN_PASSWORD)
        assert (response.status_code, response.headers["location"]) == (303, "/portal/users")


def test_post_without_csrf_token_is_refused(portal: Proxy, admin: httpx.Client):
    with browser(portal) as client:
        client.get("/portal/login")  # has a session and its token, but does not send it
        response = client.post("/portal/login", data={"email": DEFAULT_ADMIN_EMAIL,
                                                      "password": NEW_ADMIN_PASSWORD})
        assert response.status_code == 403
        wrong = client.post("/portal/login", data={
            "csrf": "x" * 43, "email": DEFAULT_ADMIN_EMAIL, "password": NEW_ADMIN_PASSWORD})
        assert wrong.status_code == 403
    for path in post_paths(portal):  # every form of the portal, logged in as admin
        response = admin.post(path, data={"user": "nobody", "plan": "pro"})
        assert response.status_code == 403, (path, response.status_code)
    assert admin.get("/portal/users").status_code == 200  # still logged in


def post_paths(proxy: Proxy) -> list[str]:
    paths = []
    for route in Portal(None, None).page_routes():  # type: ignore[arg-type]
        if isinstance(route, Route) and "POST" in (route.methods or ()):
            paths.append("/portal" + route.path)
        assert not isinstance(route, Mount) or route.path == "/static"
    assert len(paths) >= 4
    return paths


def test_wrong_password_is_rate_limited(portal: Proxy, db):
    email = "throttled@example.com"
    with browser(portal) as client:
        for _ in range(5):
            assert log_in(client, email, "wrong password").status_code == 401
        limited = log_in(client, email, "wrong password")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert log_in(client, DEFAULT_ADMIN_EMAIL, "still wrong").status_code == 401  # per account


def test_logout_ends_the_session(portal: Proxy, db, admin: httpx.Client):
    with browser(portal) as client:
        assert log_in(client, DEFAULT_ADMIN_EMAIL, NEW_ADMIN_PASSWORD).status_code == 303
        assert client.get("/portal/users").status_code == 200
        token = csrf_of(client.get("/portal/users").text)
        assert client.post("/portal/logout", data={"csrf": token}).status_code == 303
        assert client.get("/portal/users").headers["location"] == "/portal/login"


def create_user(admin: httpx.Client, user: str, plan: str = "free", **extra: str):
    token = csrf_of(admin.get("/portal/users").text)
    return admin.post("/portal/users", data={"csrf": token, "user": user, "plan": plan,
                                             **extra})


def create_key(client: httpx.Client, **fields: str) -> str:
    """The token, from the one page that shows it."""
    token = csrf_of(client.get("/portal/keys").text)
    response = client.post("/portal/keys", data={"csrf": token, **fields})
    assert response.status_code == 201, response.text
    match = re.search(r'<p class="token" id="token">([^<]+)</p>', response.text)
    assert match, response.text
    return match.group(1)


def test_admin_manages_users(portal: Proxy, admin: httpx.Client, db, test_id: str):
    user = f"cust-{test_id[:8]}"
    assert create_user(admin, user, "starter", email=f"{user}@example.com").status_code == 200
    assert db.billing.users.find_one({"_id": user})["plan"] == "starter"
    assert create_user(admin, user).status_code == 409
    page = admin.get("/portal/users").text
    assert user in page and f"{user}@example.com" in page
    token = csrf_of(page)
    assert admin.post("/portal/users/plan", data={"csrf": token, "user": user,
                                                  "plan": "pro"}).status_code == 303
    assert db.billing.users.find_one({"_id": user})["plan"] == "pro"
    assert admin.post("/portal/users/plan", data={"csrf": token, "user": user,
                                                  "plan": "gold"}).status_code == 400
    assert admin.post("/portal/users/status", data={"csrf": token, "user": user,
                                                    "action": "block"}).status_code == 303
    assert db.billing.users.find_one({"_id": user})["status"] == "blocked"
    assert admin.post("/portal/users/status", data={"csrf": token, "user": user,
                                                    "action": "unblock"}).status_code == 303
    assert "status" not in db.billing.users.find_one({"_id": user})
    assert "Starter" in admin.get("/portal/plans").text


def test_key_is_shown_once_and_works(portal: Proxy, admin: httpx.Client, db, test_id: str):
    user = f"keys-{test_id[:8]}"
    create_user(admin, user, "free")
    token = create_key(admin, user=user, name="laptop", expires_days="30")
    stored = db.cgc.api_keys.find_one({"user_id": user})
    assert stored["secret"] == hashlib.sha256(token.encode()).hexdigest()
    assert stored["access_level"] == "COMPLETION" and stored["name"] == "laptop"
    assert stored["date_expiry"] - stored["date_created"] == timedelta(days=30)
    reply = openai_client(portal, token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    for path in ("/portal/keys", f"/portal/keys?user={user}", "/portal/users",
                 "/portal/events", f"/portal/events?user={user}&format=csv"):
        page = admin.get(path)
        assert page.status_code == 200 and token not in page.text, path
    assert str(stored["_id"]) in admin.get(f"/portal/keys?user={user}").text
    assert token not in portal.log
    csrf = csrf_of(admin.get("/portal/keys").text)
    assert admin.post("/portal/keys/revoke", data={"csrf": csrf, "key_id": str(
        stored["_id"])}).status_code == 303
    assert db.cgc.api_keys.find_one({"_id": stored["_id"]})["date_expiry"] <= \
        datetime.now(UTC)
    refused = create_key_response(admin, user="no-such-user")
    assert refused.status_code == 400


def create_key_response(client: httpx.Client, **fields: str) -> httpx.Response:
    token = csrf_of(client.get("/portal/keys").text)
    return client.post("/portal/keys", data={"csrf": token, **fields})


def test_events_filter_and_csv(portal: Proxy, admin: httpx.Client, make_key, db):
    key = make_key()
    openai_client(portal, key.token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    wait_for_events(db, key.user_id, 1)
    page = admin.get(f"/portal/events?user={key.user_id}&model=gpt-4o-mini")
    assert page.text.count(f"<td>{key.user_id}</td>") == 1
    assert admin.get(f"/portal/events?user={key.user_id}&model=other").text.count(
        f"<td>{key.user_id}</td>") == 0
    exported = admin.get(f"/portal/events?user={key.user_id}&format=csv")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(exported.text)))
    assert rows[0][:3] == ["date_created", "user_id", "model"] and len(rows) == 2
    assert rows[1][1] == key.user_id


def user_session(portal: Proxy, admin: httpx.Client, user: str) -> httpx.Client:
    """A portal login for ``user`` (created by the admin), past its first password change."""
    email, first, second = f"{user}@example.com", "first password 1", "second password 2"
    assert create_user(admin, user, "free", email=email, password=first).status_code == 200
    client = browser(portal)
    assert log_in(client, email, first).headers["location"] == "/portal/password"
    token = csrf_of(client.get("/portal/password").text)
    assert client.post("/portal/password", data={"csrf": token, "current": first,
                                                 "new": second, "confirm": second}
                       ).headers["location"] == "/portal/me"
    return client


def test_user_sees_only_their_own_keys(portal: Proxy, admin: httpx.Client, db, test_id: str):
    alice, bob = f"alice-{test_id[:6]}", f"bob-{test_id[:6]}"
    as_alice, as_bob = user_session(portal, admin, alice), user_session(portal, admin, bob)
    with contextlib.closing(as_alice), contextlib.closing(as_bob):
        create_key(as_alice, name="alice key")
        bob_token = create_key(as_bob, name="bob key")
        bob_key = db.cgc.api_keys.find_one({"user_id": bob})
        for path in ("/portal/keys", f"/portal/keys?user={bob}"):
            page = as_alice.get(path).text
            assert "alice key" in page and "bob key" not in page and str(bob_key["_id"]) \
                not in page
        for path in ("/portal/users", "/portal/events", "/portal/plans",
                     f"/portal/events?user={bob}"):
            assert as_alice.get(path).status_code == 403, path
        token = csrf_of(as_alice.get("/portal/keys").text)
        guessed = as_alice.post("/portal/keys/revoke", data={"csrf": token,
                                                            "key_id": str(bob_key["_id"])})
        assert guessed.status_code == 404
        assert db.cgc.api_keys.find_one({"_id": bob_key["_id"]})["date_expiry"] is None
        made = as_alice.post("/portal/keys", data={"csrf": token, "user": bob})
        assert made.status_code == 201  # the user field is ignored: a key for alice
        assert db.cgc.api_keys.count_documents({"user_id": bob}) == 1
        assert bob_token not in as_bob.get("/portal/keys").text


def test_usage_page_shows_billed_tokens(portal: Proxy, admin: httpx.Client, make_key, db):
    key = make_key()
    client = openai_client(portal, key.token)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hello"}])
    events = wait_for_events(db, key.user_id, 2)
    billed = sum(e["tokens_billed"] for e in events)
    prompt = sum(e["usage"]["prompt_tokens"] for e in events)
    page = admin.get(f"/portal/usage?user={key.user_id}").text
    assert f'<strong id="total-tokens">{billed:,}</strong>' in page
    assert '<svg id="chart-days"' in page and '<svg id="chart-models"' in page
    assert f"gpt-4o-mini: {billed:,}" in page  # the model bar's value
    day = events[0]["date_created"].strftime("%Y-%m-%d")
    assert f"{day} prompt: {prompt:,}" in page  # the day's bar
    exported = admin.get(f"/portal/usage?user={key.user_id}&format=csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["day"], r["model"], int(r["requests"]), int(r["tokens_billed"]))
            for r in rows] == [(day, "gpt-4o-mini", 2, billed)]


def test_user_cannot_see_another_users_usage(portal: Proxy, admin: httpx.Client, db,
                                             test_id: str):
    carol, dave = f"carol-{test_id[:6]}", f"dave-{test_id[:6]}"
    as_carol, as_dave = user_session(portal, admin, carol), user_session(portal, admin, dave)
    with contextlib.closing(as_carol), contextlib.closing(as_dave):
        dave_token = create_key(as_dave)
        openai_client(portal, dave_token).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "secret plans"}])
        events = wait_for_events(db, dave, 1)
        billed = f'<strong id="total-tokens">{events[0]["tokens_billed"]:,}</strong>'
        assert billed in as_dave.get("/portal/usage").text
        for path in (f"/portal/usage?user={dave}", f"/portal/usage?user={dave}&format=csv"):
            page = as_carol.get(path).text
            assert billed not in page and "gpt-4o-mini" not in page, path
        assert '<strong id="total-tokens">0</strong>' in as_carol.get(
            f"/portal/usage?user={dave}").text


def test_usage_reads_daily_rollups_when_present(portal: Proxy, admin: httpx.Client, db,
                                                test_id: str):
    user = f"rolled-{test_id[:8]}"
    db.billing.usage_daily.insert_one({
        "_id": f"{user}:2020-02-29:<b>model</b>", "user_id": user, "day": "2020-02-29",
        "model": "<b>model</b>", "requests": 3, "tokens_billed": 1234,
        "tokens": {"prompt_tokens": 1000, "completion_tokens": 234},
        "cost": Decimal128("0.5")})
    page = admin.get(f"/portal/usage?user={user}&month=2020-02").text
    assert "from daily rollups" in page and '<strong id="total-tokens">1,234</strong>' in page
    assert "<b>model</b>" not in page and "&lt;b&gt;model&lt;/b&gt;" in page  # escaped
    assert page.count("<rect") >= 3  # a stacked bar (two classes) and a model bar


def test_sign_up_see_quota_and_upgrade(portal: Proxy, admin: httpx.Client, db, test_id: str,
                                       stripe_double: StripeDouble):
    email, password = f"new-{test_id[:8]}@example.com", "my own password 1"
    with browser(portal) as client:
        token = csrf_of(client.get("/portal/signup").text)
        response = client.post("/portal/signup", data={
            "csrf": token, "email": email, "password": password, "confirm": password})
        assert (response.status_code, response.headers["location"]) == (303, "/portal/login")
        assert db.billing.users.find_one({"_id": email})["plan"] == "enterprise"  # default_plan
        assert "log in with your email" in client.get("/portal/login").text
        assert log_in(client, email, password).headers["location"] == "/portal/me"
        csrf = csrf_of(admin.get("/portal/users").text)
        admin.post("/portal/users/plan", data={"csrf": csrf, "user": email, "plan": "free"})
        key = create_key(client, name="mine")
        openai_client(portal, key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        used = wait_for_usage(db, email, 1)["tokens"]
        page = client.get("/portal/me").text
        assert f'<strong id="tokens-used">{used:,}</strong>' in page
        assert f'<strong id="tokens-left">{10_000 - used:,}</strong>' in page
        assert "1,000 tokens per minute" in page
        upgrade = client.post("/portal/upgrade", data={"csrf": csrf_of(page), "plan": "starter"})
        assert upgrade.status_code == 303
        assert upgrade.headers["location"].startswith("https://checkout.stripe.com/c/pay/cs_test_")
        call = stripe_double.calls("/v1/checkout/sessions")[-1].params
        assert call["client_reference_id"] == email and call["customer_email"] == email
        assert call["line_items"]["0"]["price"] == "price_starter_llmgateway"
        assert client.post("/portal/upgrade", data={"csrf": csrf_of(page), "plan": "free"}
                           ).status_code == 400
        assert client.get("/portal/users").status_code == 403


def test_sign_up_is_off_by_default(proxy: Proxy):
    assert httpx.get(f"{proxy.url}/portal/signup").status_code == 404
    assert "Sign up" not in httpx.get(f"{proxy.url}/portal/login").text


def test_docs_for_key_holders(portal: Proxy):
    response = httpx.get(f"{portal.url}/docs")
    assert response.status_code == 200
    page = html.unescape(response.text)
    port = portal.url.rpartition(":")[2]
    assert f"http://localhost:{port}/v1" in page  # the base URL (option public_url)
    config = read_config(portal.config_path)
    for path in config.routes:
        assert f"POST {path}" in page
    for snippet in ("from openai import OpenAI", "import anthropic", "from google import genai",
                    "curl ", "Authorization: Bearer", "X-API-Key", "x-goog-api-key",
                    "x-ratelimit-remaining-tokens", "Retry-After", "insufficient_quota",
                    "Starter", "gpt-4o-mini"):
        assert snippet in page, snippet
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)


def test_a_new_keys_token_is_not_kept_in_flow_files(portal: Proxy, admin: httpx.Client, db,
                                                    tmp_path, mongo_uri: str, test_id: str):
    """The page that shows a token once goes through mitmproxy's flows: `-w` must not keep
    it (nor the admin's password or session cookie)."""
    flows = tmp_path / "flows.mitm"
    second = start_proxy(tmp_path, mongo_uri, portal.config_path, "-w", str(flows),
                         env=STRIPE_ENV)
    try:
        with browser(second) as client:
            assert log_in(client, DEFAULT_ADMIN_EMAIL, NEW_ADMIN_PASSWORD).status_code == 303
            user = f"flows-{test_id[:8]}"
            create_user(client, user)
            token = create_key(client, user=user)
            cookie = client.cookies.get("portal_session") or next(iter(client.cookies.values()))
            openai_client(second, token).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    finally:
        stop_proxy(second)
    saved = flows.read_bytes()
    assert b"/v1/chat/completions" in saved  # API flows are still saved
    for secret in (token, NEW_ADMIN_PASSWORD, cookie):
        assert secret.encode() not in saved


def test_a_trailing_slash_never_redirects_to_the_host_header(portal: Proxy):
    """In reverse mode the Host header is rewritten to the upstream's: a redirect built from
    it would send browsers elsewhere."""
    response = httpx.get(f"{portal.url}/portal/login/", headers={"Host": "api.openai.com"},
                         follow_redirects=False)
    assert "api.openai.com" not in response.headers.get("location", "")
