"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` beside the REST routes.

`messages` holds the protocol's message classes (in a descriptor pool of their own), `codec` turns
them into the data plane's requests and back, `service` is the RPC handlers and the server.
"""
