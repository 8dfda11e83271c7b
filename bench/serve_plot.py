"""The plot of a live serving run: each request's TTFT against the time it was sent, by instance.

Through a rack's router every answer names its instance (``x-rsd-instance``), so the plot shows
where the router sent each request and when, including requests that failed (drawn as crosses
at the bottom), e.g. while a card of one instance was killed and restarted.
"""
from __future__ import annotations

from bench.common import pyplot
from bench.serve_metrics import RequestResult


def plot_live(path: str, results: list[RequestResult], title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    names = sorted({r.instance or "server" for r in results})
    floor = min((r.ttft_s for r in results if r.ok), default=1e-3) * 1e3 / 2
    for n, name in enumerate(names):
        ok = [r for r in results if r.ok and (r.instance or "server") == name]
        bad = [r for r in results if not r.ok and (r.instance or "server") == name]
        ax.scatter([r.sent_s for r in ok], [r.ttft_s * 1e3 for r in ok], s=12, color=f"C{n}",
                   label=f"{name}: {len(ok)} served")
        if bad:
            ax.scatter([r.sent_s for r in bad], [floor] * len(bad), marker="x", s=30, color=f"C{n}",
                       label=f"{name}: {len(bad)} failed")
    ax.set(xlabel="sent at (s, wall clock)", ylabel="TTFT (ms, wall clock)", yscale="log",
           title=f"live: {title}")
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
