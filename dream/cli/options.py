"""Option parsing shared by the ``dream`` subcommands."""
from __future__ import annotations

import json


def parse_set(pairs) -> dict:
    """``--set KEY=VALUE ...`` -> ``{KEY: value}``: each value parsed as JSON, else kept as the string."""
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"--set expects KEY=VALUE, got {kv!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
