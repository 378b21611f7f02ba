"""The demo's outputs: a loss-curve PNG and a JSON summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distsoap.demo.train import RunResult, steps_to_reach


def summarize(results: list[RunResult], settings: dict[str, Any]) -> dict[str, Any]:
    """Final losses, timings, and the step at which SOAP first reaches AdamW's final loss."""
    runs = {}
    for r in results:
        runs[r.name] = {
            "final_train_loss": sum(r.train_loss[-10:]) / len(r.train_loss[-10:]),
            "final_val_loss": r.val_loss[-1],
            "wall_seconds": round(r.wall_seconds, 2),
            "optimizer_seconds": round(r.optimizer_seconds, 2),
            "optimizer_time_share": round(r.optimizer_seconds / r.wall_seconds, 4),
            "comm_bytes_per_step": r.comm_bytes_per_step,
            "eval_steps": r.eval_steps,
            "val_loss": r.val_loss,
            "train_loss": r.train_loss,
        }
    headline: dict[str, Any] = {
        name: {k: v for k, v in run.items() if k not in ("eval_steps", "val_loss", "train_loss")}
        for name, run in runs.items()
    }
    if "soap" in runs and "adamw" in runs:
        soap = next(r for r in results if r.name == "soap")
        target = runs["adamw"]["final_val_loss"]
        reached = steps_to_reach(soap, target)
        headline["soap_steps_to_adamw_final_val_loss"] = reached
        headline["soap_step_fraction_to_adamw_final_val_loss"] = (
            None if reached is None else round(reached / len(soap.train_loss), 3)
        )
    return {"headline": headline, "runs": runs, "settings": settings}


def plot_losses(results: list[RunResult], path: Path) -> None:
    """Train (smoothed) and validation loss against step, one colour per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r, colour in zip(results, ("tab:red", "tab:blue", "tab:green")):
        smooth, ema = [], r.train_loss[0]
        for loss in r.train_loss:
            ema = 0.9 * ema + 0.1 * loss
            smooth.append(ema)
        ax.plot(
            range(1, len(smooth) + 1),
            smooth,
            color=colour,
            alpha=0.4,
            label=f"{r.name} train (EMA)",
        )
        ax.plot(
            r.eval_steps, r.val_loss, "o-", color=colour, markersize=3, label=f"{r.name} validation"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("distsoap demo: byte-level GPT on Python stdlib sources")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
