"""Local mode's autoscaler: how many replicas a model variant wants, from the gateway's load signal.

The signal is what a cluster's KEDA ScaledObject reads from the gateway (caffe_gateway/traffic.py):
in-flight + queued requests of the variant, held requests included. The rule is the HPA's
(and KEDA's, which drives one):

- desired = ceil(load / target), clamped to [minReplicas, maxReplicas]; any load at all wants at
  least one replica (KEDA's activation: a held request wakes a model scaled to zero);
- the load is the mean of the samples over the last `window_s` (a short window, as Knative's
  panic window, so that a burst is seen within a second or two);
- scale up at once; scale down only to the highest recommendation of the last
  `scale_down_delay_s` (the HPA's scale-down stabilization window, KEDA's cooldownPeriod), so a
  lull shorter than that removes nothing.

Pure: the caller feeds samples with their time and applies the answer.
"""

from __future__ import annotations

import math
from collections import deque

from .models import LocalAutoscaling


class Autoscaler:
    def __init__(self, spec: LocalAutoscaling, window_s: float = 1.0):
        self.spec = spec
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (time, load)
        self._recommendations: deque[tuple[float, int]] = deque()  # (time, replicas wanted)

    def recommend(self, load: float) -> int:
        s = self.spec
        want = math.ceil(load / s.target) if load > 0 else 0
        return max(s.min_replicas, min(s.max_replicas, want))

    def desired(self, load: float, current: int, now: float) -> int:
        """Feed one sample of the load at `now`; the replicas the variant should have."""
        self._samples.append((now, float(load)))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        mean = sum(v for _, v in self._samples) / len(self._samples)
        want = self.recommend(mean if load == 0 or mean > 0 else load)
        if load > 0 and want == 0:
            want = 1
        self._recommendations.append((now, want))
        while self._recommendations and self._recommendations[0][0] < now - self.spec.scale_down_delay_s:
            self._recommendations.popleft()
        if want >= current:
            return want
        return min(current, max(w for _, w in self._recommendations))
