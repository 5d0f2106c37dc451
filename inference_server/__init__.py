"""caffe-serving inference server: pycaffe models over the Open Inference Protocol."""

__version__ = "0.1.0"
