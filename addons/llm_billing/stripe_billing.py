"""Stripe calls: Checkout and Customer Portal sessions (seed 000's Stripe integration).

Everything here goes through the real ``stripe`` library; ``api_base`` points it at
another server (a test double, or stripe-mock) without changing any code path.
"""

from __future__ import annotations

from typing import Any

import stripe

from .core.plans import Plan
from .core.stripe_rules import StripeConfigError, StripeSettings


def client_for(settings: StripeSettings) -> stripe.StripeClient:
    assert settings.secret_key
    addresses: dict[str, str] = {"api": settings.api_base} if settings.api_base else {}
    return stripe.StripeClient(settings.secret_key, base_addresses=addresses,  # type: ignore[arg-type]
                               max_network_retries=2)


def checkout_session(client: stripe.StripeClient, settings: StripeSettings, user_id: str,
                     plan: Plan, customer_id: str | None = None,
                     email: str | None = None) -> stripe.checkout.Session:
    """A subscription Checkout Session for ``plan``, linked to the user both ways."""
    if not plan.stripe_price:
        raise StripeConfigError(f"plan {plan.id!r} has no stripe_price: nothing to pay")
    metadata = {"user_id": str(user_id), "plan": plan.id}
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [{"price": plan.stripe_price, "quantity": 1}],
        "client_reference_id": str(user_id),
        "metadata": metadata,
        "subscription_data": {"metadata": metadata},
        "success_url": settings.success_url,
        "cancel_url": settings.cancel_url,
    }
    if customer_id:
        params["customer"] = customer_id
    elif email:
        params["customer_email"] = email
    return client.v1.checkout.sessions.create(params=params)  # type: ignore[arg-type]


def portal_session(client: stripe.StripeClient, settings: StripeSettings,
                   customer_id: str) -> stripe.billing_portal.Session:
    """A Customer Portal link for managing payment methods and the subscription."""
    return client.v1.billing_portal.sessions.create(params={
        "customer": customer_id, "return_url": settings.portal_return_url})
