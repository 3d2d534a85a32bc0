"""The ClientApp: trains the received model on its node's data and replies with the new weights.

Nothing here knows about the codec: `payload_mod` decodes the incoming payload and encodes the reply.
"""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from codec_fedavg.payload import payload_mod
from codec_fedavg.task import make_model, node_data, train

app = ClientApp(mods=[payload_mod])


@app.train()
def train_on_node(message: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    x, y = node_data(int(context.node_config["partition-id"]))
    loss = train(model, x, y, steps=int(context.run_config["local-steps"]),
                 lr=float(message.content["config"]["lr"]))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train-loss": loss, "num-examples": len(x)})})
    return Message(content=content, reply_to=message)
