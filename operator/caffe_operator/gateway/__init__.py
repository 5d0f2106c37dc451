"""The gateway: discovery, balancing, the proxy app."""
