"""The OpenAPI 3.1 document the server serves at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]

_KEY_RULE = (
    "How a path segment (or a `keys=` item) names a group key: a JSON string literal "
    '(`%22123%22`, i.e. `"123"`) names that string; ASCII digits with an optional '
    "leading `-` name an int (64-bit); anything else names the string as written. "
    'The int 1 and the string "1" are different groups. Segments are percent-decoded '
    "as UTF-8; invalid UTF-8 is a 400."
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad request (malformed key, query, JSON or field)",
        404: "unknown group or route",
        413: "request too large (body bytes, keys, events or top)",
        503: "no snapshot loaded yet",
    }
    return {str(c): _json_body(_ref("Error"), text[c]) for c in codes}


def openapi_document() -> dict[str, Any]:
    """The API description (static; the snapshot's formula names the event fields).

    >>> d = openapi_document()
    >>> d["openapi"], sorted(d["paths"])[:3]
    ('3.1.0', ['/healthz', '/metrics', '/openapi.json'])

    """
    num_map = {"type": "object", "additionalProperties": {"type": "number"}}
    matrix = {"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}}
    key = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    schemas = {
        "Error": {
            "type": "object",
            "required": ["error", "status"],
            "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
        },
        "SnapshotInfo": {
            "type": "object",
            "description": "Which snapshot answered: version is the store's file sequence "
            "number (or the engine's publish counter under `run --serve`).",
            "properties": {
                "version": {"type": "integer"},
                "created_at": {"type": ["string", "null"], "format": "date-time"},
                "n_obs": {"type": "number"},
                "n_events": {"type": "integer"},
                "n_groups": {"type": "integer"},
            },
        },
        "Group": {
            "type": "object",
            "properties": {
                "group": key,
                "found": {"type": "boolean"},
                "ranef": {**num_map, "description": "BLUP by random-effect name"},
                "ranef_cov": {
                    **matrix,
                    "description": "conditional covariance (condVar); "
                    "the prior re_cov for a fallback",
                },
                "n": {"type": "number", "description": "the group's total weight Σw"},
                "shrinkage": {
                    **num_map,
                    "description": "1 − condVar_ii/re_cov_ii per effect "
                    "(τ²/(τ²+σ²/n) for a random intercept); 0 = fully shrunk",
                },
                "fallback": {"type": "string", "enum": ["population"]},
            },
        },
        "Prediction": {
            "type": "object",
            "properties": {
                "group": {**key, "nullable": True},
                "prediction": {"type": "number"},
                "se": {"type": "number"},
                "lower": {"type": "number"},
                "upper": {"type": "number"},
                "group_seen": {"type": "boolean"},
                "interval_kind": {
                    "type": "string",
                    "enum": ["conditional", "population"],
                    "description": "conditional: a seen group, Var = x'V_βx + z'C_gz + σ² "
                    "(C_g = condVar); population: an unseen group, the fixed part with "
                    "Var = x'V_βx + z're_cov z + σ². 95% normal interval ±1.96·se.",
                },
            },
        },
    }
    info = {"snapshot": _ref("SnapshotInfo")}
    ok = {"type": "object", "properties": {"status": {"type": "string"}}}
    paths = {
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": _json_body(ok, "alive")}}},
        "/readyz": {
            "get": {
                "summary": "readiness: 200 once a snapshot is loaded",
                "responses": {"200": _json_body({"type": "object"}, "ready"), **_errors(503)},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {"description": "text exposition format", "content": {"text/plain": {}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": _json_body({"type": "object"}, "doc")},
            }
        },
        "/v1/model": {
            "get": {
                "summary": "model-level estimates: fixef and SE, re_cov, sigma, theta, "
                "criterion, counts, singular, warnings, snapshot version",
                "responses": {
                    "200": _json_body({"type": "object", "properties": info}, "model"),
                    **_errors(503),
                },
            }
        },
        "/v1/groups/{key}": {
            "get": {
                "summary": "one group's effects",
                "parameters": [
                    {
                        "name": "key",
                        "in": "path",
                        "required": True,
                        "description": _KEY_RULE,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "fallback",
                        "in": "query",
                        "description": "population: an unknown "
                        "group gets zeros and the prior covariance instead of a 404",
                        "schema": {"type": "string", "enum": ["population"]},
                    },
                ],
                "responses": {
                    "200": _json_body(
                        {"allOf": [_ref("Group"), {"type": "object", "properties": info}]},
                        "the group",
                    ),
                    **_errors(400, 404, 503),
                },
            }
        },
        "/v1/groups": {
            "get": {
                "summary": "several groups by key (keys=, at most 1000; unknown ones have "
                "found=false) or a ranking (top=N, at most 1000, by=abs|shrinkage|n: abs = "
                "largest max_j |b_gj| first, shrinkage = most shrunk (smallest min_j factor) "
                "first, n = largest Σw first)",
                "parameters": [
                    {
                        "name": "keys",
                        "in": "query",
                        "description": "comma-separated keys; the parameter may be "
                        "repeated, keys=a&keys=b being keys=a,b (any other parameter "
                        "given twice is a 400); " + _KEY_RULE,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "top",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {
                        "name": "by",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["abs", "shrinkage", "n"],
                            "default": "abs",
                        },
                    },
                    {
                        "name": "fallback",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["population"]},
                    },
                ],
                "responses": {
                    "200": _json_body(
                        {
                            "type": "object",
                            "properties": {
                                "groups": {"type": "array", "items": _ref("Group")},
                                **info,
                            },
                        },
                        "groups from one snapshot",
                    ),
                    **_errors(400, 413, 503),
                },
            }
        },
        "/v1/predict": {
            "post": {
                "summary": "predictions with SE and a 95% interval for one event or a list "
                "of at most 10,000 (fields: the formula's columns and its group; body at "
                "most 8 MiB)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    {"type": "object"},
                                    {
                                        "type": "array",
                                        "items": {"type": "object"},
                                        "maxItems": 10000,
                                    },
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json_body(
                        {
                            "oneOf": [
                                {
                                    "allOf": [
                                        _ref("Prediction"),
                                        {"type": "object", "properties": info},
                                    ]
                                },
                                {
                                    "type": "object",
                                    "properties": {
                                        "predictions": {
                                            "type": "array",
                                            "items": _ref("Prediction"),
                                        },
                                        **info,
                                    },
                                },
                            ]
                        },
                        "one prediction, or a list for a list",
                    ),
                    **_errors(400, 413, 503),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streamlmm query service",
            "version": "1",
            "description": "Group effects and predictions from the newest snapshot. " + _KEY_RULE,
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
