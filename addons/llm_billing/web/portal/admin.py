"""Pages for keys (admins: anyone's; users: their own), users, plans and events (admins).

A key's token is made here, shown in the answer to the POST that created it, and never
again: only its SHA-256 is stored, in ``cgc.api_keys`` as seed 002 describes
(``secret``, ``access_level: "COMPLETION"``, ``date_expiry``, ``user_id``, plus
``date_created`` and ``name``). Revoking a key expires it now: this instance's KeyAuth
forgets it at once, the others when their change stream tells them (else within their key
cache TTL). A user's requests never name another user: the pages take the
account's own user id, whatever the query says.
"""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.asynchronous.cursor import AsyncCursor
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ...core.dates import month_of
from ...keyauth import KeyAuth, token_hash
from ...settings import Settings
from ...storage.database import Database
from . import accounts
from .render import render
from .session import form, requires

LIST_LIMIT = 500
EVENTS_LIMIT = 200
CSV_LIMIT = 50_000
BATCH = 500  # documents per database batch (and CSV chunk): a few ms of the event loop each
MAX_EXPIRY_DAYS = 3650
EVENT_COLUMNS = ("date_created", "user_id", "model", "backend", "path", "status", "stream",
                 "prompt_n", "completion_n", "tokens_billed", "cost", "usage_estimated")


def own_user(request: Request, requested: str | None) -> str | None:
    """The user a page is about: an admin's choice (None: everyone), a user's own id."""
    account = request.state.account
    if account.get("role") == "admin":
        return requested or None
    return account.get("user_id") or ""


def key_id_of(text: str) -> Any:
    try:
        return ObjectId(text)
    except (InvalidId, TypeError):
        return text


