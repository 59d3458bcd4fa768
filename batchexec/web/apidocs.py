"""The ``/docs`` page: the OpenAPI document, rendered on the server as plain HTML.

No script and nothing fetched from elsewhere: a list of the routes, each with
its parameters, body and answers, and every schema as JSON, linked to one
another. It works offline and under a Content-Security-Policy that allows
only its own stylesheet, by hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from html import escape
from typing import Any

from aiohttp import web

from batchexec.web.openapi import served

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
  padding: 0 1rem; color: #1b1b1b; background: #fff; }
h1, h2, h3 { line-height: 1.2; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; padding-bottom: .3rem; }
section.operation { margin: 1.5rem 0; padding: .2rem 1rem 1rem; border: 1px solid #ddd;
  border-radius: 6px; }
.method { display: inline-block; min-width: 3.5rem; font-weight: bold; }
.get { color: #05660d; }
.post { color: #7a3e00; }
code, pre { font: 13px/1.4 ui-monospace, monospace; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; border-radius: 4px; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: .2rem .8rem .2rem 0; vertical-align: top; }
nav ul { padding-left: 1.2rem; }
.open { font-size: .85rem; color: #555; }
a { color: #0645ad; }
""".strip()
#: The Content-Security-Policy of the page: nothing but its own stylesheet.
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_SCHEMA_REF = "#/components/schemas/"
#: Schemas up to this long (and naming no component) are shown on one line.
_INLINE_SCHEMA_CHARS = 60
#: A code span of a description: text between runs of one or two backticks.
_CODE_SPAN = re.compile(r"(``?)(.+?)\1")


async def docs(request: web.Request) -> web.Response:
    """The API's document as a page for people."""
    return web.Response(
        text=render(served(request)),
        content_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


def render(document: Mapping[str, Any]) -> str:
    """The page of an OpenAPI ``document``."""
    info = document["info"]
    operations = [
        (path, method, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    schemas: Mapping[str, Any] = document["components"]["schemas"]
    server = document.get("servers", [{"url": "/"}])[0]["url"]
    scheme = next(iter(document["components"]["securitySchemes"].values()))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(info['title'])} API</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(info['title'])} API <small>{escape(info['version'])}</small></h1>",
        f"<p>{escape(info.get('summary', ''))}</p>",
        f"<p>{_text(info.get('description', ''))}</p>",
        f"<p>Base URL: <code>{escape(server)}</code>. Key header: "
        f"<code>{escape(scheme['name'])}</code>. The machine-readable document: "
        '<a href="openapi.json"><code>openapi.json</code></a> (OpenAPI '
        f"{escape(document['openapi'])}).</p>",
        "<nav><h2>Routes</h2><ul>",
    ]
    for path, method, operation in operations:
        parts.append(
            f'<li><a href="#{_anchor(operation["operationId"])}">'
            f'<span class="method {method}">{method.upper()}</span> <code>{escape(path)}</code>'
            f"</a>: {escape(operation['summary'])}</li>"
        )
    parts.append("</ul></nav>")
    for path, method, operation in operations:
        parts.append(_operation(path, method, operation))
    parts.append("<h2>Schemas</h2>")
    for name, schema in schemas.items():
        parts.append(
            f'<section id="{_anchor("schema-" + name)}"><h3>{escape(name)}</h3>'
            f"{_schema(schema)}</section>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, operation: Mapping[str, Any]) -> str:
    parts = [
        f'<section class="operation" id="{_anchor(operation["operationId"])}">',
        f'<h3><span class="method {method}">{method.upper()}</span> '
        f"<code>{escape(path)}</code></h3>",
        f"<p><strong>{escape(operation['summary'])}</strong>. "
        f"{_text(operation.get('description', ''))}</p>",
    ]
    security = operation.get("security")
    if security == []:
        parts.append('<p class="open">No API key needed.</p>')
    elif security is not None:
        schemes = " or ".join(escape(name) for entry in security for name in entry)
        parts.append(f'<p class="open">The key, by {schemes}.</p>')
    parameters = operation.get("parameters", [])
    if parameters:
        parts.append("<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>schema</th></tr>")
        for parameter in parameters:
            required = " (required)" if parameter.get("required") else ""
            parts.append(
                f"<tr><td><code>{escape(parameter['name'])}</code>{required}</td>"
                f"<td>{escape(parameter['in'])}</td><td>{_schema(parameter['schema'])}</td></tr>"
            )
        parts.append("</table>")
    body = operation.get("requestBody")
    if body is not None:
        parts.append("<h4>Body</h4>")
        for media_type, media in body["content"].items():
            parts.append(_media(media_type, media["schema"]))
            if "example" in media:
                parts.append(f"<p>For example:</p>{_json(media['example'])}")
    parts.append("<h4>Answers</h4><table>")
    for status, answer in operation["responses"].items():
        shapes = [
            _media(media_type, media["schema"])
            for media_type, media in answer.get("content", {}).items()
        ]
        parts.append(
            f"<tr><td><strong>{escape(status)}</strong></td>"
            f"<td>{_text(answer['description'])}{''.join(shapes)}</td></tr>"
        )
    parts.append("</table></section>")
    return "\n".join(parts)


def _text(description: str) -> str:
    """A description as HTML: escaped, its ``code`` (CommonMark's code spans) as code."""
    return _CODE_SPAN.sub(r"<code>\2</code>", escape(description))


def _media(media_type: str, schema: Mapping[str, Any]) -> str:
    """A media type and its schema: a link when the schema names a component, else its JSON."""
    reference = schema.get("$ref")
    if isinstance(reference, str) and len(schema) == 1:
        return f"<p><code>{escape(media_type)}</code>: {_link(reference)}</p>"
    return f"<p><code>{escape(media_type)}</code></p>{_json(schema)}"


def _schema(schema: Mapping[str, Any]) -> str:
    """A schema: a link when it names a component, else its JSON, components linked."""
    reference = schema.get("$ref")
    if isinstance(reference, str) and len(schema) == 1:
        return _link(reference)
    compact = json.dumps(schema, ensure_ascii=False)
    if len(compact) <= _INLINE_SCHEMA_CHARS and "$ref" not in compact:
        return f"<code>{escape(compact)}</code>"
    return _json(schema)


def _json(value: object) -> str:
    """``value`` as indented JSON in a ``pre``, each ``$ref`` a link to its schema."""
    text = escape(json.dumps(value, indent=2, ensure_ascii=False))
    for name in _references(value):
        quoted = escape(json.dumps(_SCHEMA_REF + name))
        text = text.replace(quoted, f'<a href="#{_anchor("schema-" + name)}">{quoted}</a>')
    return f"<pre>{text}</pre>"


def _references(value: object) -> set[str]:
    """The component names ``value`` refers to, however deep."""
    if isinstance(value, Mapping):
        found = set()
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str) and item.startswith(_SCHEMA_REF):
                found.add(item[len(_SCHEMA_REF) :])
            else:
                found |= _references(item)
        return found
    if isinstance(value, list):
        return set().union(*(_references(item) for item in value)) if value else set()
    return set()


def _link(reference: str) -> str:
    name = reference.removeprefix(_SCHEMA_REF)
    return f'<a href="#{_anchor("schema-" + name)}">{escape(name)}</a>'


def _anchor(name: str) -> str:
    return escape("".join(char if char.isalnum() or char in "-_" else "-" for char in name))
