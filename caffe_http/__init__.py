"""The HTTP layer every program here shares: the server transport (server.py), the keep-alive
upstream client (upstream.py), and how a program is told to stop (lifecycle.py).

It knows nothing of models: the inference server, the gateway and local mode build on it.
"""
