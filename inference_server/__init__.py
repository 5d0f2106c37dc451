"""caffe-serving inference server: pycaffe models over the Open Inference Protocol."""
