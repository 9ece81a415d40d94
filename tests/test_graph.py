"""The graph view: indexes, mutations, and a valid model with fresh shapes on the way out."""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
from onnx import helper

from conftest import make_model
from hwcompress.model.graph import Graph


def _chain(rng):
    inits = {"w": rng.normal(0, 1, (8, 4, 3, 3))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "c"], ["y"], name="add")]
    return make_model(nodes, [("x", [1, 4, 6, 6])], [("y", [1, 8, 6, 6])], inits)


def test_producers_consumers_and_networkx(rng):
    g = Graph(_chain(rng))
    assert g.producer("c").name == "conv"
    assert {n.name for n in g.consumers("c")} == {"relu", "add"}
    assert g.sole_consumer("c") is None and g.sole_consumer("r").name == "add"
    assert g.sole_consumer("y") is None, "a graph output has a reader outside the graph"
    assert g.initializer("w").shape == (8, 4, 3, 3) and g.is_constant("w")
    dag = g.to_networkx()
    assert set(dag.edges) == {("conv", "relu"), ("conv", "add"), ("relu", "add")}
    assert nx.is_directed_acyclic_graph(dag)
    assert g.shape("c") == (1, 8, 6, 6)


def test_nodes_added_out_of_order_are_sorted_and_shapes_recomputed(rng):
    model = _chain(rng)
    g = Graph(model)
    # Halve the conv's output channels and append a node whose producer comes later in the list.
    g.set_initializer("w", g.initializer("w")[:4])
    g.forget_shapes(["c", "r", "y"])
    g.nodes.insert(0, g.make_node("Neg", ["r"], ["n"]))
    g.outputs[0].name = "y"
    out = g.to_model()
    onnx.checker.check_model(out, full_check=True)
    order = [n.op_type for n in out.graph.node]
    assert order.index("Neg") > order.index("Relu")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert shapes["c"] == [1, 4, 6, 6], "value_info must describe the tensor as it is now"
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 6, 6]


def test_replace_node_and_unused_initializers_dropped(rng):
    model = _chain(rng)
    g = Graph(model)
    relu = g.node("relu")
    g.replace_node(relu, [g.make_node("Clip", ["c"], ["r"], name="relu")])
    g.add_initializer("unused", np.zeros(3, np.float32))
    out = g.to_model()
    assert [n.op_type for n in out.graph.node] == ["Conv", "Clip", "Add"]
    assert {t.name for t in out.graph.initializer} == {"w"}
    from hwcompress.model import reference as ort

    feeds = ort.random_inputs(model)
    (clip_out,) = ort.run(out, feeds)
    (relu_out,) = ort.run(model, feeds)
    assert not np.allclose(clip_out, relu_out), "an unbounded Clip is the identity: outputs must differ"


def test_bypass_keeps_graph_output_names(rng):
    inits = {"w": rng.normal(0, 1, (2, 2, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Identity", ["c"], ["y"])]
    g = Graph(make_model(nodes, [("x", [1, 2, 3, 3])], [("y", [1, 2, 3, 3])], inits))
    assert g.bypass(g.nodes[1])
    out = g.to_model()
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].output[0] == "y"


def test_constant_nodes_become_initializers_and_names_are_unique(rng):
    nodes = [helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones(3, np.float32))),
             helper.make_node("Add", ["x", "k"], ["a"], name="same"),
             helper.make_node("Mul", ["a", "k"], ["y"], name="same")]
    model = make_model(nodes, [("x", [3])], [("y", [3])], {})
    g = Graph(model)
    assert g.is_constant("k") and len(g.nodes) == 2
    assert len({n.name for n in g.nodes}) == 2
    assert g.unique_name("k") != "k"
    from hwcompress.model import reference as ort

    x = np.arange(3, dtype=np.float32)
    (y,) = ort.run(g.to_model(), {"x": x})  # ORT refuses the original: two nodes named "same"
    np.testing.assert_array_equal(y, x + 1)
