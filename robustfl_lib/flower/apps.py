"""The ServerApp and ClientApp that ``flwr run`` starts on a real federation.

A Flower App's ``pyproject.toml`` names them as its components::

    [tool.flwr.app.components]
    serverapp = "robustfl_lib.flower.apps:server_app"
    clientapp = "robustfl_lib.flower.apps:client_app"

Both read the run's :class:`~robustfl_lib.FLConfig` from the run config
(``[tool.flwr.app.config]``, see :mod:`robustfl_lib.flower.config`); each SuperNode
names its own data with ``--node-config "partition-id=3"`` (and, to play an attacker in
a test federation, ``byzantine=true``). Byzantine nodes attack with local knowledge:
on real devices there is no server-side collusion. Chapter
``14_scaling_out_with_flower``.
"""

from __future__ import annotations

from .client import make_client_app
from .simulation import make_server_app

__all__ = ["server_app", "client_app"]

#: The ServerApp: RobustStrategy with the run config's aggregator, sample counts ignored,
#: Flower's own node sampling (devices come and go; there is no fixed partition map).
server_app = make_server_app(collude=False, same_participants=False)
#: The ClientApp: honest unless its node config says ``byzantine=true`` (then a local-knowledge attacker).
client_app = make_client_app(knowledge="local", byzantine_by_config=False)
