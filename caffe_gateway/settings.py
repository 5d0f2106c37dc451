"""The gateway's forwarding options: one table gives both the command-line flags (`caffeserve
gateway`, and `caffeserve up`, which runs a gateway too) and the settings objects they fill."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import NamedTuple

from caffe_http.server import ServerLimits

from .balancer import BalancerSettings
from .proxy import ProxySettings


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
