"""What the tests and the benchmarks share: real parts started on loopback, and test data.

- nets.py: Caffe nets with seeded random weights, and a direct pycaffe forward (the reference)
- servers.py: `caffeserve serve` processes and plain HTTP helpers; gateway.py: `caffeserve gateway`
- digits.py: the digits example's data helpers
- cluster.py: a Kubernetes API (kmock's emulator), kubectl, and the operator as a process;
  cms.py: CaffeModelServices in it; kubelet.py: a pod's containers as local processes
- chart.py: real Helm (against the emulator, or a real API server); rbac.py: what the chart's RBAC allows
- controlplane.py: a real Kubernetes control plane on loopback (etcd, kube-apiserver, controller
  manager, scheduler from scripts/kube/build.sh); nodeagent.py: its nodes, running pods as processes;
  kubeclient.py: a small client for it; pki.py: its CA and certificates

Installed with the project for development (`make setup`), never copied into an image.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
