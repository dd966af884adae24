"""The API describing itself: /api/openapi.json, and /api/docs, a page people can read (no CDN, no
script: it is plain HTML made from the same document)."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, render_template
from markupsafe import Markup, escape

from notifier.api import openapi
from notifier.api.operations import OPERATIONS, PATH_PARAMETERS

bp = Blueprint("docs", __name__, url_prefix="/api", template_folder="templates")

HTTP_METHODS = ("get", "post", "put", "patch", "delete")
_CODE_SPAN = re.compile(r"`([^`]+)`")


@bp.app_template_filter("code_spans")
def code_spans(text: str) -> Markup:
    """Escaped text with its `backticked` words set as code, as the descriptions write them."""
    return Markup(_CODE_SPAN.sub(r"<code>\1</code>", str(escape(text))))


def document() -> dict:
    """The app's OpenAPI document, built once from its url_map."""
    cache = current_app.extensions.setdefault("openapi", {})
    if "document" not in cache:
        cache["document"] = openapi.build(current_app, OPERATIONS, PATH_PARAMETERS)
    return cache["document"]


@bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI 3 document of every route under /api."""
    return jsonify(document())


@bp.get("/docs")
def page():
    """The same document as a web page."""
    spec = document()
    components = spec.get("components", {})
    schemas = [(name, _rows({"$ref": f"#/components/schemas/{name}"}, components, nested=False))
               for name in components.get("schemas", {})]
    return render_template("api_docs.html", spec=spec, operations=list(_operations(spec)), schemas=schemas)


def _operations(spec: dict):
    components = spec.get("components", {})
    for path, item in spec["paths"].items():
        shared = item.get("parameters", [])
        for method in HTTP_METHODS:
            if method not in item:
                continue
            op = item[method]
            parameters = [_resolve(p, components) for p in shared + op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            yield {
                "method": method.upper(),
                "path": path,
                "id": op.get("operationId", f"{method}-{path}"),
                "summary": op.get("summary", ""),
                "description": op.get("description", ""),
                "tag": (op.get("tags") or [""])[0],
                "auth": bool(op.get("security")),
                "parameters": [
                    {"name": p["name"], "in": p["in"], "required": p.get("required", False),
                     "type": _type(p.get("schema", {}), components), "notes": _notes(p.get("schema", {})),
                     "description": p.get("description", "")}
                    for p in parameters
                ],
                "body": _rows(body, components) if body else None,
                "body_name": _name(body),
                "responses": [
                    {
                        "status": status,
                        "description": response.get("description", ""),
                        "content_type": next(iter(response.get("content", {})), ""),
                        "schema_name": _name(next(iter(response.get("content", {}).values()), {}).get("schema")),
                        "headers": sorted(response.get("headers", {})),
                    }
                    for status, response in op["responses"].items()
                ],
            }


def _resolve(node: dict, components: dict) -> dict:
    while "$ref" in node:
        _, _, kind, name = node["$ref"].split("/")
        node = components[kind][name]
    return node


def _name(schema: dict | None) -> str:
    if schema and "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return ""


def _type(schema: dict, components: dict) -> str:
    if "$ref" in schema:
        return _name(schema)
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), components)}"
    if schema.get("format"):
        kind = f"{kind} ({schema['format']})"
    if schema.get("nullable"):
        kind += " or null"
    return kind


def _notes(schema: dict) -> str:
    notes = []
    if "enum" in schema:
        notes.append("one of " + ", ".join(str(v) for v in schema["enum"]))
    for key, label in (("minLength", "min length"), ("maxLength", "max length"), ("minimum", "min"),
                       ("maximum", "max"), ("pattern", "pattern"), ("default", "default")):
        if key in schema and schema[key] is not None:
            notes.append(f"{label} {schema[key]}")
    if schema.get("description"):
        notes.append(schema["description"])
    return "; ".join(notes)


def _rows(schema: dict, components: dict, depth: int = 0, seen: frozenset = frozenset(),
          nested: bool = True) -> list[dict]:
    """The fields of an object schema, nested objects indented under their field."""
    name = _name(schema)
    resolved = _resolve(schema, components)
    rows = []
    required = set(resolved.get("required", []))
    for field, prop in resolved.get("properties", {}).items():
        rows.append({"name": field, "depth": depth, "type": _type(prop, components), "required": field in required,
                     "notes": _notes(_resolve(prop, components) if "$ref" not in prop else prop)})
        target = prop.get("items", prop) if prop.get("type") == "array" else prop
        child = _name(target)
        if nested and child and child not in seen and child != name and depth < 3:
            rows.extend(_rows(target, components, depth + 1, seen | {name}))
    return rows
