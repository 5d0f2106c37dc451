"""Kubernetes RBAC, evaluated offline: which API requests a set of (Cluster)Role rules allows.

Used to prove least privilege from an API request log: every request a component made is allowed
by the rules bound to its ServiceAccount, and every (apiGroup, resource, verb) those rules grant
was used by at least one request. It follows the API server's own steps:

- `request_attributes`: the API server's RequestInfo (k8s.io/apiserver/pkg/endpoints/request):
  resource requests under /api/v1 and /apis/GROUP/VERSION get a verb from the method (GET a name:
  get; GET a collection: list, or watch with ?watch=true; POST create; PUT update; PATCH patch;
  DELETE delete/deletecollection), a namespace, resource, subresource and name; anything else is a
  non-resource URL with the lower-cased method as verb.
- `rule_allows`: the RBAC authorizer's rule matching (k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go):
  verbs, apiGroups, resources ("res/sub" for subresources; "*" wildcards), resourceNames, and
  nonResourceURLs (exact, or a prefix ending in "*").
- `grants_for`: which rules reach a ServiceAccount: a ClusterRoleBinding's everywhere, a
  RoleBinding's in its namespace only.
- Every authenticated user also holds the default `system:discovery` and `system:public-info-viewer`
  ClusterRoles (API discovery, /version, health): `DEFAULT_AUTHENTICATED_RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_AUTHENTICATED_RULES: list[dict[str, Any]] = [
    {"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*",
                         "/readyz", "/version", "/version/"], "verbs": ["get"]},
]


@dataclass(frozen=True)
class Attributes:
    """What RBAC decides on (one request)."""

    verb: str
    resource_request: bool
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    def __str__(self) -> str:
        if not self.resource_request:
            return f"{self.verb} {self.path}"
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        group = self.api_group or "core"
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        return f"{self.verb} {group}/{what}{(' ' + self.name) if self.name else ''}{where}"


def request_attributes(method: str, url: str) -> Attributes:
    parts = urlsplit(url)
    path = parts.path
    query = parse_qs(parts.query)
    segments = [s for s in path.strip("/").split("/") if s]
    method = method.upper()
    if len(segments) >= 2 and segments[0] == "api":
        group, rest = "", segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, rest = segments[1], segments[3:]
    else:
        return Attributes(verb=method.lower(), resource_request=False, path=path)
    if not rest:  # /api/v1, /apis/g/v: discovery
        return Attributes(verb=method.lower(), resource_request=False, path=path)
    watch_prefix = rest[0] == "watch"
    if watch_prefix:
        rest = rest[1:]
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    elif len(rest) in (1, 2) and rest[0] == "namespaces":  # the namespace object itself
        namespace = rest[1] if len(rest) == 2 else ""
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    watching = watch_prefix or query.get("watch", [""])[0] in ("true", "1")
    if method in ("GET", "HEAD"):
        verb = "watch" if watching else ("get" if name else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}[method]
    return Attributes(verb=verb, resource_request=True, api_group=group, resource=resource,
                      subresource=subresource, namespace=namespace, name=name, path=path)


def _matches(values: list[str], wanted: str) -> bool:
    return "*" in values or wanted in values


def rule_allows(rule: dict[str, Any], attrs: Attributes) -> bool:
    if not _matches(rule.get("verbs") or [], attrs.verb):
        return False
    if not attrs.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1])):
                return True
        return False
    if not _matches(rule.get("apiGroups") or [], attrs.api_group):
        return False
    combined = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    resources = rule.get("resources") or []
    if not ("*" in resources or combined in resources
            or (attrs.subresource and f"*/{attrs.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


@dataclass(frozen=True)
class Grant:
    """One rule, from `role`, effective in `namespace` (None: every namespace and cluster scope)."""

    rule: dict[str, Any]
    role: str
    namespace: str | None

    def allows(self, attrs: Attributes) -> bool:
        if self.namespace is not None and attrs.namespace != self.namespace:
            return False
        return rule_allows(self.rule, attrs)


def grants_for(service_account: str, sa_namespace: str, objects: list[dict[str, Any]]) -> list[Grant]:
    """The rules bound to system:serviceaccount:NS:NAME by the given Roles/ClusterRoles and bindings."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    out: list[Grant] = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and s.get("namespace") == sa_namespace for s in subjects):
            continue
        ref = binding["roleRef"]
        binding_ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role_ns = binding_ns if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, \
            f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}"
        out += [Grant(rule, f"{ref['kind']}/{ref['name']}", binding_ns) for rule in role.get("rules") or []]
    return out


def authenticated_defaults() -> list[Grant]:
    return [Grant(rule, "ClusterRole/system:discovery", None) for rule in DEFAULT_AUTHENTICATED_RULES]


def unused_permissions(grants: list[Grant], used: list[Attributes]) -> list[str]:
    """Every (apiGroup, resource, verb) a grant names that no request in `used` exercised."""
    out = []
    for grant in grants:
        rule = grant.rule
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    single = dict(rule, apiGroups=[group], resources=[resource], verbs=[verb])
                    if not any(Grant(single, grant.role, grant.namespace).allows(a) for a in used):
                        out.append(f"{grant.role}: {verb} {group or 'core'}/{resource}")
    return out
