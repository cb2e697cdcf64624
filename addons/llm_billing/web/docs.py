"""``/docs``: the API documentation for key holders, rendered from the running config —
base URL, key headers, every configured route with an example per SDK (openai, anthropic,
google-genai, curl), errors, rate-limit headers and the plans. Offline: no CDN, no script.
"""

from __future__ import annotations

from mitmproxy import ctx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..core.usage import Protocol
from ..settings import Settings
from .portal.render import templates

# Per protocol: the SDK examples shown (Python unless curl), with {base} and {model}.
OPENAI_SDK = ('from openai import OpenAI\n\n'
              'client = OpenAI(base_url="{base}/v1", api_key="YOUR_KEY")\n')
EXAMPLES: dict[Protocol, list[tuple[str, str]]] = {
    Protocol.OPENAI_CHAT: [
        ("openai", OPENAI_SDK + 'reply = client.chat.completions.create(\n    model="{model}",\n'
                               '    messages=[{{"role": "user", "content": "Hello!"}}],\n'
                               '    stream=True,\n)\nfor chunk in reply:\n'
                               '    print(chunk.choices[0].delta.content or "", end="")'),
        ("curl", "curl {base}{path} \\\n  -H 'Authorization: Bearer YOUR_KEY' \\\n"
                 "  -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
                 "\"content\": \"Hello!\"}}]}}'")],
    Protocol.OPENAI_RESPONSES: [
        ("openai", OPENAI_SDK + 'reply = client.responses.create(model="{model}", '
                               'input="Hello!")\nprint(reply.output_text)'),
        ("curl", "curl {base}{path} -H 'Authorization: Bearer YOUR_KEY' \\\n"
                 "  -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"model\": \"{model}\", \"input\": \"Hello!\"}}'")],
    Protocol.OPENAI_COMPLETIONS: [
        ("openai", OPENAI_SDK + 'reply = client.completions.create(model="{model}", '
                               'prompt="Once upon a time", max_tokens=50)'),
        ("curl", "curl {base}{path} -H 'Authorization: Bearer YOUR_KEY' \\\n"
                 "  -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"model\": \"{model}\", \"prompt\": \"Once upon a time\"}}'")],
    Protocol.OPENAI_EMBEDDINGS: [
        ("openai", OPENAI_SDK + 'vectors = client.embeddings.create(model="{model}", '
                               'input=["Hello!"])'),
        ("curl", "curl {base}{path} -H 'Authorization: Bearer YOUR_KEY' \\\n"
                 "  -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"model\": \"{model}\", \"input\": \"Hello!\"}}'")],
    Protocol.ANTHROPIC_MESSAGES: [
        ("anthropic", 'import anthropic\n\nclient = anthropic.Anthropic(base_url="{base}", '
                      'api_key="YOUR_KEY")\nmessage = client.messages.create(\n'
                      '    model="{model}", max_tokens=1024,\n'
                      '    messages=[{{"role": "user", "content": "Hello!"}}],\n)\n'
                      'print(message.content[0].text)'),
        ("curl", "curl {base}{path} -H 'X-API-Key: YOUR_KEY' \\\n"
                 "  -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"model\": \"{model}\", \"max_tokens\": 1024, \"messages\": "
                 "[{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")],
    Protocol.GEMINI: [
        ("google-genai", 'from google import genai\nfrom google.genai import types\n\n'
                         'client = genai.Client(api_key="YOUR_KEY", http_options=types.'
                         'HttpOptions(base_url="{base}"))\nreply = client.models.'
                         'generate_content(model="{model}", contents="Hello!")\n'
                         'print(reply.text)'),
        ("curl", "curl '{base}{path}' -H 'x-goog-api-key: YOUR_KEY' \\\n"
                 "  -H 'Content-Type: application/json' \\\n"
                 "  -d '{{\"contents\": [{{\"parts\": [{{\"text\": \"Hello!\"}}]}}]}}'")],
}
SAMPLE_MODEL = {Protocol.ANTHROPIC_MESSAGES: "claude-", Protocol.GEMINI: "gemini-",
                Protocol.OPENAI_EMBEDDINGS: "embedding"}


class Docs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def routes(self) -> list[Route]:
        return [Route("/docs", self.page), Route("/docs/", self.page)]

    async def page(self, request: Request) -> Response:
        config = self.settings.config
        assert config is not None
        base = public_url()
        models = [m for b in config.backends for m in b.models]
        routes = []
        for path, route in config.routes.items():
            model = sample_model(models, route.protocol)
            concrete = path.replace("{model}", model)
            routes.append({"path": path, "protocol": route.protocol.value, "examples": [
                (sdk, text.format(base=base, path=concrete, model=model))
                for sdk, text in EXAMPLES.get(route.protocol, [])]})
        return templates.TemplateResponse(request, "docs.html", {
            "base": base, "routes": routes, "models": models, "plans": config.plans,
            "default_plan": config.default_plan, "account": None})


def public_url() -> str:
    """Where clients reach the proxy. Not the Host header: in reverse mode mitmproxy has
    replaced it with the upstream's before any addon runs."""
    if url := ctx.options.public_url.strip().rstrip("/"):
        return url
    return f"http://localhost:{ctx.options.listen_port or 8080}"


def sample_model(models: list[str], protocol: Protocol) -> str:
    """A configured model name that fits the protocol, for the examples."""
    hint = SAMPLE_MODEL.get(protocol)
    concrete = [m.rstrip("*") + ("..." if m.endswith("*") else "") for m in models]
    fitting = [m for m in concrete if hint and hint in m] or concrete
    return next(iter(fitting), "MODEL") if hint or fitting else "MODEL"

