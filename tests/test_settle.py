"""The one settle step: a flow's outcome is computed once, and every consumer gets that
same outcome exactly once, whichever hooks fire and whatever a consumer does."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.test import tflow

from conftest import ONE_BACKEND
from llm_billing import context
from llm_billing.core.config import parse_config
from llm_billing.core.outcome import Outcome
from llm_billing.core.request import RequestContext
from llm_billing.meter import Meter
from llm_billing.settle import Settle

CONFIG = ONE_BACKEND
USAGE = b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'


class Consumer:
    def __init__(self, fails: bool = False) -> None:
        self.seen: list[tuple[RequestContext, Outcome]] = []
        self.fails = fails

    def settled(self, rc: RequestContext, outcome: Outcome) -> None:
        self.seen.append((rc, outcome))
        if self.fails:
            raise RuntimeError("a consumer's bug")


def streamed_flow() -> tuple[http.HTTPFlow, RequestContext]:
    config = parse_config(CONFIG, {})
    route = config.route_for("/v1/chat/completions")
    assert route is not None
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream"
    rc = RequestContext(caller=context.Caller(key_id=1, user_id="u"), route=route,
                        path=route.path, model="m", backend=config.backends[0])
    context.attach(flow, rc)
    Meter().responseheaders(flow)
    assert rc.meter is not None
    rc.meter(b"data: " + USAGE + b"\n\ndata: [DONE]\n\n")
    return flow, rc


def test_each_consumer_gets_the_one_outcome_once():
    first, failing, last = Consumer(), Consumer(fails=True), Consumer()
    settle = Settle(first, failing, last)
    flow, rc = streamed_flow()
    settle.error(flow)  # the client hung up after [DONE] ...
    settle.response(flow)  # ... and the upstream's end of body came too
    settle.error(flow)
    assert len(first.seen) == len(failing.seen) == len(last.seen) == 1
    outcome = first.seen[0][1]
    assert failing.seen[0][1] is outcome and last.seen[0][1] is outcome and rc.outcome is outcome
    assert outcome.usage is not None and outcome.usage.total_tokens == 7
    assert not outcome.estimated and outcome.complete


def test_a_flow_that_never_reached_a_backend_is_not_settled():
    consumer = Consumer()
    flow = tflow.tflow(resp=True)
    Settle(consumer).response(flow)
    assert consumer.seen == []
