"""The gateway (`caffeserve gateway`): forwards Open Inference Protocol requests to each model's
ready servers. discovery.py finds them (a static list, or EndpointSlices), balancer.py picks one,
proxy.py forwards; app.py ties them to the shared HTTP server; settings.py is its options table.

Independent of the operator: it meets the model pods only through the labels and port that
inference_server/slices.py states.
"""