def day(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text or "", "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None


def new_token() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def csv_response(name: str, header: list[str], rows: list[list[Any]]) -> Response:
    return Response(csv_text([header]) + csv_text(rows, safe=True),
                    media_type="text/csv; charset=utf-8", headers=csv_headers(name))


def streamed_csv(name: str, header: list[str],
                 batches: AsyncIterator[list[list[Any]]]) -> StreamingResponse:
    """A CSV of unbounded length, written a batch at a time: the event loop runs the
    proxy's streams between two batches instead of waiting for the whole file."""
    async def chunks() -> AsyncIterator[str]:
        yield csv_text([header])
        async for rows in batches:
            yield csv_text(rows, safe=True)
            await asyncio.sleep(0)  # batches already fetched would not let the loop run
    return StreamingResponse(chunks(), media_type="text/csv; charset=utf-8",
                             headers=csv_headers(name))


async def cursor_batches(cursor: AsyncCursor, size: int) -> AsyncIterator[list[dict[str, Any]]]:
    """The cursor's documents, ``size`` at a time; the server sends them ``size`` at a time
    too (its default is up to 16 MB, decoded in one go on the event loop)."""
    batch: list[dict[str, Any]] = []
    try:
        async for doc in cursor.batch_size(size):
            batch.append(doc)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        await cursor.close()


def csv_text(rows: Iterable[Iterable[Any]], safe: bool = False) -> str:
    out = io.StringIO()
    csv.writer(out).writerows([csv_safe(c) for c in row] if safe else row for row in rows)
    return out.getvalue()


def csv_headers(name: str) -> dict[str, str]:
    return {"content-disposition": f'attachment; filename="{name}"'}


def csv_safe(value: Any) -> str:
    """A cell a spreadsheet will not run as a formula (user ids and models are input)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not \
        text.lstrip("-").replace(".", "", 1).isdigit() else text


class AdminPages:
    def __init__(self, database: Database, settings: Settings,
                 key_auth: KeyAuth | None = None) -> None:
        self.database = database
        self.settings = settings
        self.key_auth = key_auth  # this instance's key cache

    # --- keys ---------------------------------------------------------------------------

    @requires()
    async def keys(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._create_key(request)
        user = own_user(request, request.query_params.get("user"))
        return await self._keys_page(request, user)

    async def _keys_page(self, request: Request, user: str | None, status: int = 200,
                         **context: Any) -> Response:
        client = await self.database.client()
        query = {} if user is None else {"user_id": user}
        now = datetime.now(UTC)
        keys = []
        async for doc in client.cgc.api_keys.find(query, {"secret": 0}).sort(
                "_id", -1).limit(LIST_LIMIT):
            expiry = doc.get("date_expiry")
            if expiry is not None and expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=UTC)
            doc["state"] = "active" if expiry is None or expiry > now else "revoked"
            doc["id"] = str(doc["_id"])
            keys.append(doc)
        return render(request, "keys.html", status, keys=keys, user=user or "",
                      **context)

    async def _create_key(self, request: Request) -> Response:
        data = await form(request)
        user = own_user(request, str(data.get("user", "")).strip())
        client = await self.database.client()
        try:
            days = int(str(data.get("expires_days") or 0))
        except ValueError:
            days = -1
        if not user or await client.billing.users.find_one({"_id": user}) is None:
            return await self._keys_page(request, None, 400,
                                         error="No such user: create the user first.")
        if not 0 <= days <= MAX_EXPIRY_DAYS:
            return await self._keys_page(request, user, 400, error=f"Expiry must be 0 "
                                         f"(never) to {MAX_EXPIRY_DAYS} days.")
        token = new_token()
        now = datetime.now(UTC)
        expiry = now + timedelta(days=days) if days else None
        name = str(data.get("name", "")).strip()[:100]
        result = await client.cgc.api_keys.insert_one({
            "secret": token_hash(token), "access_level": "COMPLETION", "date_expiry": expiry,
            "user_id": user, "date_created": now, "name": name})
        if self.key_auth is not None:  # a new random token: cached nowhere, but be sure
            self.key_auth.forget(token_hash(token))
        return render(request, "key_created.html", 201, token=token, user=user, name=name,
                      key_id=str(result.inserted_id), expiry=expiry)

    @requires()
    async def revoke_key(self, request: Request) -> Response:
        data = await form(request)
        query: dict[str, Any] = {"_id": key_id_of(str(data.get("key_id", "")))}
        if (user := own_user(request, None)) is not None:
            query["user_id"] = user  # a user revokes only their own keys
        client = await self.database.client()
        result = await client.cgc.api_keys.update_one(
            {**query, "$or": [{"date_expiry": None},
                              {"date_expiry": {"$gt": datetime.now(UTC)}}]},
            {"$set": {"date_expiry": datetime.now(UTC), "revoked_at": datetime.now(UTC)}})
        if self.key_auth is not None:
            self.key_auth.forget_key(query["_id"])  # refused here from the next request
        if not result.matched_count and await client.cgc.api_keys.find_one(query) is None:
            return await self._keys_page(request, user, 404, error="No such key.")
        return RedirectResponse("/portal/keys", 303)

    # --- users --------------------------------------------------------------------------

    @requires("admin")
    async def users(self, request: Request) -> Response:
        return await self._users_page(request)

    async def _users_page(self, request: Request, status: int = 200,
                          **context: Any) -> Response:
        config = self.settings.config
        assert config is not None
        client = await self.database.client()
        month = month_of(datetime.now(UTC))
        users = await client.billing.users.find().sort("_id", 1).to_list(LIST_LIMIT)
        usage = {doc["user_id"]: doc async for doc in client.billing.usage.find(
            {"month": month, "user_id": {"$in": [u["_id"] for u in users]}})}
        for user in users:
            user["id"] = str(user["_id"])
            user["plan_id"] = config.plan(user.get("plan")).id
            user["tokens"] = usage.get(user["_id"], {}).get("tokens", 0)
        return render(request, "users.html", status, users=users, plans=config.plans,
                      default_plan=config.default_plan, month=month, **context)

    @requires("admin")
    async def create_user(self, request: Request) -> Response:
        data = await form(request)
        config = self.settings.config
        assert config is not None
        user = str(data.get("user", "")).strip()[:200]
        email = str(data.get("email", "")).strip()[:254]
        plan = str(data.get("plan", config.default_plan))
        password = str(data.get("password", ""))
        error = None
        if not user or any(c.isspace() or ord(c) < 32 for c in user):
            error = "A user id is required (no spaces)."
        elif plan not in config.plans:
            error = f"Unknown plan {plan!r}."
        elif password and (problem := accounts.password_problem(password, email)):
            error = problem
        elif password and not email:
            error = "A portal login needs an email."
        if error:
            return await self._users_page(request, 400, error=error)
        client = await self.database.client()
        fields = {"plan": plan, "date_created": datetime.now(UTC)}
        if email:
            fields["email"] = email
        result = await client.billing.users.update_one({"_id": user}, {"$setOnInsert": fields},
                                                       upsert=True)
        if not result.upserted_id:
            return await self._users_page(request, 409,
                                                error=f"User {user!r} exists.")
        notice = f"Created user {user} on {plan}."
        if password:
            if await accounts.create(client, email, password, "user", user_id=user,
                                     must_change=True):
                notice += f" They log in as {accounts.normal_email(email)} and must change " \
                          f"the password first."
            else:
                notice += " A portal account with that email exists already: none created."
        return await self._users_page(request, 200, notice=notice)

    @requires("admin")
    async def set_plan(self, request: Request) -> Response:
        data = await form(request)
        config = self.settings.config
        assert config is not None
        plan = str(data.get("plan", ""))
        if plan not in config.plans:
            return await self._users_page(request, 400, error="Unknown plan.")
        client = await self.database.client()
        result = await client.billing.users.update_one({"_id": str(data.get("user", ""))},
                                                       {"$set": {"plan": plan}})
        if not result.matched_count:
            return await self._users_page(request, 404, error="No such user.")
        return RedirectResponse("/portal/users", 303)

    @requires("admin")
    async def set_status(self, request: Request) -> Response:
        """Block (requests get 429) or unblock; unblocking leaves a failed payment alone."""
        data = await form(request)
        user = str(data.get("user", ""))
        client = await self.database.client()
        if data.get("action") == "block":
            result = await client.billing.users.update_one(
                {"_id": user}, {"$set": {"status": "blocked", "blocked_at": datetime.now(UTC)}})
        else:
            result = await client.billing.users.update_one(
                {"_id": user, "status": "blocked"}, {"$unset": {"status": "", "blocked_at": ""}})
        if not result.matched_count:
            return await self._users_page(request, 404,
                                                error="No such blocked user.")
        return RedirectResponse("/portal/users", 303)

    # --- plans and events ---------------------------------------------------------------

    @requires("admin")
    async def plans(self, request: Request) -> Response:
        config = self.settings.config
        assert config is not None
        return render(request, "plans.html", plans=config.plans,
                      default_plan=config.default_plan)

    @requires("admin")
    async def events(self, request: Request) -> Response:
        params = request.query_params
        query: dict[str, Any] = {}
        if user := params.get("user"):
            query["user_id"] = user
        if model := params.get("model"):
            query["model"] = model
        start, end = day(params.get("from")), day(params.get("to"))
        if start or end:
            query["date_created"] = {**({"$gte": start} if start else {}),
                                     **({"$lt": end + timedelta(days=1)} if end else {})}
        client = await self.database.client()
        cursor = client.billing.events_completion.find(query).sort("date_created", -1)
        if params.get("format") == "csv":
            return streamed_csv("events.csv", list(EVENT_COLUMNS), event_rows(
                cursor_batches(cursor.limit(CSV_LIMIT), BATCH)))
        events = await cursor.limit(EVENTS_LIMIT).to_list()
        return render(request, "events.html", events=events, user=user or "",
                      model=model or "", start=params.get("from", ""),
                      end=params.get("to", ""), limit=EVENTS_LIMIT)


async def event_rows(batches: AsyncIterator[list[dict[str, Any]]]
                     ) -> AsyncIterator[list[list[Any]]]:
    async for events in batches:
        yield [[e.get(c) for c in EVENT_COLUMNS] for e in events]
