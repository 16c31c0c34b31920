"""Turn pydantic validation errors into danlu's one-line config messages.

Each clause names the user's key path (union member tags dropped), the value received and
what was expected; an unknown key gets a did-you-mean from the keys valid at that place.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel


def describe(errors: list[dict[str, Any]], root: type[BaseModel]) -> list[str]:
    """One clause per key: the members of a union (`float | "auto"`) each report an error."""
    found: dict[str, tuple[str, list[str], str]] = {}
    for err in errors:
        key, text, got = _describe(err, root)
        generic = bool(got)  # "key: what was expected (got value)"
        _, texts, _ = found.setdefault(key, (f"{key}: " if generic else "", [], got))
        text = text.removeprefix(f"{key}: ") if generic else text
        if text not in texts:
            texts.append(text)
    return [head + ", or ".join(texts) + got for head, texts, got in found.values()]


def _describe(err: dict[str, Any], root: type[BaseModel]) -> tuple[str, str, str]:
    """(key, clause, " (got value)") for one validation problem, with the user's key path."""
    path, owner = _user_path(err["loc"], root)
    key = ".".join(path) or "config"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(path[-1], allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{'.'.join([*path[:-1], close[0]])}'?" if close else ""
        return key, f"unknown key '{key}'; {hint or 'valid keys here: ' + ', '.join(allowed)}", ""
    if kind == "missing":
        return key, f"missing required key '{key}'", ""
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = owner.model_fields.get(path[-1]) if owner else None
        tags = [m.model_fields["type"].annotation.__args__[0] for m in _members(field)]
        expected = ", ".join(f"'{t}'" for t in tags)
        got = value.get("type") if isinstance(value, dict) else None
        if got is None:
            return key, f"missing required key '{key}.type' (one of {expected})", ""
        close = difflib.get_close_matches(str(got), tags, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return key, f"{key}.type: got {got!r}, expected one of {expected}{hint}", ""
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(value, dict) and kind in ("value_error", "assertion_error"):
        return key, f"{key}: {msg}", ""  # a cross-field check: the message names the values
    return key, f"{key}: {msg}", f" (got {value!r})"


def _user_path(
    loc: tuple[Any, ...], root: type[BaseModel]
) -> tuple[list[str], type[BaseModel] | None]:
    """Walk the schema along a pydantic error location, dropping union member tags.

    Returns the user's key path and the section model that holds its last key."""
    path: list[str] = []
    model: type[BaseModel] | None = root
    owner: type[BaseModel] | None = root
    i = 0
    while i < len(loc):
        part = loc[i]
        path.append(str(part))
        owner = model
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        model = None
        if field is not None:
            members = _members(field)
            if len(members) == 1:
                model = members[0]
            elif members and i + 1 < len(loc):
                tagged = {m.model_fields["type"].annotation.__args__[0]: m for m in members}
                if loc[i + 1] in tagged:
                    model = tagged[loc[i + 1]]
                    i += 1
            elif _is_union(field.annotation) and i + 1 < len(loc):
                i += 1  # `float | Literal[...]`: pydantic names the member tried; drop it
        i += 1
    return path, owner


def _members(field: Any) -> list[type[BaseModel]]:
    return _models_in(field.annotation) if field is not None else []


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_union(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return origin in (Union, types.UnionType) and len(args) > 1


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []
