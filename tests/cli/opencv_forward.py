"""Run an ONNX file with OpenCV's DNN module: `python opencv_forward.py MODEL.onnx IN.npz OUT.npz OUTPUT...`.

Run by tests/cli/test_export.py with the interpreter of .venv-opencv (`make setup`): OpenCV 5 wheels need
numpy 2, pycaffe's build numpy 1, so OpenCV lives in a venv of its own and only this file runs there.
"""

import sys

import cv2
import numpy as np

model, inputs, out, *names = sys.argv[1:]
net = cv2.dnn.readNetFromONNX(model)
feed = np.load(inputs)
for name in feed.files:
    net.setInput(feed[name], name)
results = net.forward(names)
np.savez(out, **{n: np.asarray(r) for n, r in zip(names, results, strict=True)}, __version__=np.array(cv2.__version__))
