"""torchtitan: ``optimizer_name="SOAP"`` in its optimizer config, and a config to run with it.

torchtitan (0.3) builds optimizers in ``OptimizersContainer`` from param-group configs::

    import distsoap.integrations.torchtitan  # registers "SOAP"

    OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="SOAP", optimizer_kwargs={"lr": 3e-3}),
        ],
        optimizer_factory_kwargs_by_name={"SOAP": {"refresh_schedule": "staggered"}},
    )

Its factory lookup knows Adam, AdamW and DistMuon only; importing this module adds SOAP to it
(idempotent), so no subclass of the container is needed. ``optimizer_kwargs`` become SOAP's
param-group hyperparameters; ``optimizer_factory_kwargs_by_name["SOAP"]`` its keyword-only
options (``strategy``, ``moment_dtype``, ``refresh_schedule``, ...). The ``fused`` /
``foreach`` keys torchtitan adds to every group describe AdamW's kernels and are dropped (SOAP's
choice is ``elementwise=``).

torchtitan builds one optimizer per model part (pipeline stage); each SOAP then works over its
part's mesh (see the README, "torchtitan and tensor parallelism"). Its checkpoints go through
the container's FQN-keyed ``state_dict()``, whose ``init_optim_state`` zero-gradient step leaves
SOAP unchanged (an all-zero first gradient is discarded).

With torchtitan's command line, ``--module distsoap.integrations.torchtitan --config
llama3_debugmodel_soap`` imports this module (registering SOAP) and takes the config below.
"""

from __future__ import annotations

from typing import Any

from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from distsoap.optimizer import SOAP

__all__ = ["build_soap", "default_soap", "llama3_debugmodel_soap", "register"]

ADAMW_IMPLEMENTATION_KEYS = ("fused", "foreach")
"""Keys torchtitan puts in every param group for torch's AdamW kernels; not SOAP's."""


def build_soap(param_groups: list[dict[str, Any]], **options: Any) -> SOAP:
    """SOAP from torchtitan's param groups (its factory signature).

    Args:
        param_groups: torchtitan's groups: ``params``, ``param_names`` and the group's
            ``optimizer_kwargs``.
        **options: ``optimizer_factory_kwargs_by_name["SOAP"]``: SOAP's keyword-only options.
    """
    groups = [
        {k: v for k, v in group.items() if k not in ADAMW_IMPLEMENTATION_KEYS}
        for group in param_groups
    ]
    return SOAP(groups, **options)


_ORIGINAL_FACTORY = OptimizersContainer.__dict__["_resolve_optimizer_factory"]


def _resolve_with_soap(name: str):
    if name == "SOAP":
        return build_soap
    return _ORIGINAL_FACTORY.__func__(name)


def register() -> None:
    """Make ``optimizer_name="SOAP"`` resolve to :func:`build_soap` (done on import)."""
    OptimizersContainer._resolve_optimizer_factory = staticmethod(_resolve_with_soap)


def default_soap(lr: float = 3e-3, **kwargs: Any) -> OptimizersContainer.Config:
    """An ``OptimizersContainer.Config`` with one catch-all SOAP group.

    torchtitan's ``default_adamw``, for SOAP.

    Args:
        lr: learning rate.
        **kwargs: further param-group hyperparameters (``betas``, ``weight_decay``,
            ``precondition_frequency``, ...).
    """
    return OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name="SOAP",
                optimizer_kwargs={
                    "lr": lr,
                    "betas": (0.95, 0.95),
                    "weight_decay": 0.1,
                    "precondition_frequency": 10,
                    **kwargs,
                },
            )
        ]
    )


def llama3_debugmodel_soap():
    """The llama3 debug-model config of torchtitan, with SOAP in place of AdamW.

    For ``--module distsoap.integrations.torchtitan --config llama3_debugmodel_soap``. Imported
    when called: torchtitan's config registry imports its trainer, data and logging modules,
    which need torchtitan's full requirements (datasets, torchdata, tensorboard); this module's
    other functions need none of them.

    Raises:
        ImportError: naming what is missing, when torchtitan is installed without them.
    """
    try:
        from torchtitan.models.llama3.config_registry import llama3_debugmodel
    except ImportError as error:
        raise ImportError(
            f"llama3_debugmodel_soap needs torchtitan's llama3 config registry, which imports "
            f"torchtitan's data and logging requirements (datasets, torchdata, tensorboard): "
            f"{error}. Install torchtitan with its dependencies (pip install "
            f"'distsoap[torchtitan]')."
        ) from error

    config = llama3_debugmodel()
    config.optimizer = default_soap(lr=3e-3)
    return config


register()
