"""The ``sidemesh check`` explainer of AccessPolicy and RateLimitPolicy: what one object
selects and does, and what is wrong with it (errors: not enforced; warnings: references that
resolve to nothing in the file and ``--mesh-dir``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from webhook.cli.check import CheckContext, Explanation, Finding
from webhook.policy.model import ROOT_NAMESPACE, PolicyError, parse_policy
from webhook.policy.report import describe_access, describe_limits, unresolved
from webhook.ratelimit.model import KIND as RATE_LIMIT_POLICY, LimitError, parse_limit_policy

__all__ = ["explain"]

_FIELD = re.compile(r": (spec[\w.\[\]]*)")


def explain(obj: Mapping[str, Any], ctx: CheckContext) -> Explanation:
    try:
        if obj.get("kind") == RATE_LIMIT_POLICY:
            limits = parse_limit_policy(obj)
            lines = describe_limits(limits, ctx.model)
            refs = unresolved(limits, ctx.model, ROOT_NAMESPACE)
        else:
            policy = parse_policy(obj)
            lines = describe_access(policy, ctx.model, ROOT_NAMESPACE)
            refs = unresolved(policy, ctx.model, ROOT_NAMESPACE)
    except (PolicyError, LimitError) as exc:
        found = _FIELD.search(str(exc))
        field = found.group(1).rstrip(".") if found else "spec"
        return Explanation((), (Finding(field, f"not enforced: {exc}"),))
    return Explanation(tuple(lines), tuple(Finding(f, m, "warning") for f, m in refs))
