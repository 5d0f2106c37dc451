"""The OIP gRPC message classes, built from `_descriptors.py` in a descriptor pool of our own.

A private pool, not protobuf's default one: tritonclient.grpc and the kserve SDK register the same
`inference.*` names in the default pool, and two definitions of one name there fail at import
("duplicate symbol", kserve/kserve#3099). Ours never meet theirs, so this module imports beside
either. The classes behave like protoc-generated ones (FromString, SerializeToString, fields).
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pool, duration_pb2, message_factory

from ._descriptors import FILES

SERVICE = "inference.GRPCInferenceService"

POOL = descriptor_pool.DescriptorPool()
for _dep in (any_pb2, duration_pb2):  # rpc_status.proto imports them
    POOL.AddSerializedFile(_dep.DESCRIPTOR.serialized_pb)
for _data in FILES.values():
    POOL.AddSerializedFile(_data)


def _cls(full_name: str):
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


ServerLiveRequest = _cls("inference.ServerLiveRequest")
ServerLiveResponse = _cls("inference.ServerLiveResponse")
ServerReadyRequest = _cls("inference.ServerReadyRequest")
ServerReadyResponse = _cls("inference.ServerReadyResponse")
ModelReadyRequest = _cls("inference.ModelReadyRequest")
ModelReadyResponse = _cls("inference.ModelReadyResponse")
ServerMetadataRequest = _cls("inference.ServerMetadataRequest")
ServerMetadataResponse = _cls("inference.ServerMetadataResponse")
ModelMetadataRequest = _cls("inference.ModelMetadataRequest")
ModelMetadataResponse = _cls("inference.ModelMetadataResponse")
ModelInferRequest = _cls("inference.ModelInferRequest")
ModelInferResponse = _cls("inference.ModelInferResponse")
# Triton's statistics and model-configuration extensions (triton.py fills them from REST's JSON)
ModelConfigRequest = _cls("inference.ModelConfigRequest")
ModelConfigResponse = _cls("inference.ModelConfigResponse")
ModelStatisticsRequest = _cls("inference.ModelStatisticsRequest")
ModelStatisticsResponse = _cls("inference.ModelStatisticsResponse")
# Triton's model repository extension
RepositoryIndexRequest = _cls("inference.RepositoryIndexRequest")
RepositoryIndexResponse = _cls("inference.RepositoryIndexResponse")
RepositoryModelLoadRequest = _cls("inference.RepositoryModelLoadRequest")
RepositoryModelLoadResponse = _cls("inference.RepositoryModelLoadResponse")
RepositoryModelUnloadRequest = _cls("inference.RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse = _cls("inference.RepositoryModelUnloadResponse")
InferParameter = _cls("inference.InferParameter")
InferTensorContents = _cls("inference.InferTensorContents")
Status = _cls("google.rpc.Status")
RetryInfo = _cls("google.rpc.RetryInfo")
Any = _cls("google.protobuf.Any")

# RPC name -> (request class, response class), in the service's order
METHODS = {m.name: (_cls(m.input_type.full_name), _cls(m.output_type.full_name))
           for m in POOL.FindServiceByName(SERVICE).methods}
