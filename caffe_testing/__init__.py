"""What the tests and the benchmarks share: real parts started on loopback, and test data.

- nets.py: Caffe nets with seeded random weights, and a direct pycaffe forward (the reference)
- servers.py: `caffeserve serve` processes and plain HTTP helpers; gateway.py: `caffeserve gateway`
- digits.py: the digits example's data helpers
- cluster.py: a Kubernetes API (kmock's emulator), kubectl, and the operator as a process;
  cms.py: CaffeModelServices in it; kubelet.py: a pod's containers as local processes
- chart.py: real Helm against the emulator; rbac.py: what the chart's RBAC allows

Installed with the project for development (`make setup`), never copied into an image.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
