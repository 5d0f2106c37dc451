"""Draw docs/images/dashboard.png: the panels of the chart's Grafana dashboard where Grafana puts
them (its 24-column grid), each with its title and the metrics it queries. A layout, not live data:
    .venv/bin/python docs/render_dashboard.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "charts" / "caffe-serving" / "dashboards" / "caffe-serving.json"
OUT = REPO / "docs" / "images" / "dashboard.png"


def main() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if "gridPos" in p]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig, ax = plt.subplots(figsize=(13, 13 * rows / 24 * 0.55))
    ax.set_xlim(0, 24)
    ax.set_ylim(rows, -2)
    ax.axis("off")
    ax.text(0, -1, f"{board['title']} (Grafana dashboard; variables: "
            + ", ".join(v["name"] for v in board.get("templating", {}).get("list", [])) + ")",
            fontsize=13, weight="bold", va="center")
    for p in panels:
        g = p["gridPos"]
        ax.add_patch(FancyBboxPatch((g["x"] + 0.15, g["y"] + 0.15), g["w"] - 0.3, g["h"] - 0.3,
                                    boxstyle="round,pad=0,rounding_size=0.3", fc="#f4f6fa", ec="#9aa4b2"))
        ax.text(g["x"] + 0.5, g["y"] + 0.9, p["title"], fontsize=11, weight="bold", va="center")
        exprs = [t.get("expr", "") for t in p.get("targets", [])]
        metrics = sorted({m for e in exprs for m in re.findall(r"caffeserve_[a-z_]+", e)})
        ax.text(g["x"] + 0.5, g["y"] + 1.8, f"{p['type']}\n" + "\n".join(metrics), fontsize=8, va="top",
                family="monospace", color="#44505f")
    fig.savefig(OUT, dpi=90, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
