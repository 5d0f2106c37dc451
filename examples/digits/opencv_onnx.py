"""The digits example in OpenCV 5 after `caffeserve export` (docs/migrating.md): where the code read the
Caffe files with readNetFromCaffe, it reads the exported ONNX file; the input blob and the output are the same.

    python examples/digits/opencv_onnx.py /tmp/digits-export/digits.onnx examples/digits/digit-3.png

Needs only OpenCV (opencv-python-headless 5.x) and numpy; `make setup` installs them in .venv-opencv.
"""

import sys

import cv2

onnx_path, image_path = sys.argv[1:3]
# OpenCV 4: net = cv2.dnn.readNetFromCaffe("deploy.prototxt", "digits.caffemodel")
net = cv2.dnn.readNetFromONNX(onnx_path)
gray = cv2.imread(image_path, cv2.IMREAD_GRAYSCALE)
# server.yaml's preprocessing (pixels in [0, 1] x rawScale 16, minus meanValues 4.9, x scale 0.16) in
# blobFromImage's terms, on 0..255 pixels: (pixel - mean) x scalefactor
blob = cv2.dnn.blobFromImage(gray, scalefactor=16 / 255 * 0.16, size=(8, 8), mean=4.9 * 255 / 16)
net.setInput(blob, "data")
prob = net.forward("prob")
print(f"digit {int(prob.argmax())} (probability {float(prob.max()):.3f}, OpenCV {cv2.__version__})")
