"""The report's figures: perturbation curves, the SLIC-weight grid, filter removal, a gallery."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves_png(path: Path, curves: dict[str, np.ndarray], title: str, xlabel: str, ylabel: str) -> None:
    """One line per method: the mean curve over samples, x from 0 to 1."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, values in curves.items():
        axis.plot(np.linspace(0, 1, len(values)), values, label=label, linewidth=1.4)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def grid_png(path: Path, wc_values, wg_values, auc: np.ndarray, winner: tuple[float, float]) -> None:
    """Heatmap of mean deletion AUC over (wc, wg), the winner outlined."""
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(auc, origin="lower", cmap="viridis_r")
    axis.set_xticks(range(len(wg_values)), [f"{v:g}" for v in wg_values])
    axis.set_yticks(range(len(wc_values)), [f"{v:g}" for v in wc_values])
    axis.set(xlabel="wg (gradient weight)", ylabel="wc (colour weight)", title="SWAG_I+G deletion AUC (lower is better)")
    for i in range(len(wc_values)):
        for j in range(len(wg_values)):
            axis.text(j, i, f"{auc[i, j]:.3f}", ha="center", va="center", fontsize=5.5, color="white")
    i, j = list(wc_values).index(winner[0]), list(wg_values).index(winner[1])
    axis.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def gallery_png(path: Path, images: np.ndarray, maps: dict[str, np.ndarray], captions: list[str]) -> None:
    """Rows of samples: the input, then each method's map over a faded input."""
    columns = ["input", *maps]
    figure, axes = plt.subplots(len(images), len(columns), figsize=(1.6 * len(columns), 1.6 * len(images)))
    axes = np.atleast_2d(axes)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(captions[row], fontsize=6)
        for col, label in enumerate(maps, start=1):
            heat = maps[label][row]
            span = float(heat.max() - heat.min())
            heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
            axes[row, col].imshow(image, alpha=0.35)
            axes[row, col].imshow(heat, cmap="jet", alpha=0.6)
        for col, label in enumerate(columns):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(label, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
