"""The request path: bytes in, prediction out, once the model is loaded.

`app` (the REST routes) and `grpc/` (beside this package: its messages are shared with the gateway)
hand a request to `dataplane` (what it means, no transport), which decodes it with `codecs`
(`jsonscan` for the JSON fast path, `preprocess`/`caffe_io` for images) and queues it on the
`executor` (the worker threads that own the Nets). `metrics` and `stats` count what happened.
"""
