"""Model loading: everything that runs once, before the first request, to decide what serves.

`child_load` loads the model in a child process first (a Caffe abort cannot take the server down);
`selection` chooses the backend (conversion by `convert/`, the `parity` gate, cached verdicts);
`forward_probe` runs forwards to find output dims and whether batching is safe; `calibration`
measures whether batching pays; `served` resolves the served input shapes and output blobs.
Imports nothing at package level: `python -m inference_server.loading.child_load` starts fast.
"""
