"""A small IAM policy evaluator for the EC2 calls the sandbox region serves.

moto can check IAM actions but matches every Resource against ``*`` and ignores condition keys, so
it cannot enforce the plugin's documented policy, whose point is the ``ec2:ResourceTag/...``
condition on StartInstances and StopInstances. This module evaluates an identity-based policy
document the way AWS does for the part of the language that policy uses:

* ``Effect`` Allow or Deny; an explicit Deny wins over any Allow; nothing allowed means denied;
* ``Action`` / ``NotAction`` with ``*`` and ``?`` wildcards (``ec2:Describe*``), case-insensitive;
* ``Resource`` / ``NotResource``: ``*`` or ARNs with wildcards, such as
  ``arn:aws:ec2:<region>:<account>:instance/<id>``;
* ``Condition`` with the String operators (``StringEquals``, ``StringNotEquals``, their
  ``IgnoreCase`` forms, ``StringLike``, ``StringNotLike``, each optionally ``...IfExists``) on
  ``ec2:ResourceTag/<key>`` (or ``aws:ResourceTag/<key>``), ``aws:RequestedRegion`` and
  ``ec2:Region``. Several operators or keys must all hold; several values of one key are
  alternatives. A key the request does not carry fails a positive operator and satisfies a
  negated one, as in AWS.

How a call maps to resources: ``Describe*`` actions have no resource-level permissions in EC2,
so they are evaluated against ``*`` even when they name instances. Any other call that names
instances is evaluated once per instance, against that instance's ARN and tags, and fails as a
whole if one instance is denied (AWS answers such a call with a single UnauthorizedOperation).
An instance id the region does not know has no tags, so a tag condition denies it (AWS, too,
refuses rather than reveals). Other calls are evaluated against ``*``. Resource types other than
instances (images, subnets, volumes for RunInstances) are not modelled.

Pure: no I/O, no moto; :class:`~buildbot_ec2_hybrid.sandbox.region.SandboxRegion` feeds it the
tags it reads from moto.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Decision",
    "Denial",
    "Policy",
    "PolicyError",
    "instance_arn",
]

SERVICE = "ec2"
UNAUTHORIZED_CODE = "UnauthorizedOperation"
UNAUTHORIZED_STATUS = 403

_VERSIONS = ("2012-10-17", "2008-10-17")
_STRING_OPERATORS = {
    "StringEquals": (False, False, False),  # (negated, ignore case, wildcards)
    "StringNotEquals": (True, False, False),
    "StringEqualsIgnoreCase": (False, True, False),
    "StringNotEqualsIgnoreCase": (True, True, False),
    "StringLike": (False, False, True),
    "StringNotLike": (True, False, True),
}
_TAG_KEY = re.compile(r"^(?:ec2|aws):resourcetag/(.+)$", re.IGNORECASE)


class PolicyError(ValueError):
    """The document is not a policy this evaluator can judge faithfully."""


class Decision(enum.Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit deny"
    IMPLICIT_DENY = "implicit deny"


def instance_arn(region: str, account_id: str, instance_id: str) -> str:
    return f"arn:aws:ec2:{region}:{account_id}:instance/{instance_id}"


@dataclass(frozen=True)
class Denial:
    """Why a call is refused; rendered the way EC2 refuses it."""

    action: str  # the IAM action, e.g. "ec2:StartInstances"
    resource: str  # "*" or the first denied instance's ARN
    decision: Decision
    statement: str | None  # the Sid (or index) of the denying statement, for explicit denies
    context: Mapping[str, str]

    status: int = UNAUTHORIZED_STATUS
    code: str = UNAUTHORIZED_CODE

    @property
    def message(self) -> str:
        if self.decision is Decision.EXPLICIT_DENY:
            why = f"an explicit deny in statement {self.statement} applies"
        else:
            why = f"no statement of the policy allows the {self.action} action"
        return (
            "You are not authorized to perform this operation. "
            f"The caller is not authorized to perform: {self.action} on resource: "
            f"{self.resource} because {why}. "
            f"Encoded authorization failure message: {self.encoded()}"
        )

    def encoded(self) -> str:
        """An opaque blob, as AWS gives; base64 JSON here, so a curious test can decode it."""
        detail = {
            "allowed": False,
            "explicitDeny": self.decision is Decision.EXPLICIT_DENY,
            "matchedStatement": self.statement,
            "action": self.action,
            "resource": self.resource,
            "conditions": dict(sorted(self.context.items())),
        }
        raw = json.dumps(detail, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _glob(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    # IAM wildcards are only * and ?; everything else, including [ and ], is literal.
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{body}$", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _strings(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, (int, float)):
            item = str(item)
        if not isinstance(item, str):
            raise PolicyError(f"{where}: expected a string or a list of strings, got {item!r}")
        if "${" in item:
            # AWS would substitute a policy variable; this evaluator cannot, and must not guess.
            raise PolicyError(f"{where}: policy variables are not supported ({item!r})")
        out.append(item)
    if not out:
        raise PolicyError(f"{where}: empty list")
    return out


@dataclass(frozen=True)
class _Condition:
    operator: str
    key: str
    values: tuple[str, ...]
    negated: bool
    ignore_case: bool
    wildcards: bool
    if_exists: bool

    def holds(self, context: _Context) -> bool:
        present = context.get(self.key)
        if present is None:
            return self.if_exists or self.negated
        if self.wildcards:
            matched = any(_glob(v, ignore_case=False).match(present) for v in self.values)
        elif self.ignore_case:
            matched = present.lower() in {v.lower() for v in self.values}
        else:
            matched = present in self.values
        return not matched if self.negated else matched


@dataclass(frozen=True)
class _Statement:
    sid: str
    allow: bool
    actions: tuple[re.Pattern[str], ...]
    not_action: bool
    resources: tuple[re.Pattern[str], ...]
    not_resource: bool
    conditions: tuple[_Condition, ...]

    def applies(self, action: str, resource: str, context: _Context) -> bool:
        if any(p.match(action) for p in self.actions) == self.not_action:
            return False
        if any(p.match(resource) for p in self.resources) == self.not_resource:
            return False
        return all(c.holds(context) for c in self.conditions)


def _parse_statement(raw: Any, index: int) -> _Statement:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"Statement[{index}] must be an object")
    sid = str(raw.get("Sid") or f"#{index}")
    where = f"statement {sid}"
    for unsupported in ("Principal", "NotPrincipal"):
        if unsupported in raw:
            raise PolicyError(f"{where}: {unsupported} belongs in resource-based policies")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"{where}: Effect must be 'Allow' or 'Deny', not {effect!r}")

    def pick(name: str) -> tuple[list[str], bool]:
        if (name in raw) == (f"Not{name}" in raw):
            raise PolicyError(f"{where}: give exactly one of {name} and Not{name}")
        key = name if name in raw else f"Not{name}"
        return _strings(raw[key], f"{where} {key}"), key != name

    actions, not_action = pick("Action")
    for action in actions:
        if action != "*" and ":" not in action:
            raise PolicyError(f"{where}: action {action!r} lacks its service prefix (ec2:...)")
    resources, not_resource = pick("Resource")

    conditions = []
    block = raw.get("Condition", {})
    if not isinstance(block, Mapping):
        raise PolicyError(f"{where}: Condition must be an object")
    for operator, keys in block.items():
        base = operator[: -len("IfExists")] if operator.endswith("IfExists") else operator
        if base not in _STRING_OPERATORS:
            raise PolicyError(f"{where}: condition operator {operator!r} is not supported")
        if not isinstance(keys, Mapping) or not keys:
            raise PolicyError(f"{where}: {operator} must map condition keys to values")
        negated, ignore_case, wildcards = _STRING_OPERATORS[base]
        for key, values in keys.items():
            conditions.append(
                _Condition(
                    operator,
                    str(key),
                    tuple(_strings(values, f"{where} {operator} {key}")),
                    negated,
                    ignore_case,
                    wildcards,
                    base != operator,
                )
            )
    return _Statement(
        sid=sid,
        allow=effect == "Allow",
        actions=tuple(_glob(a, ignore_case=True) for a in actions),
        not_action=not_action,
        resources=tuple(_glob(r, ignore_case=False) for r in resources),
        not_resource=not_resource,
        conditions=tuple(conditions),
    )


class Policy:
    """One identity-based policy document, parsed once and judged many times."""

    def __init__(self, document: Mapping[str, Any] | str) -> None:
        if isinstance(document, str):
            try:
                document = json.loads(document)
            except ValueError as e:
                raise PolicyError(f"not JSON: {e}") from None
        if not isinstance(document, Mapping):
            raise PolicyError("a policy document is a JSON object")
        version = document.get("Version", "2008-10-17")
        if version not in _VERSIONS:
            raise PolicyError(f"unknown policy Version {version!r}")
        raw = document.get("Statement")
        if isinstance(raw, Mapping):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise PolicyError("Statement must be a statement or a non-empty list of them")
        self.document: Mapping[str, Any] = document
        self._statements = tuple(_parse_statement(s, i) for i, s in enumerate(raw))

    def decide(
        self, action: str, resource: str = "*", context: Mapping[str, str] | None = None
    ) -> tuple[Decision, str | None]:
        """(decision, Sid of the deciding Deny or Allow) for one IAM action on one resource.

        `context` maps condition keys (any case) to the request's values.
        """
        ctx = _Context(context or {})
        allowed_by = None
        for statement in self._statements:
            if not statement.applies(action, resource, ctx):
                continue
            if not statement.allow:
                return Decision.EXPLICIT_DENY, statement.sid
            allowed_by = allowed_by or statement.sid
        if allowed_by is not None:
            return Decision.ALLOW, allowed_by
        return Decision.IMPLICIT_DENY, None

    def authorize(
        self,
        api_action: str,
        *,
        region: str,
        account_id: str,
        instances: Mapping[str, Mapping[str, str] | None] | None = None,
    ) -> Denial | None:
        """None if the EC2 call is allowed, else the Denial for its first refused resource.

        `api_action` is the API name ("StartInstances"); `instances` maps every instance id the
        call names, in order, to its tags (None: no such instance).
        """
        action = f"{SERVICE}:{api_action}"
        named = instances or {}
        if api_action.startswith("Describe") or not named:
            targets: list[tuple[str, dict[str, str]]] = [("*", {})]
        else:
            targets = [
                (
                    instance_arn(region, account_id, instance_id),
                    {f"ec2:ResourceTag/{k}": v for k, v in (tags or {}).items()},
                )
                for instance_id, tags in named.items()
            ]
        for resource, context in targets:
            context["aws:RequestedRegion"] = region
            context["ec2:Region"] = region
            decision, sid = self.decide(action, resource, context)
            if decision is not Decision.ALLOW:
                return Denial(action, resource, decision, sid, context)
        return None


class _Context:
    """The request's condition keys. IAM compares key names case-insensitively, and
    ``aws:ResourceTag/k`` and ``ec2:ResourceTag/k`` name the same tag."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {_key(k): v for k, v in values.items()}

    def get(self, key: str) -> str | None:
        return self._values.get(_key(key))


def _key(name: str) -> str:
    match = _TAG_KEY.match(name)
    return f"ec2:resourcetag/{match.group(1)}".lower() if match else name.lower()
