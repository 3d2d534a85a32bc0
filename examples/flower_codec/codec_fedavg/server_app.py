"""The ServerApp: Flower's stock FedAvg over the decoded client weights.

The strategy sees plain tensors because its Grid is wrapped in `PayloadGrid`, which encodes what
goes down to the nodes and decodes what comes back (the nodes' ClientApp does the same with
`payload_mod`), so only fibec codec payloads, as uint8 arrays, cross the network.

Run it like the fibec app in the README ("Running on Flower"): a SuperLink, one SuperNode per
node with --node-config "partition-id=P num-partitions=N", then, from the repository root,

    flwr run examples/flower_codec local --stream --run-config 'num-server-rounds=3 values="fp16"'
"""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from codec_fedavg.payload import PayloadGrid
from codec_fedavg.task import make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> Result:
    config = context.run_config
    nodes = int(config["min-nodes"])  # FedAvg waits for this many and trains on all that are there
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    return strategy.start(grid=PayloadGrid(grid, values=str(config["values"])),
                          initial_arrays=ArrayRecord(make_model().state_dict()),
                          num_rounds=int(config["num-server-rounds"]),
                          train_config=ConfigRecord({"lr": float(config["lr"])}))
