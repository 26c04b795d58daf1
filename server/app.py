"""The Flower ServerApp: read the run config, hand the Grid to ``run_federation``.

``edgetune.server.app:app`` reads Flower's flat run-config (``flwr run``, Deployment Engine);
:func:`server_app_for` binds a config directly, for ``run_simulation``, which does not pass
``[tool.flwr.app.config]`` on.
"""

from __future__ import annotations

import os
import sys
import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import RunNotRunningException

from edgetune.config import RunConfig, from_flat
from edgetune.processes import EXIT_INTERRUPTED
from edgetune.server.federation import run_federation

__all__ = ["app", "server_app_for"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, from_flat(dict(context.run_config)))
    except (KeyboardInterrupt, SystemExit, RunNotRunningException):
        # The run was stopped (`edgetune run` got Ctrl-C) or this process was (`edgetune
        # server` did): the run folder now says "interrupted", and Flower's signal handler
        # has already reported to the SuperLink. Skip this process's finalisation (seconds
        # for torch's objects on a loaded machine) so the server stops within its grace.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def server_app_for(cfg: RunConfig, stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that runs ``cfg`` in simulation, whatever run-config Flower passes;
    setting ``stop`` ends the run early with status ``interrupted``."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, simulated=True, stop=stop)

    return bound
