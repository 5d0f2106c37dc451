"""The gateway's forwarding options: one table gives both the command-line flags (`caffeserve
gateway`, and `caffeserve up`, which runs a gateway too) and the settings objects they fill."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from caffe_http.server import ServerLimits
from caffe_http.tls import POD_SERVER_NAME

from .auth import REVIEW_TTL_S, Allowed, Guard, StaticTokens, TokenReviewer
from .balancer import BalancerSettings
from .discovery import static_schemes
from .proxy import ProxySettings

if TYPE_CHECKING:
    from caffe_http.tls import ClientTLS, ReloadingTLS


@dataclass(frozen=True)
class Option:
    flag: str
    settings: str  # which settings object the value goes to: balancer, proxy or limits
    field: str  # the field there (also the argparse dest)
    type: type
    metavar: str
    help: str
    default_text: str = "%(default)s"


OPTIONS = (
    Option("--max-concurrency", "balancer", "max_concurrency", int, "N",
           "requests in flight per server before others wait in the gateway"),
    Option("--max-queue", "balancer", "max_queue", int, "N", "requests waiting per model; beyond, 503 + Retry-After"),
    Option("--max-wait", "balancer", "max_wait_s", float, "S",
           "longest wait for a free server; beyond, 503 + Retry-After"),
    Option("--request-timeout", "proxy", "request_timeout_s", float, "S",
           "deadline from a request's arrival to its answer; beyond, 504"),
    Option("--max-retries", "proxy", "max_retries", int, "N", "retries on other servers after a connection failure"),
    Option("--eject-after", "balancer", "eject_after", int, "N", "consecutive failures that eject a server"),
    Option("--eject-seconds", "balancer", "eject_base_s", float, "S",
           "ejection time, times the number of ejections so far"),
    Option("--max-body-bytes", "limits", "max_body_bytes", int, "B", "largest request body; beyond, 413", "64 MiB"),
    Option("--max-inflight-bytes", "limits", "max_inflight_bytes", int, "B",
           "request bodies held at once; beyond, 503 + Retry-After before the body is read (0: no limit)"),
)

DEFAULTS = {"balancer": BalancerSettings(), "proxy": ProxySettings(), "limits": ServerLimits()}


class GatewaySettings(NamedTuple):
    balancer: BalancerSettings
    proxy: ProxySettings
    limits: ServerLimits


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The forwarding options, as a `forwarding` group of `p`."""
    g = p.add_argument_group("forwarding")
    for o in OPTIONS:
        g.add_argument(o.flag, dest=o.field, type=o.type, default=getattr(DEFAULTS[o.settings], o.field),
                       metavar=o.metavar, help=f"{o.help} (default {o.default_text})")


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    values: dict[str, dict] = {name: {} for name in DEFAULTS}
    for o in OPTIONS:
        values[o.settings][o.field] = getattr(args, o.field)
    proxy = ProxySettings(**values["proxy"])
    # a body that takes longer than the whole request may is cut off at the same deadline
    limits = ServerLimits(**values["limits"], body_timeout_s=min(30.0, proxy.request_timeout_s))
    return GatewaySettings(BalancerSettings(**values["balancer"]), proxy, limits)


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """TLS and who may call (auth.py, tls.py), as a `security` group of `p`."""
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-dir", metavar="DIR",
                   help="serve REST and gRPC over TLS with DIR/tls.crt and DIR/tls.key (a kubernetes.io/tls "
                        "Secret's volume), reloaded when they change (default: plain text)")
    g.add_argument("--upstream-ca", metavar="FILE",
                   help="reach the model servers over TLS (REST and gRPC), trusting only this CA bundle (a "
                        "Secret's ca.crt), re-read when it changes (default: plain text inside the cluster)")
    g.add_argument("--upstream-server-name", default=POD_SERVER_NAME, metavar="NAME",
                   help="the name the servers' certificates carry, checked instead of their addresses "
                        "(default %(default)s)")
    g.add_argument("--auth", choices=("none", "tokens", "tokenreview"), default="none",
                   help="bearer tokens: none; tokens (--auth-token-file); tokenreview (the API server checks "
                        f"each token, cached {REVIEW_TTL_S:g} s; ServiceAccount tokens work) (default %(default)s)")
    g.add_argument("--auth-token-file", metavar="FILE",
                   help='static tokens, the API server\'s format: token,user,uid,"group1,group2" per line')
    g.add_argument("--auth-audience", action="append", default=[], metavar="AUD",
                   help="with tokenreview: an audience the token must be for (repeat; default the API server's)")
    g.add_argument("--auth-users", metavar="U1,U2",
                   help="who may call (with --auth-groups; default: anyone authenticated)")
    g.add_argument("--auth-groups", metavar="G1,G2",
                   help="groups that may call, e.g. system:serviceaccounts:team-a")
    g.add_argument("--admin-api", action="store_true",
                   help="serve the admin calls that change state (repository load/unload, log and trace "
                        "settings) to --admin-users/--admin-groups; needs --auth (default: off, 403)")
    g.add_argument("--admin-users", metavar="U1,U2", help="who may call the admin API")
    g.add_argument("--admin-groups", metavar="G1,G2", help="groups that may call the admin API")


def _names(text: str | None) -> frozenset[str]:
    return frozenset(n.strip() for n in (text or "").split(",") if n.strip())


def guard_from(args: argparse.Namespace, kube=None) -> Guard:
    """The Guard the flags ask for; ValueError when they do not fit together. `kube`: the
    discovery.KubeConfig to reach the API server (tokenreview only)."""
    identity: StaticTokens | TokenReviewer | None = None
    if args.auth == "tokens":
        if not args.auth_token_file:
            raise ValueError("--auth tokens needs --auth-token-file")
        identity = StaticTokens(args.auth_token_file)
    elif args.auth == "tokenreview":
        if kube is None:
            raise ValueError("--auth tokenreview needs the API server (in a cluster, or --kubeconfig)")
        identity = TokenReviewer(kube, tuple(args.auth_audience))
    return Guard(identity, Allowed(_names(args.auth_users), _names(args.auth_groups)), args.admin_api,
                 Allowed(_names(args.admin_users), _names(args.admin_groups)))


def tls_from(args: argparse.Namespace) -> ReloadingTLS | None:
    if not args.tls_dir:
        return None
    from caffe_http.tls import ReloadingTLS, TLSFiles

    try:
        return ReloadingTLS(TLSFiles.from_dir(args.tls_dir))
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ValueError(f"--tls-dir {args.tls_dir}: cannot load tls.crt/tls.key: {e}") from None


def upstream_tls_from(args: argparse.Namespace) -> ClientTLS | None:
    """TLS to the model servers (--upstream-ca); ValueError when the CA does not load or a --static URL's
    scheme says otherwise (https:// needs the CA; with it, every server is reached over TLS)."""
    schemes = static_schemes(args.static or [])
    if not args.upstream_ca:
        if "https" in schemes:
            raise ValueError("an https:// server in --static needs --upstream-ca (the CA its certificate is checked "
                             "against)")
        return None
    if "http" in schemes:
        raise ValueError("with --upstream-ca every server is reached over TLS: write https:// in --static")
    from caffe_http.tls import ClientTLS

    try:
        return ClientTLS(args.upstream_ca, args.upstream_server_name)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ValueError(f"--upstream-ca {args.upstream_ca}: cannot load it: {e}") from None
