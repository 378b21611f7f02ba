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
    headline["comm_bytes_per_step_counts"] = COMM_BYTES_COUNT
    if "soap" in runs and "adamw" in runs:
        soap = next(r for r in results if r.name == "soap")
        target = runs["adamw"]["final_val_loss"]
        reached = steps_to_reach(soap, target)
        headline["soap_steps_to_adamw_final_val_loss"] = reached
        headline["soap_step_fraction_to_adamw_final_val_loss"] = (
            None if reached is None else round(reached / len(soap.train_loss), 3)
        )
        headline["verdict"] = verdict(reached, len(soap.train_loss), target)
    return {"headline": headline, "runs": runs, "settings": settings}


COMM_BYTES_COUNT = (
    "bytes distsoap itself sent per step from this rank (SOAP's gradient / update exchanges); "
    "the framework's own traffic (DDP's all-reduce, FSDP's all-gathers), which both optimizers "
    "share, is not counted, so AdamW shows none"
)


def verdict(reached: int | None, steps: int, target: float) -> str:
    """One plain sentence: whether and when SOAP reached AdamW's final validation loss."""
    if reached is None:
        return (
            f"SOAP did not reach AdamW's final validation loss ({target:.3f}) within {steps} "
            "steps; SOAP's advantage needs a few hundred steps at these settings."
        )
    return (
        f"SOAP reached AdamW's final validation loss {target:.3f} at step {reached} of {steps} "
        f"({100 * reached / steps:.0f}% of the steps)."
    )


def plot_losses(results: list[RunResult], path: Path, setup: str = "") -> None:
    """Train (smoothed) and validation loss against step, one colour per optimizer.

    A dashed line marks AdamW's final validation loss, and a star the evaluation where SOAP
    first reaches it. ``setup`` (e.g. ``"ddp, 2 ranks"``) goes into the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    top = 0.0
    for r, colour in zip(results, ("tab:red", "tab:blue", "tab:green")):
        smooth, ema = [], r.train_loss[0]
        for loss in r.train_loss:
            ema = 0.9 * ema + 0.1 * loss
            smooth.append(ema)
        # the view starts a tenth into the run: the first steps' loss would flatten the rest
        top = max(top, smooth[len(smooth) // 10], *r.val_loss)
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
    by_name = {r.name: r for r in results}
    if "soap" in by_name and "adamw" in by_name:
        target = by_name["adamw"].val_loss[-1]
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="AdamW final val")
        reached = steps_to_reach(by_name["soap"], target)
        if reached is not None:
            soap = by_name["soap"]
            loss = soap.val_loss[soap.eval_steps.index(reached)]
            ax.plot([reached], [loss], "*", color="black", markersize=12, zorder=5,
                    label=f"SOAP reaches it (step {reached})")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_ylim(top=top + 0.05 * max(top - ax.get_ylim()[0], 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    title = "distsoap demo: byte-level GPT on Python stdlib sources"
    ax.set_title(f"{title}\n{setup}" if setup else title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
