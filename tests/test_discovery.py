"""Discovery: which modules are the blocks, through wrappers, with clear refusals."""

from types import SimpleNamespace

import pytest
import torch
from hf_models import VLM_CASES, VLM_DEPTH
from models import (
    Attention,
    Block,
    IndexLoopModel,
    TimmShapedViT,
    TinyTransformer,
    torch_encoder_classifier,
)
from torch import nn

import rapt_reg
from rapt_reg import (
    BlockDiscoveryError,
    RandomPerturbationRegularizer,
    RaptRegError,
    find_transformer_blocks,
)
from rapt_reg.discovery import (
    find_block_stacks,
    multimodal_text_decoder,
    text_decoder_stack,
    unwrap_model,
)

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
    assert len(stack) == depth and stack.calls_per_forward is None  # counted on a forward
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


@pytest.mark.parametrize(("batch_first", "batch_dim"), [(False, 1), (True, 0)])
def test_batch_first_sets_batch_dim_however_the_blocks_are_named(batch_first, batch_dim):
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    assert find_transformer_blocks(encoder).batch_dim == batch_dim
    # by hand: a path to the stack, to one block, or a list whose first block says
    assert find_transformer_blocks(encoder, blocks="layers").batch_dim == batch_dim
    assert find_transformer_blocks(encoder, blocks="layers.1").batch_dim == batch_dim
    listed = [encoder.layers[1], encoder.layers[0]]
    assert find_transformer_blocks(encoder, blocks=listed).batch_dim == batch_dim


def test_blocks_without_batch_first_leave_batch_dim_unknown():
    assert find_transformer_blocks(TinyTransformer(depth=2)).batch_dim is None


def test_with_batch_dim_sets_only_batch_dim():
    stack = find_transformer_blocks(TinyTransformer(depth=2))
    chosen = stack.with_batch_dim(1)
    assert chosen.batch_dim == 1 and stack.batch_dim is None
    assert (chosen.path, chosen.names, chosen.blocks, chosen.calls_per_forward) == (
        stack.path,
        stack.names,
        stack.blocks,
        stack.calls_per_forward,
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


FIX_BY_PATH = "pass modules of the model itself (or dotted paths)"
FOREIGN = nn.Linear(2, 2)


def _missing(model: nn.Module, path: str) -> str:
    with pytest.raises(AttributeError) as info:  # torch's own words, quoted after ours
        model.get_submodule(path)
    return f"blocks={path!r} is not a submodule of TinyTransformer: {info.value}"


@pytest.mark.promise("discovery-refusal")
@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("encoder.layer", lambda m: _missing(m, "encoder.layer")),
        (["layers.0", "layers.9"], lambda m: _missing(m, "layers.9")),
        (
            [FOREIGN],
            lambda m: (
                f"blocks= entry {FOREIGN!r} is not a submodule of TinyTransformer: {FIX_BY_PATH}"
            ),
        ),
        ([3], lambda m: f"blocks= entry 3 is not a submodule of TinyTransformer: {FIX_BY_PATH}"),
        ([], lambda m: "blocks= is empty: pass a dotted path or a list of modules"),
        ("extra", lambda m: "blocks='extra' is an empty container"),
        (
            FOREIGN,
            lambda m: (
                "blocks= got a single module: pass its dotted path, or a list of the block modules"
            ),
        ),
    ],
    ids=[
        "bad-path",
        "bad-path-in-list",
        "foreign-module",
        "not-a-module",
        "empty",
        "empty-container",
        "bare-module",
    ],
)
def test_bad_blocks_argument_is_refused(blocks, message):
    model = TinyTransformer(depth=2)
    model.extra = nn.ModuleList()
    with pytest.raises(BlockDiscoveryError) as info:
        find_transformer_blocks(model, blocks=blocks)
    assert str(info.value) == message(model)


