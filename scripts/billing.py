#!/usr/bin/env python3
"""Manage API keys, users and plans, and report usage.

    uv run scripts/billing.py keys create --user alice [--expires-days 90]
    uv run scripts/billing.py keys list [--user alice]
    uv run scripts/billing.py keys revoke KEY_ID
    uv run scripts/billing.py users create alice [--plan starter] [--email a@example.com]
    uv run scripts/billing.py users set-plan alice pro
    uv run scripts/billing.py users list
    uv run scripts/billing.py report [--month 2026-11] [--user alice] [--csv]
    uv run scripts/billing.py subscribe alice starter      # a Stripe Checkout link
    uv run scripts/billing.py portal alice                 # a Stripe Customer Portal link
    uv run scripts/billing.py stripe-reconcile [--month 2026-11] [--csv]

Uses MONGODB_URI, or the embedded database. A key's token is printed once, at creation;
only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from bson import Decimal128, ObjectId
from bson.errors import InvalidId
from pymongo import MongoClient

from _cli import ROOT, database_uri
from llm_billing.core import reconcile
from llm_billing.core.config import Config
from llm_billing.core.dates import month_of
from llm_billing.keyauth import token_hash
from llm_billing.settings import read_config
from llm_billing.stripe_billing import checkout_session, client_for, portal_session

USAGE_CLASSES = ("prompt_tokens", "completion_tokens", "cache_read_tokens",
                 "cache_write_tokens", "reasoning_tokens")


def load_config() -> Config:
    return read_config(Path(os.environ.get("LLM_BILLING_CONFIG",
                                           ROOT / "config" / "config.toml")))


def keys_create(db: MongoClient, args: argparse.Namespace) -> None:
    token = "sk-" + secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    expiry = now + timedelta(days=args.expires_days) if args.expires_days else None
    result = db.cgc.api_keys.insert_one({
        "secret": token_hash(token), "access_level": args.access_level,
        "user_id": args.user, "date_expiry": expiry, "date_created": now,
        "name": args.name})
    print(f"key id:  {result.inserted_id}\nuser:    {args.user}\n"
          f"expires: {expiry.isoformat() if expiry else 'never'}\n"
          f"token:   {token}\n(shown once; only its SHA-256 is stored)")


def keys_list(db: MongoClient, args: argparse.Namespace) -> None:
    query = {"user_id": args.user} if args.user else {}
    now = datetime.now(UTC)
    rows = []
    for doc in db.cgc.api_keys.find(query, {"secret": 0}).sort("_id", 1):
        expiry = doc.get("date_expiry")
        state = "active" if expiry is None or expiry > now else "expired/revoked"
        rows.append([str(doc["_id"]), str(doc.get("user_id")), doc.get("access_level", ""),
                     expiry.isoformat() if expiry else "never", state,
                     str(doc.get("name") or "")])
    table(["key id", "user", "access", "expires", "state", "name"], rows)


def keys_revoke(db: MongoClient, args: argparse.Namespace) -> None:
    try:
        key_id: Any = ObjectId(args.key_id)
    except InvalidId:
        key_id = args.key_id
    result = db.cgc.api_keys.update_one({"_id": key_id},
                                        {"$set": {"date_expiry": datetime.now(UTC)}})
    if not result.matched_count:
        sys.exit(f"no key {args.key_id}")
    print(f"revoked {args.key_id} (refused at once where the database has change streams: "
          "the embedded one, replica sets; else within the proxies' key cache TTL)")


def users_create(db: MongoClient, args: argparse.Namespace) -> None:
    plan = check_plan(args.plan)
    fields = {"plan": plan, "date_created": datetime.now(UTC)}
    if args.email:
        fields["email"] = args.email
    result = db.billing.users.update_one({"_id": args.user}, {"$setOnInsert": fields},
                                         upsert=True)
    print(f"user {args.user}: {'created' if result.upserted_id else 'exists'}")


def users_set_plan(db: MongoClient, args: argparse.Namespace) -> None:
    plan = check_plan(args.plan)
    db.billing.users.update_one({"_id": args.user}, {"$set": {"plan": plan}}, upsert=True)
    print(f"user {args.user}: plan {plan} (applies within the proxies' user cache TTL)")


def users_list(db: MongoClient, args: argparse.Namespace) -> None:
    default = load_config().default_plan
    rows = [[str(u["_id"]), u.get("plan", default), u.get("status", "active"),
             str(u.get("email", "")), str(u.get("stripe_customer_id", ""))]
            for u in db.billing.users.find().sort("_id", 1)]
    table(["user", "plan", "status", "email", "stripe customer"], rows)


def check_plan(plan: str) -> str:
    plans = load_config().plans
    if plan not in plans:
        sys.exit(f"unknown plan {plan!r}; plans: {', '.join(plans)}")
    return plan


def report(db: MongoClient, args: argparse.Namespace) -> None:
    """Tokens by class, overage and cost per user for one month."""
    month = args.month or month_of(datetime.now(UTC))
    query: dict[str, Any] = {"month": month}
    if args.user:
        query["user_id"] = args.user
    config = load_config()
    plans = {u["_id"]: u.get("plan") for u in db.billing.users.find()}
    costs = event_costs(db, month, args.user)
    header = ["month", "user", "plan", "requests", "tokens", *USAGE_CLASSES,
              "quota", "overage_tokens", "overage_cost", "usage_cost"]
    rows = []
    for doc in db.billing.usage.find(query).sort("user_id", 1):
        plan = config.plan(plans.get(doc["user_id"]))
        usage = doc.get("usage", {})
        rows.append([month, str(doc["user_id"]), plan.id, doc.get("requests", 0),
                     doc.get("tokens", 0), *(usage.get(c, 0) for c in USAGE_CLASSES),
                     plan.monthly_tokens or "unlimited", doc.get("overage_tokens", 0),
                     decimal(doc.get("overage_cost")), costs.get(doc["user_id"], Decimal(0))])
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(rows)
    else:
        table(header, [[str(c) for c in row] for row in rows])


def event_costs(db: MongoClient, month: str, user: str | None) -> dict[Any, Decimal]:
    """Priced cost of the month's completion events, per user."""
    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    end = (start + timedelta(days=32)).replace(day=1)
    match: dict[str, Any] = {"date_created": {"$gte": start, "$lt": end}}
    if user:
        match["user_id"] = user
    pipeline = [{"$match": match}, {"$group": {"_id": "$user_id", "cost": {"$sum": "$cost"}}}]
    return {row["_id"]: decimal(row["cost"])
            for row in db.billing.events_completion.aggregate(pipeline)}


