"""Demo settings small enough for tests (one tiny layer, a 200 kB corpus, no progress bar)."""


def tiny_demo_args(steps: int, eval_every: int) -> list[str]:
    """Command-line arguments of a demo run of ``steps`` steps, evaluated every ``eval_every``."""
    return [
        *("--steps", str(steps), "--eval-every", str(eval_every)),
        *("--layers", "1", "--d-model", "32", "--heads", "2", "--context", "32"),
        *("--batch-size", "4", "--corpus-bytes", "200000", "--no-progress"),
    ]