class NoBlocks(nn.Module):
    """Containers of every kind, none of same-class modules with attention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2)})
        self.unused = nn.ModuleList()  # empty: not listed
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(2))


NOTHING_FOUND = (
    "no transformer blocks found in {}: looked for a ModuleList, Sequential or ModuleDict of "
    "same-class modules containing attention among {}. Pass blocks='dotted.path' (or a list of "
    "modules) to say which modules are the blocks."
)


NOTHING_FOUND = (
    "no transformer blocks found in {}: looked for a ModuleList, Sequential or ModuleDict of "
    "same-class modules containing attention among {}. Pass blocks='dotted.path' (or a list of "
    "modules) to say which modules are the blocks."
)
NOTHING_FOUND_CASES = {
    "containers": (
        NoBlocks,
        "NoBlocks",
        "5 containers: stem (Sequential of 3: Linear, ReLU); heads (ModuleDict of 1: Linear); "
        "mlps (ModuleList of 2: Sequential); mlps.0 (Sequential of 2: GELU, Linear); "
        "mlps.1 (Sequential of 2: GELU, Linear)",
    ),
    "root": (
        lambda: nn.DataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))),
        "Sequential",
        "1 containers: <root> (Sequential of 3: Linear, ReLU)",
    ),
    "none": (lambda: nn.Linear(4, 2), "Linear", "0 containers: none"),
}


@pytest.mark.promise("discovery-refusal")
@pytest.mark.parametrize("case", NOTHING_FOUND_CASES)
def test_nothing_found_lists_containers_and_names_blocks(case):
    make, name, seen = NOTHING_FOUND_CASES[case]
    with pytest.raises(BlockDiscoveryError) as info:
        find_transformer_blocks(make())
    assert str(info.value) == NOTHING_FOUND.format(name, seen)
    assert isinstance(info.value, RaptRegError) and isinstance(info.value, ValueError)


def test_ambiguity_lists_every_stack_with_its_size():
    with pytest.raises(BlockDiscoveryError) as info:
        find_transformer_blocks(EncoderDecoder(), prefer=None)
    assert str(info.value) == (
        "several stacks could be the transformer blocks: 'encoder.block' (3 blocks), "
        "'decoder.block' (2 blocks). Pass blocks='<path>' to choose one "
        "(or prefer='<part of the path>')."
    )


class SharedLayers(nn.Module):
    """ALBERT's shape: ``calls`` block calls from fewer block modules, looped, and a config
    whose ``num_hidden_layers`` may say anything."""

    def __init__(self, count: object, modules: int, calls: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=count)
        self.layers = nn.ModuleList(Block(8, 2) for _ in range(modules))
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.calls):
            x = self.layers[i % len(self.layers)](x)
        return x.mean(1)


@pytest.mark.promise("calls-observed")
@pytest.mark.parametrize(
    ("count", "modules", "calls"),
    [
        (6, 1, 6),  # one shared block run 6 times, as the config says
        (6, 2, 6),  # two groups, each run 3 times
        (4, 2, 2),  # the config says more layers than the forward runs
        (1, 2, 4),  # and fewer
        ("6", 2, 3),
        (None, 1, 3),
    ],
)
def test_block_calls_are_counted_on_the_forward_never_read_from_a_config(count, modules, calls):
    """The stack's calls are those the forward made; a max_layer beyond them is refused at
    the first call, whatever the config says."""
    x = torch.randn(2, 3, 8)
    for blocks in (None, "layers"):
        model = SharedLayers(count, modules, calls).train()
        assert find_transformer_blocks(model, blocks=blocks).calls_per_forward is None
        with RandomPerturbationRegularizer(model, max_layer=calls, blocks=blocks) as reg:
            reg.pair(lambda m=model: m(x))
            assert reg.stack.calls_per_forward == calls and reg.stack.blocks == tuple(model.layers)
        beyond = RandomPerturbationRegularizer(
            model, min_layer=1, max_layer=calls + 1, blocks=blocks
        )
        with pytest.raises(RaptRegError, match=f"max_layer={calls + 1} but the forward ran"):
            beyond.pair(lambda m=model: m(x))
        beyond.remove()


def test_a_path_or_list_of_single_blocks_is_a_stack_without_a_path():
    model = TinyTransformer(depth=3)
    stack = find_transformer_blocks(model, blocks="layers.1")
    assert (stack.path, stack.names, stack.blocks) == ("", ("layers.1",), (model.layers[1],))
    stack = find_transformer_blocks(model, blocks=[model.layers[2], "layers.0"])
    assert (stack.path, stack.names) == ("", ("layers.2", "layers.0"))
    assert stack.blocks == (model.layers[2], model.layers[0])
    shared = SharedLayers(None, 1, 6).train()
    with RandomPerturbationRegularizer(shared, max_layer=6, blocks="layers.0") as reg:
        reg.pair(lambda: shared(torch.randn(2, 3, 8)))
        assert (reg.stack.path, reg.stack.names, reg.stack.calls_per_forward) == (
            "",
            ("layers.0",),
            6,
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda blocks: nn.ModuleList(blocks),
        lambda blocks: nn.Sequential(*blocks),
        lambda blocks: nn.ModuleDict({str(i): b for i, b in enumerate(blocks)}),
    ],
    ids=["ModuleList", "Sequential", "ModuleDict"],
)
def test_the_model_itself_can_be_the_stack(make):
    model = make([Block(8, 2) for _ in range(3)])
    stack = find_transformer_blocks(model)
    assert (stack.path, stack.names, stack.blocks) == ("", ("0", "1", "2"), tuple(model.children()))


class Mixer(nn.Module):
    """Token mixing whose class name says nothing about attention."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)


