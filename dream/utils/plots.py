"""Loss curves as PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def plot_loss_curves(history: Sequence[dict], path: os.PathLike, keys=("loss", "diff_loss", "clip_loss"),
                     title: str = "DREAM training") -> Optional[Path]:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        vals = [h.get(k, float("nan")) for h in history]
        ax.plot(steps, vals)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))   # long runs: no colliding labels
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(curves: dict, path: os.PathLike, xlabel: str = "step", title: str = "",
                x: Optional[Sequence] = None, errors: Optional[dict] = None) -> Path:
    """One axis, one line per ``{name: values}`` (optional ``errors``: ``{name: standard errors}`` as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, vals in curves.items():
        xs = list(x) if x is not None else list(range(len(vals)))
        if errors and name in errors:
            ax.errorbar(xs, vals, yerr=errors[name], marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, vals, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
