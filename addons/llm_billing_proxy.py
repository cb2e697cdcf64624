"""llm-billing-proxy: bill LLM API users per token.

    mitmdump -s addons/llm_billing_proxy.py       # or mitmweb -s ..., to watch flows

Addons run in this order on each request; README.md ("How it works") walks through it.
"""

from llm_billing import proxy_errors
from llm_billing.api_info import ApiInfo
from llm_billing.backend_tokenizer import BackendTokenizer
from llm_billing.defaults import ProxyDefaults
from llm_billing.eventlog import EventLog
from llm_billing.finish_upstream import FinishUpstream
from llm_billing.keyauth import KeyAuth
from llm_billing.limits import Limits
from llm_billing.meter import Meter
from llm_billing.quota_alerts import QuotaAlerts
from llm_billing.reuse_port import ReusePort
from llm_billing.router import Router
from llm_billing.settings import Settings
from llm_billing.settle import Settle
from llm_billing.slow_clients import SlowClients
from llm_billing.storage.database import Database
from llm_billing.stripe_reporter import StripeReporter
from llm_billing.upstream_auth import CredentialRedactor
from llm_billing.users import UserPlans
from llm_billing.web import app as web_app
from llm_billing.web.docs import Docs
from llm_billing.web.health import Health
from llm_billing.web.metrics import Metrics
from llm_billing.web.portal import Portal
from llm_billing.web.serve import WebApp
from llm_billing.webhook import StripeWebhook

proxy_errors.install()

settings = Settings()
database = Database()
user_plans = UserPlans(database, settings)
limits = Limits(database, settings)
event_log = EventLog(database, settings, limits.ledger)  # journal ↔ usage writes
health = Health(database, event_log)
key_auth = KeyAuth(database, settings)
metrics = Metrics(settings, database, event_log, key_auth)
portal = Portal(database, settings, key_auth)  # the portal's key changes apply at once
tokenizer = BackendTokenizer()

addons = [
    ProxyDefaults(),
    ReusePort(),  # option reuse_port: workers share the listening port (scripts/serve.py)
    SlowClients(),  # every connection: closes the ones slow to send request headers
    settings,
    metrics.gate(),  # /metrics' bearer token, read before KeyAuth strips it
    key_auth,
    user_plans,
    ApiInfo(database, settings, limits),  # answers /v1/models, /v1/usage (authenticated)
    StripeWebhook(database, settings, user_plans),  # answers /webhook/stripe itself
    WebApp(web_app.build(database, settings, health,
                         extra=[*portal.routes(), *metrics.routes(),
                                *Docs(settings).routes()])),  # /portal, /docs…
    health,
    portal,  # options; at start: session secret, seed 000's admin
    Router(settings),
    CredentialRedactor(),
    Meter(),
    tokenizer,  # at shutdown, counts in flight finish before the limits and event log close
    limits,  # after Router (request hook)
    FinishUpstream(),  # after limits: a non-streamed answer is billed even if its client left
    event_log,
    metrics,  # after the limits and the event log: times the send upstream
    # The one step that ends a request; feeds them in order.
    Settle(limits, event_log, metrics, tokenizer=tokenizer),
    StripeReporter(database, settings),
    QuotaAlerts(database, settings),  # 80 % / 100 % of the monthly quota, to [alerts] url
    database,  # last, so it closes after the event log has flushed
]