class SelfAttention(Mixer):
    pass


def _block(**children: nn.Module) -> nn.Module:
    block = nn.Module()
    block.norm = nn.LayerNorm(8)
    for name, child in children.items():
        block.add_module(name, child)
    return block


ATTENTION_SEEN = {
    "class-name": lambda: _block(mixer=SelfAttention()),
    "fused-class-name": lambda: _block(mixer=Attention(8, 2)),
    "torch-mha": lambda: _block(mixer=nn.MultiheadAttention(8, 2)),
    "attribute-name": lambda: _block(self_attn=Mixer()),
    "nested-attribute-name": lambda: _block(inner=_block(attention=Mixer())),
}


@pytest.mark.parametrize("make", ATTENTION_SEEN.values(), ids=ATTENTION_SEEN.keys())
def test_attention_is_seen_by_class_or_by_name(make):
    model = nn.Module()
    model.layers = nn.ModuleList(make() for _ in range(2))
    assert find_transformer_blocks(model).blocks == tuple(model.layers)


def test_blocks_without_attention_are_not_a_stack():
    model = nn.Module()
    model.layers = nn.ModuleList(_block(mixer=Mixer()) for _ in range(2))
    with pytest.raises(BlockDiscoveryError, match="no transformer blocks found"):
        find_transformer_blocks(model)


class MixedThenStack(nn.Module):
    """A list of mixed classes (attention first) before the real stack."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.ModuleList([Block(8, 2), nn.Linear(8, 8)])
        self.layers = nn.ModuleList(Block(8, 2) for _ in range(2))


def test_a_list_of_mixed_classes_is_skipped_and_the_search_goes_on():
    model = MixedThenStack()
    assert [s.path for s in find_block_stacks(model, prefer=None)] == ["layers"]


class NestedThenStack(NestedStacks):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.ModuleList(Block(8, 2) for _ in range(2))


def test_stacks_after_a_nested_one_are_still_found():
    assert [s.path for s in find_block_stacks(NestedThenStack(), prefer=None)] == [
        "groups",
        "decoder",
    ]


def test_find_block_stacks_prefers_the_encoder_and_falls_back_to_all():
    model = EncoderDecoder()
    assert [s.path for s in find_block_stacks(model)] == ["encoder.block"]
    assert [s.path for s in find_block_stacks(model, prefer="vision")] == [
        "encoder.block",
        "decoder.block",
    ]


class FullyShardedDataParallel(nn.Module):
    """Stands in for torch's FSDP wrapper, which is recognised by its class name."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class PeftModel(nn.Module):
    """Stands in for peft's wrapper: a ``peft`` module with ``get_base_model()``."""

    __module__ = "peft.peft_model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def get_base_model(self) -> nn.Module:
        return self.base_model


class NotPeft(PeftModel):
    """``get_base_model()`` outside peft: not a wrapper to strip."""

    __module__ = __name__


