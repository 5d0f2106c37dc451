"""The gateway (`caffeserve gateway`): forwards Open Inference Protocol requests to each model's
ready servers. discovery.py finds them (a static list, or EndpointSlices), traffic.py chooses the
variant, balancer.py picks an endpoint, forward.py runs the one forwarding loop (deadline, retries,
fallback, rescue) that proxy.py (REST) and grpc_proxy.py (gRPC) send attempts through; app.py ties
them to the shared HTTP server; settings.py is its options table.

Independent of the operator: it meets the model pods only through the labels and port that
inference_server/slices.py states.
"""
