"""Discovery: which modules are the blocks, through wrappers, with clear refusals."""

import pytest
import torch
from models import Block, IndexLoopModel, TimmShapedViT, TinyTransformer, torch_encoder_classifier
from torch import nn

from rapt_reg import BlockDiscoveryError, RaptRegError, find_transformer_blocks
from rapt_reg.discovery import find_block_stacks, unwrap_model

MODELS = {
    "for-loop": (lambda: TinyTransformer(depth=4), "layers", 4),
    "index-loop": (lambda: IndexLoopModel(depth=3), "layers", 3),
    "timm-sequential": (lambda: TimmShapedViT(depth=5), "blocks", 5),
    "torch-encoder": (lambda: torch_encoder_classifier(depth=2), "encoder.layers", 2),
}


@pytest.mark.promise("discovery")
@pytest.mark.parametrize(("make", "path", "depth"), MODELS.values(), ids=MODELS.keys())
def test_finds_the_stack_in_call_order(make, path, depth):
    model = make()
    stack = find_transformer_blocks(model)
    assert stack.path == path
    assert len(stack) == stack.calls_per_forward == depth
    assert list(stack.blocks) == list(model.get_submodule(path))
    assert stack.names == tuple(f"{path}.{i}" for i in range(depth))


@pytest.mark.promise("layout-detection")
def test_sequence_first_layout_sets_batch_dim():
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=False)
    assert (
        find_transformer_blocks(
            nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        ).batch_dim
        == 1
    )


@pytest.mark.promise("wrappers-seen-through")
@pytest.mark.parametrize(
    "wrap",
    [
        nn.DataParallel,
        pytest.param(torch.compile, marks=pytest.mark.slow_for_mutation),
        pytest.param(
            lambda m: nn.DataParallel(torch.compile(m)), marks=pytest.mark.slow_for_mutation
        ),
    ],
    ids=["data-parallel", "compiled", "both"],
)
def test_sees_through_wrappers(wrap):
    model = TinyTransformer(depth=2)
    wrapped = wrap(model)
    assert unwrap_model(wrapped) is model
    assert find_transformer_blocks(wrapped).path == "layers"


class NestedStacks(nn.Module):
    """An outer stack whose members hold an inner same-class attention list (ALBERT's shape)."""

    def __init__(self) -> None:
        super().__init__()

        class Group(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = nn.ModuleList([Block(8, 2), Block(8, 2)])

        self.groups = nn.ModuleList([Group()])


@pytest.mark.promise("discovery")
def test_outermost_stack_wins_over_nested_lists():
    assert find_transformer_blocks(NestedStacks()).path == "groups"


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([Block(8, 2) for _ in range(3)])
        self.decoder = nn.Module()
        self.decoder.block = nn.ModuleList([Block(8, 2) for _ in range(2)])


@pytest.mark.promise("discovery")
def test_prefers_the_encoder_and_can_pick_another():
    model = EncoderDecoder()
    assert find_transformer_blocks(model).path == "encoder.block"
    assert find_transformer_blocks(model, prefer="decoder").path == "decoder.block"
    with pytest.raises(BlockDiscoveryError, match="several stacks.*blocks="):
        find_transformer_blocks(model, prefer=None)
    assert [s.path for s in find_block_stacks(model, prefer=None)] == [
        "encoder.block",
        "decoder.block",
    ]


@pytest.mark.promise("discovery-refusal")
def test_blocks_override_by_path_or_modules():
    model = TinyTransformer(depth=4)
    assert find_transformer_blocks(model, blocks="layers").blocks == tuple(model.layers)
    two = [model.layers[1], model.layers[3]]
    stack = find_transformer_blocks(model, blocks=two)
    assert stack.blocks == tuple(two) and stack.names == ("layers.1", "layers.3")
    assert find_transformer_blocks(model, blocks=["layers.0"]).blocks == (model.layers[0],)


@pytest.mark.promise("discovery-refusal")
@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("encoder.layer", "not a submodule"),
        ([nn.Linear(2, 2)], "not a submodule"),
        ([], "is empty"),
        (nn.Linear(2, 2), "single module"),
    ],
    ids=["bad-path", "foreign-module", "empty", "bare-module"],
)
def test_bad_blocks_argument_is_refused(blocks, message):
    with pytest.raises(BlockDiscoveryError, match=message):
        find_transformer_blocks(TinyTransformer(depth=2), blocks=blocks)


@pytest.mark.promise("discovery-refusal")
def test_nothing_found_lists_containers_and_names_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(BlockDiscoveryError, match=r"Sequential of 3.*blocks=") as info:
        find_transformer_blocks(model)
    assert isinstance(info.value, RaptRegError) and isinstance(info.value, ValueError)


def test_discovery_finds_48_blocks():
    # How long it takes is measured in benchmarks/test_bench_discovery.py, not judged here.
    stack = find_transformer_blocks(TinyTransformer(depth=48, dim=8))
    assert len(stack) == 48 and stack.path == "layers"