@pytest.mark.parametrize(
    "wrap",
    [FullyShardedDataParallel, PeftModel, lambda m: FullyShardedDataParallel(PeftModel(m))],
    ids=["fsdp", "peft", "fsdp-of-peft"],
)
def test_sees_through_fsdp_and_peft(wrap):
    model = TinyTransformer(depth=2)
    wrapped = wrap(model)
    assert unwrap_model(wrapped) is model
    stack = find_transformer_blocks(wrapped)
    assert stack.path == "layers" and stack.names == ("layers.0", "layers.1")
    assert find_transformer_blocks(wrapped, blocks="layers").names == ("layers.0", "layers.1")


def test_get_base_model_outside_peft_is_not_unwrapped():
    wrapped = NotPeft(TinyTransformer(depth=2))
    assert unwrap_model(wrapped) is wrapped
    assert find_transformer_blocks(wrapped).path == "base_model.layers"


def test_discovery_finds_48_blocks():
    # How long it takes is measured in benchmarks/test_bench_discovery.py, not judged here.
    stack = find_transformer_blocks(TinyTransformer(depth=48, dim=8))
    assert len(stack) == 48 and stack.path == "layers"


# -- multimodal models: the text decoder by default ---------------------------------------------


@pytest.mark.promise("vlm-text-decoder")
@pytest.mark.parametrize("name", list(VLM_CASES))
def test_a_vision_language_model_defaults_to_its_text_decoder(name):
    pytest.importorskip("transformers")
    case = VLM_CASES[name]
    model = case.build()
    assert multimodal_text_decoder(model) is model.get_decoder()
    stack = find_transformer_blocks(model)
    assert stack.path == case.paths[0]
    assert stack.blocks == tuple(model.get_submodule(stack.path).children())
    assert stack.names == tuple(f"{stack.path}.{i}" for i in range(VLM_DEPTH))
    assert all(any(b is m for m in model.get_decoder().modules()) for b in stack.blocks)
    assert [s.path for s in find_block_stacks(model)] == [stack.path]
    # Mllama's text blocks are of two classes (self- and cross-attention): a stack all the same
    assert len({type(b) for b in stack.blocks}) == (2 if name == "mllama" else 1)


@pytest.mark.promise("vlm-text-decoder")
@pytest.mark.parametrize("name", list(VLM_CASES))
def test_explicit_prefer_or_blocks_picks_the_vision_tower(name):
    """``prefer="vis"`` (part of every vision tower's path here) and ``blocks=`` win over the
    default; an explicit ``prefer="encoder"`` means the encoder, as on any model."""
    pytest.importorskip("transformers")
    case = VLM_CASES[name]
    model = case.build()
    assert [s.path for s in find_block_stacks(model, prefer="vis")] == list(case.vision)
    assert find_transformer_blocks(model, blocks=case.vision[0]).path == case.vision[0]
    encoders = [p for p in case.vision if "encoder" in p.split(".")]
    if encoders:
        assert find_transformer_blocks(model, prefer="encoder").path == encoders[0]
    with rapt_reg.RandomPerturbationRegularizer(model, max_layer=2) as reg:
        assert reg.stack.path == case.paths[0]
    with rapt_reg.RandomPerturbationRegularizer(model, blocks=case.vision[0], max_layer=2) as reg:
        assert reg.stack.path == case.vision[0]
    with rapt_reg.SmartRegularizer(model) as smart:
        assert smart.stack.path == case.paths[0]


TINY_VISION = dict(  # a vision tower config: CLIP's, BLIP-2's
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,
)


def _tiny_blip2(text_config):
    transformers = pytest.importorskip("transformers")
    config = transformers.Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            vocab_size=64,
        ),
        text_config=text_config.to_dict(),
        num_query_tokens=2,
    )
    return transformers.Blip2ForConditionalGeneration(config)


