"""The calls that change what a server holds, named in one place for whoever guards them.

Triton groups them as its "model-repository" API (`--http-restricted-api model-repository:…`): the index,
and loading and unloading a model. A server answers load and unload only with `--model-control-mode
explicit`; a gateway may ask for a credential before it forwards any of them. Pure names, no imports: the
server, the gateway and their guards share them.
"""

from __future__ import annotations

# REST: POST /v2/repository/index, POST /v2/repository/models/{m}/load, POST /v2/repository/models/{m}/unload
REPOSITORY_INDEX_PATH = ("v2", "repository", "index")
REPOSITORY_ACTIONS = frozenset({"load", "unload"})  # the tail of v2/repository/models/{m}/{action}
# gRPC methods of inference.GRPCInferenceService
REPOSITORY_RPCS = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})
STATE_CHANGING_RPCS = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


def repository_model_path(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """`v2/repository/models/{m}/{load|unload}` (as path segments) → (model, action); None otherwise."""
    if len(parts) == 5 and parts[:3] == ("v2", "repository", "models") and parts[4] in REPOSITORY_ACTIONS:
        return parts[3], parts[4]
    return None


def is_repository_path(path: str) -> bool:
    """A REST path of the model-repository API (the index, a load, an unload)."""
    parts = tuple(path.split("?", 1)[0].strip("/").split("/"))
    return parts == REPOSITORY_INDEX_PATH or repository_model_path(parts) is not None


def is_state_changing_path(path: str) -> bool:
    """A REST call that loads or unloads a model (the index only reads)."""
    return repository_model_path(tuple(path.split("?", 1)[0].strip("/").split("/"))) is not None
