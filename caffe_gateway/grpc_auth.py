"""auth.Guard on the gateway's gRPC side: the `authorization` metadata, refusals as gRPC status codes.

Two hooks, so that a gateway without authentication pays nothing an RPC could measure:
- with authentication, one grpc.aio interceptor (it may await a TokenReview before the call runs);
- without, a wrapper of the generic handler that only swaps the admin methods for a refusal.
`guarded` applies the same rules to the method table of our HTTP/2 transport (the default; `hooks` is for
CAFFESERVE_GRPC_TRANSPORT=grpcio): each guarded method wrapped, the open ones left as they are.
"""

from __future__ import annotations

import grpc

from .auth import ADMIN_METHODS, OPEN_METHODS, Denied, Guard

CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}


def _method(full: str) -> str:
    return full.rsplit("/", 1)[-1]  # "/inference.GRPCInferenceService/ModelInfer" -> "ModelInfer"


def _refusal(guard: Guard, e: Denied) -> grpc.RpcMethodHandler:
    guard.count("grpc", e.status)

    async def refuse(request: bytes, context) -> bytes:
        await context.abort(CODES[e.status], e.message)
        raise AssertionError("unreachable: context.abort raises")

    return grpc.unary_unary_rpc_method_handler(refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, guard: Guard):
        self.guard = guard

    async def intercept_service(self, continuation, details):
        method = _method(details.method)
        if method not in OPEN_METHODS:
            authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
            try:
                await self.guard.check(authorization, method in ADMIN_METHODS)
            except Denied as e:
                return _refusal(self.guard, e)
        return await continuation(details)


class AdminOff(grpc.GenericRpcHandler):
    """`inner` with its admin methods refused (the admin API off, no authentication)."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: Guard):
        self.inner, self.guard = inner, guard

    def service(self, details):
        if _method(details.method) in ADMIN_METHODS:
            return _refusal(self.guard, Denied(403, "the admin API is off on this gateway (--admin-api)"))
        return self.inner.service(details)


def hooks(guard: Guard, handler):
    """(handler factory, interceptors) for the gateway's GRPCListener."""
    if guard.authenticates:
        return handler, (AuthInterceptor(guard),)
    return (lambda: AdminOff(handler(), guard)), ()


def _checked(f, guard: Guard, admin: bool):
    async def call(data, context) -> bytes:
        authorization = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        try:
            await guard.check(authorization, admin)
        except Denied as e:
            guard.count("grpc", e.status)
            await context.abort(CODES[e.status], e.message)
        return await f(data, context)

    return call


def _refused(guard: Guard, e: Denied):
    async def refuse(data, context) -> bytes:
        guard.count("grpc", e.status)
        await context.abort(CODES[e.status], e.message)
        raise AssertionError("unreachable: context.abort raises")

    return refuse


def _unimplemented(name: str):
    async def missing(data, context) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {name}")
        raise AssertionError("unreachable: context.abort raises")

    return missing


def guarded(methods: dict, guard: Guard) -> dict:
    """`methods` (name → handler) under the guard, for our HTTP/2 transport: the same rules as `hooks`.
    Without authentication only the admin methods change (refused); an admin method the gateway does not
    serve is still guarded first (a caller learns nothing before it is allowed)."""
    out = {}
    for name in sorted(set(methods) | ADMIN_METHODS):
        f = methods.get(name) or _unimplemented(name)
        if name in OPEN_METHODS:
            out[name] = f
        elif not guard.authenticates:
            admin_off = Denied(403, "the admin API is off on this gateway (--admin-api)")
            out[name] = _refused(guard, admin_off) if name in ADMIN_METHODS else f
        else:
            out[name] = _checked(f, guard, name in ADMIN_METHODS)
    return out
