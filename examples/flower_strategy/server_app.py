"""A ServerApp of your own around fibec's FibecFedStrategy, with Flower's stock Strategy.start.

The strategy builds the server side of the run from the run config alone (`from_config`: data,
model, records and checkpoints under `out`, resume) and only configures and reads messages;
Flower's `Strategy.start` sends them over whatever Grid it is given. The nodes run fibec's
ClientApp. Each FibecFed round's record comes back in Flower's Result, as the metrics of the step
(train or evaluate) of the Flower round that ended it; `main` logs the global accuracy of each.

To run it on a SuperLink, copy examples/flower/pyproject.toml next to this file and set

    serverapp = "server_app:app"

under [tool.flwr.app.components], then `flwr run . local --stream` as in the README.
"""
from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fibec.federated.flower import FibecFedStrategy, fed_config

app = ServerApp()
log = logging.getLogger(__name__)


@app.main()
def main(grid: Grid, context: Context) -> Result:
    strategy = FibecFedStrategy.from_config(fed_config(context.run_config))
    try:
        result = strategy.start(grid, strategy.global_arrays(), num_rounds=strategy.flower_rounds(),
                                timeout=strategy.timeout)
    finally:
        strategy.close()
    records = [*result.train_metrics_clientapp.values(), *result.evaluate_metrics_clientapp.values()]
    for record in sorted((r for r in records if "global_accuracy" in r), key=lambda r: r["round"]):
        log.info("round %d: global accuracy %.3f", record["round"], record["global_accuracy"])
    return result
