"""The one component a pneumoseg federated job asks a site's FLARE client to build.

A FLARE job names the classes each site instantiates, with their arguments, in ``config_fed_client.json``. FLARE's
generic :class:`ClientAPIExecutor` takes the command line of the trainer to launch from that file, so a job
that may use it can run any program at the site. :class:`BundleClientExecutor` takes only the job's values
(numbers, the registry network's arguments), checks them against
:data:`~pneumoseg.federated.values.JOB_SCHEMA` before anything is launched, and always launches the same
trainer: ``python -m pneumoseg.federated.client`` of this site's installed pneumoseg, with this site's Python.

A site allows exactly this class (``class_allow_list`` in its ``local/resources.json``) and keeps the ``byoc``
right off in ``local/authorization.json``; then a job can make it run nothing but its installed pneumoseg and
nvflare (see ``docs/federated.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.client.config import ExchangeFormat, TransferType

from pneumoseg.federated.values import JobValues

__all__ = ["CLIENT_MODULE", "BundleClientExecutor", "trainer_command"]

CLIENT_MODULE = "pneumoseg.federated.client"
LAUNCH_TIMEOUT = 600.0
"""Seconds the trainer may take to import torch and MONAI, read its data list and connect."""


def trainer_command(values: JobValues) -> list[str]:
    """The trainer's command line: this interpreter, the installed client module, the validated values."""
    return [sys.executable, "-u", "-m", CLIENT_MODULE, "--values", values.to_json()]


class BundleClientExecutor(ClientAPIExecutor):
    """FLARE Client API executor that trains and evaluates the installed bundle with the job's values.

    Args: the fields of :class:`~pneumoseg.federated.values.JobValues` (anything else is refused when the
    site builds the component).
    """

    def __init__(
        self,
        rounds: int,
        local_epochs: int,
        learning_rate: float,
        image_size: int,
        warmup_epochs: int = 1,
        operating_threshold: float = 0.5,
        seed: int = 0,
        network: Mapping[str, Any] | None = None,
    ) -> None:
        values = JobValues(
            rounds=rounds,
            local_epochs=local_epochs,
            learning_rate=learning_rate,
            image_size=image_size,
            warmup_epochs=warmup_epochs,
            operating_threshold=operating_threshold,
            seed=seed,
            network=dict(network or {}),
        )
        super().__init__(
            execution_mode=ExecutionMode.EXTERNAL_PROCESS,
            command=trainer_command(values),
            launch_once=True,
            launch_timeout=LAUNCH_TIMEOUT,
            params_exchange_format=ExchangeFormat.PYTORCH,
            server_expected_format=ExchangeFormat.NUMPY,
            params_transfer_type=TransferType.FULL,
        )
        self.values = values