def stripe_client(config: Config):
    if not config.stripe.enabled:
        sys.exit("Stripe is off: set STRIPE_SECRET_KEY (and STRIPE_WEBHOOK_SECRET)")
    return client_for(config.stripe)


def subscribe(db: MongoClient, args: argparse.Namespace) -> None:
    """A Checkout Session for a user and plan; the webhook applies it once paid."""
    config = load_config()
    plan = config.plans[check_plan(args.plan)]
    if not plan.stripe_price:
        sys.exit(f"plan {plan.id} has no stripe_price: there is nothing to pay")
    user = db.billing.users.find_one({"_id": args.user}) or {}
    session = checkout_session(stripe_client(config), config.stripe, args.user, plan,
                               customer_id=user.get("stripe_customer_id"),
                               email=user.get("email"))
    print(f"checkout session {session.id} for {args.user} -> {plan.id}:\n{session.url}")


def portal(db: MongoClient, args: argparse.Namespace) -> None:
    config = load_config()
    user = db.billing.users.find_one({"_id": args.user}) or {}
    if not user.get("stripe_customer_id"):
        sys.exit(f"user {args.user} has no Stripe customer yet (subscribe first)")
    session = portal_session(stripe_client(config), config.stripe, user["stripe_customer_id"])
    print(session.url)


def stripe_reconcile(db: MongoClient, args: argparse.Namespace) -> None:
    """Per user and month: overage tokens recorded vs put in the outbox vs sent to Stripe."""
    month = args.month or month_of(datetime.now(UTC))
    rows = [row.cells() for row in reconcile.reconcile(
        db.billing.usage.find(reconcile.usage_query(month)),
        db.billing.stripe_outbox.find(reconcile.outbox_query(month)))]
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(reconcile.COLUMNS)
        writer.writerows(rows)
    else:
        table(list(reconcile.COLUMNS), rows)


def decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    return Decimal(str(value or 0))


def table(header: list[str], rows: list[list[Any]]) -> None:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="area", required=True)
    keys = sub.add_parser("keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key (prints its token once)")
    create.add_argument("--user", required=True)
    create.add_argument("--expires-days", type=int)
    create.add_argument("--access-level", default="COMPLETION")
    create.add_argument("--name")
    create.set_defaults(run=keys_create)
    listing = keys.add_parser("list")
    listing.add_argument("--user")
    listing.set_defaults(run=keys_list)
    revoke = keys.add_parser("revoke", help="expire a key now")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=keys_revoke)
    users = sub.add_parser("users").add_subparsers(dest="action", required=True)
    ucreate = users.add_parser("create")
    ucreate.add_argument("user")
    ucreate.add_argument("--plan", default="free")
    ucreate.add_argument("--email")
    ucreate.set_defaults(run=users_create)
    setplan = users.add_parser("set-plan")
    setplan.add_argument("user")
    setplan.add_argument("plan")
    setplan.set_defaults(run=users_set_plan)
    users.add_parser("list").set_defaults(run=users_list)
    rep = sub.add_parser("report", help="usage per user for a month")
    rep.add_argument("--month", help="YYYY-MM (default: this month, UTC)")
    rep.add_argument("--user")
    rep.add_argument("--csv", action="store_true")
    rep.set_defaults(run=report)
    sub_ = sub.add_parser("subscribe", help="a Stripe Checkout link for a plan")
    sub_.add_argument("user")
    sub_.add_argument("plan")
    sub_.set_defaults(run=subscribe)
    port = sub.add_parser("portal", help="a Stripe Customer Portal link")
    port.add_argument("user")
    port.set_defaults(run=portal)
    rec = sub.add_parser("stripe-reconcile", help="overage recorded vs reported to Stripe")
    rec.add_argument("--month", help="YYYY-MM (default: this month, UTC)")
    rec.add_argument("--csv", action="store_true")
    rec.set_defaults(run=stripe_reconcile)
    args = parser.parse_args()
    with database_uri() as uri, MongoClient(uri, tz_aware=True) as client:
        args.run(client, args)


if __name__ == "__main__":
    main()