@pytest.mark.promise("vlm-text-decoder")
def test_blip2_defaults_to_its_opt_decoder_and_keeps_the_encoder_default_with_t5():
    """BLIP-2's language model is a whole ``*ForCausalLM`` (OPT) or an encoder-decoder (T5):
    the first gives its decoder's blocks, the second is left to the encoder default."""
    transformers = pytest.importorskip("transformers")
    opt = _tiny_blip2(
        transformers.OPTConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=32,
        )
    )
    assert find_transformer_blocks(opt).path == "language_model.model.decoder.layers"
    t5 = _tiny_blip2(
        transformers.T5Config(
            vocab_size=64,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )
    assert multimodal_text_decoder(t5) is None
    assert [s.path for s in find_block_stacks(t5)] == [
        "vision_model.encoder.layers",
        "qformer.encoder.layer",
        "language_model.encoder.block",
    ]


@pytest.mark.promise("vlm-text-decoder")
def test_text_models_two_towers_and_encoder_decoders_have_no_multimodal_decoder():
    transformers = pytest.importorskip("transformers")
    from hf_models import CASES

    for name in ("llama", "gpt2", "t5", "bert", "vit"):
        model = CASES[name].build()
        assert multimodal_text_decoder(model) is None, name
        assert text_decoder_stack(model) is None, name
        assert find_transformer_blocks(model).path in CASES[name].paths
    clip = transformers.CLIPModel(  # a text tower and a vision tower, nothing generates
        transformers.CLIPConfig(
            text_config=dict(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=16,
            ),
            vision_config=TINY_VISION,
            projection_dim=16,
        )
    )
    assert multimodal_text_decoder(clip) is None
    assert [s.path for s in find_block_stacks(clip)] == [
        "text_model.encoder.layers",
        "vision_model.encoder.layers",
    ]
    assert multimodal_text_decoder(TinyTransformer(depth=2)) is None  # no transformers API


class HandMadeVLM(nn.Module):
    """transformers' API by hand (``config.get_text_config``, ``get_decoder``,
    ``can_generate``), for the cases no shipped model reaches. The decoder holds a list with a
    block and a linear layer (not a stack) before its blocks."""

    def __init__(self, **settings):
        super().__init__()
        self.vision = TinyTransformer(depth=2, dim=8)
        self.language_model = nn.Module()
        self.language_model.mixed = nn.ModuleList([Block(8, 2), nn.Linear(8, 8)])
        self.language_model.layers = nn.ModuleList([Block(8, 2) for _ in range(3)])
        self.settings = {"generates": True, "text": "own", "decoder": "language_model", **settings}
        text = SimpleNamespace(is_encoder_decoder=self.settings["text"] == "encoder-decoder")
        self.config = SimpleNamespace(
            is_encoder_decoder=self.settings.get("encoder_decoder", False),
            get_text_config=lambda decoder: self._text_config(text),
        )

    def _text_config(self, text):
        if self.settings["text"] == "several":
            raise ValueError("Multiple valid text configs were found in the model config")
        return self.config if self.settings["text"] == "itself" else text

    def get_decoder(self):
        decoder = self.settings["decoder"]
        return getattr(self, decoder) if decoder != "outside" else nn.Linear(2, 2)

    def can_generate(self):
        return self.settings["generates"]


def test_a_hand_made_vlm_gets_its_decoders_outermost_all_attention_list():
    model = HandMadeVLM()
    assert multimodal_text_decoder(model) is model.language_model
    stack = find_transformer_blocks(model)
    assert stack.path == "language_model.layers" and len(stack) == 3
    assert find_transformer_blocks(model, prefer="vision").path == "vision.layers"


@pytest.mark.parametrize(
    "settings",
    [
        {"generates": False},
        {"encoder_decoder": True},
        {"text": "encoder-decoder"},
        {"text": "itself"},
        {"text": "several"},
    ],
    ids=[
        "not-generative",
        "encoder-decoder",
        "text-encoder-decoder",
        "no-sub-config",
        "several",
    ],
)
def test_a_model_that_does_not_qualify_keeps_the_generic_search(settings):
    model = HandMadeVLM(**settings)
    assert multimodal_text_decoder(model) is None
    assert text_decoder_stack(model) is None
    with pytest.raises(BlockDiscoveryError, match="several stacks"):
        find_transformer_blocks(model)  # vision.layers and language_model.layers


def test_a_decoder_that_is_the_model_itself_or_outside_it_is_not_used():
    itself = HandMadeVLM()
    itself.get_decoder = lambda: itself
    assert multimodal_text_decoder(itself) is None
    outside = HandMadeVLM(decoder="outside")
    assert isinstance(multimodal_text_decoder(outside), nn.Linear)
    assert text_decoder_stack(outside) is None
    with pytest.raises(BlockDiscoveryError, match="several stacks"):
        find_transformer_blocks(outside)
