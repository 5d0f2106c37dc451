"""Backends: one small interface (load, describe, infer on numpy arrays); pycaffe first."""
