"""Prompt-to-Prompt attention processors, on single attention layers and a tiny UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from services.common.tiny_components import TEXT_HIDDEN, build_unet
from services.datagen.prompt_to_prompt import (
    ALL_CROSS_ATTENTION,
    ALL_SELF_ATTENTION,
    AttentionController,
    InjectionLayers,
    PromptToPromptProcessor,
    TokenMap,
    injected_step_count,
    shared_token_map,
)

S, E = 100, 101  # start and end token ids of the made-up sequences below


@pytest.mark.parametrize(
    ("p", "steps", "expected"),
    [
        (0.0, 10, 0),
        (1.0, 10, 9),  # every step but the last
        (1.0, 100, 99),
        (0.3, 10, 3),  # i < 2.7
        (1 / 3, 10, 3),  # i < 3, despite float error in (1/3) * 9
        (0.34, 10, 4),  # i < 3.06
        (0.5, 5, 2),  # i < 2
        (0.5, 2, 1),
        (0.1, 51, 5),  # i < 5
        (0.1001, 51, 6),
        (0.001, 100, 1),  # any p > 0 injects step 0
        (0.5, 1, 1),  # a single step: injected iff p > 0
        (0.0, 1, 0),
    ],
)
def test_injected_step_count_is_instructpix2pix_s_rule(p, steps, expected):
    assert injected_step_count(p, steps) == expected
    # InstructPix2Pix's generate_img_dataset.py: step i of N is injected iff
    # p > i / (N - 1) (its `prompt2prompt_threshold > i / (len(sigmas) - 2)`).
    rule = [p > i / max(steps - 1, 1) + 1e-12 for i in range(steps)]
    assert rule == [i < expected for i in range(steps)]


@pytest.mark.parametrize("p", [-0.1, 1.01])
def test_injected_step_count_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match="p must be"):
        injected_step_count(p, 10)


def test_shared_token_map_aligns_shared_tokens_start_end_and_padding():
    # input "1 2 3", output "1 9 3 4": 1 and 3 are shared, 9 and 4 are new (refinement
    # only: no word swap).
    input_ids = [S, 1, 2, 3, E, E, E, E]
    output_ids = [S, 1, 9, 3, 4, E, E, E]
    token_map = shared_token_map(input_ids, output_ids, E, word_swap=False)
    assert token_map.shared == (True, True, False, True, False, True, True, True)
    shared_sources = [s for s, ok in zip(token_map.source, token_map.shared, strict=True) if ok]
    # start -> start, 1 -> 1, 3 -> 3, end token and padding from the input's end token on.
    assert shared_sources == [0, 1, 3, 4, 5, 6]
    # Identical captions map every position to itself.
    same = shared_token_map(input_ids, input_ids, E)
    assert same.source == tuple(range(8)) and all(same.shared)
    with pytest.raises(ValueError, match="same length"):
        shared_token_map(input_ids, output_ids[:-1], E)


def test_word_swap_gives_a_new_word_the_replaced_word_s_map():
    # Hertz et al.'s word swap: "1 2 3" -> "1 9 3" ("red" -> "blue"), 9 takes 2's map.
    input_ids = [S, 1, 2, 3, E, E, E, E]
    swapped = shared_token_map(input_ids, [S, 1, 9, 3, E, E, E, E], E)
    assert swapped.source == tuple(range(8)) and all(swapped.shared)
    # A two-token word swapped for a two-token word: position by position.
    two = shared_token_map([S, 1, 2, 5, 3, E, E, E], [S, 1, 8, 9, 3, E, E, E], E)
    assert two.source[:5] == (0, 1, 2, 3, 4) and all(two.shared)
    # "1 2 3" -> "1 9 3 4": the swap as above; the inserted 4 keeps its own map
    # (refinement), and so does a replacement of another length.
    mixed = shared_token_map(input_ids, [S, 1, 9, 3, 4, E, E, E], E)
    assert mixed.shared == (True, True, True, True, False, True, True, True)
    assert mixed.source[2] == 2
    longer = shared_token_map(input_ids, [S, 1, 8, 9, 3, E, E, E], E)
    assert longer.shared[:5] == (True, True, False, False, True)
    assert longer.source[4] == 3


def test_shared_token_map_with_a_longer_input_drops_tail_positions_past_the_end():
    input_ids = [S, 1, 2, 3, 4, 5, E, E]
    output_ids = [S, 1, E, E, E, E, E, E]
    token_map = shared_token_map(input_ids, output_ids, E)
    # Output end token (position 2) -> input end token (6), 3 -> 7, 4.. -> past the end.
    assert token_map.source[:4] == (0, 1, 6, 7)
    assert token_map.shared == (True, True, True, True, False, False, False, False)


# -- one attention layer against a hand-written reference -----------------------------------


def _layer(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8)


def _reference(attn, hidden, context, injected_pairs, token_map=None, halves=(0, 1)):
    """Attention computed naively: per row, softmax(q k^T / sqrt(d)) v, where the output
    branch of an injected pair uses the input branch's map (whole, or shared tokens') in
    the guidance ``halves`` given (0: unconditional, 1: text)."""
    context = hidden if context is None else context
    batch = hidden.shape[0]
    heads, dim = attn.heads, attn.to_q.out_features // attn.heads

    def split(x):
        return x.view(batch, -1, heads, dim).transpose(1, 2)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    maps = (q @ k.transpose(-1, -2) / dim**0.5).softmax(-1)
    used = maps.clone()
    for half in halves:
        for pair in range(batch // 4):
            src, dst = half * batch // 2 + 2 * pair, half * batch // 2 + 2 * pair + 1
            if pair not in injected_pairs:
                continue
            if token_map is None:
                used[dst] = maps[src]
            else:
                for j, (source, shared) in enumerate(
                    zip(token_map.source, token_map.shared, strict=True)
                ):
                    if shared:
                        used[dst][..., j] = maps[src][..., source]
    out = (used @ v).transpose(1, 2).reshape(batch, -1, heads * dim)
    return attn.to_out[0](out)


@pytest.mark.parametrize("record", [False, True], ids=["sdpa", "explicit"])
def test_self_attention_processor_uses_the_input_branch_maps_for_injected_pairs(record):
    attn = _layer(cross=False)
    controller = AttentionController(InjectionLayers(), record=record)
    attn.set_processor(PromptToPromptProcessor(controller, "layer.attn1", is_cross=False))
    torch.manual_seed(1)
    hidden = torch.randn(8, 5, 16)  # 2 pairs x 2 branches x 2 guidance halves
    with torch.no_grad(), controller.session([1, 0]):
        controller.set_step(0)  # pair 0 injected, pair 1 not
        out = attn(hidden)
        expected = _reference(attn, hidden, None, injected_pairs={0})
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(out, _reference(attn, hidden, None, injected_pairs=set()))
        controller.set_step(1)  # nothing injected any more
        assert torch.allclose(attn(hidden), _reference(attn, hidden, None, set()), atol=1e-5)
    if record:
        first = controller.records[0]
        # Self-attention: injected in both guidance halves.
        assert first.injected.tolist() == [[True, False], [True, False]]
        assert torch.equal(first.maps[:, 0, 1], first.maps[:, 0, 0])
        assert not torch.equal(first.maps[:, 1, 1], first.maps[:, 1, 0])
        assert torch.equal(first.maps[:, 1, 1], first.own_output_maps[:, 1])


@pytest.mark.parametrize("record", [False, True], ids=["plain", "recorded"])
def test_cross_attention_processor_copies_only_the_shared_tokens_maps(record):
    attn = _layer(cross=True)
    controller = AttentionController(InjectionLayers(cross_attention=".*"), record=record)
    attn.set_processor(PromptToPromptProcessor(controller, "layer.attn2", is_cross=True))
    torch.manual_seed(2)
    hidden, context = torch.randn(4, 6, 16), torch.randn(4, 5, 12)
    token_map = TokenMap(source=(0, 1, 3, 3, 4), shared=(True, False, True, False, True))
    with torch.no_grad(), controller.session([2], token_map=token_map):
        controller.set_step(1)
        out = attn(hidden, encoder_hidden_states=context)
        # The conditional half only: the unconditional half keeps its own maps.
        expected = _reference(attn, hidden, context, {0}, token_map, halves=(1,))
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(out, _reference(attn, hidden, context, {0}, token_map))
        plain = _reference(attn, hidden, context, set())
        # Rows 0-1: the unconditional half's input and output branch, as uninjected.
        assert torch.allclose(out[:2], plain[:2], atol=1e-5)
        assert not torch.allclose(out[3], plain[3], atol=1e-4)
        controller.set_step(2)
        plain = _reference(attn, hidden, context, set())
        assert torch.allclose(attn(hidden, encoder_hidden_states=context), plain, atol=1e-5)


def test_cross_attention_has_its_own_step_count_and_leaves_the_unconditional_half_alone():
    attn = _layer(cross=True)
    controller = AttentionController(InjectionLayers(cross_attention=".*"), record=True)
    attn.set_processor(PromptToPromptProcessor(controller, "layer.attn2", is_cross=True))
    torch.manual_seed(4)
    hidden, context = torch.randn(8, 6, 16), torch.randn(8, 5, 12)
    token_map = TokenMap(source=(0, 1, 2, 3, 4), shared=(True,) * 5)
    # Self-attention steps [1, 3], cross-attention steps [2, 0]: pair 0 has cross-attention
    # injected at steps 0 and 1, pair 1 never.
    with (
        torch.no_grad(),
        controller.session([1, 3], token_map=token_map, cross_injected_steps=[2, 0]),
    ):
        for step in range(3):
            controller.set_step(step)
            attn(hidden, encoder_hidden_states=context)
    assert [r.injected.tolist() for r in controller.records] == [
        [[False, False], [True, False]],
        [[False, False], [True, False]],
        [[False, False], [False, False]],
    ]
    for record in controller.records:
        maps, own = record.maps, record.own_output_maps
        # The unconditional half's output branch attends with its own maps at every step.
        assert torch.equal(maps[0, :, 1], own[0])
        expected = maps[1, 0, 0] if record.step < 2 else own[1, 0]
        assert torch.equal(maps[1, 0, 1], expected)
        assert torch.equal(maps[1, 1, 1], own[1, 1])
    with (
        pytest.raises(ValueError, match="one count per pair"),
        controller.session([1, 1], cross_injected_steps=[1]),
    ):
        pass


def test_cross_attention_is_not_injected_without_a_token_map():
    attn = _layer(cross=True)
    controller = AttentionController(InjectionLayers(cross_attention=".*"))
    attn.set_processor(PromptToPromptProcessor(controller, "layer.attn2", is_cross=True))
    hidden, context = torch.randn(4, 6, 16), torch.randn(4, 5, 12)
    with torch.no_grad(), controller.session([5]):
        controller.set_step(0)
        out = attn(hidden, encoder_hidden_states=context)
    assert torch.allclose(out, _reference(attn, hidden, context, set()), atol=1e-5)


def test_a_batch_that_is_not_four_rows_per_pair_is_refused():
    attn = _layer(cross=False)
    controller = AttentionController()
    attn.set_processor(PromptToPromptProcessor(controller, "layer.attn1", is_cross=False))
    with torch.no_grad(), controller.session([1, 1]):
        controller.set_step(0)
        with pytest.raises(RuntimeError, match="does not hold 2 pair"):
            attn(torch.randn(4, 5, 16))


def test_sessions_do_not_nest_and_steps_need_a_session():
    controller = AttentionController()
    with pytest.raises(RuntimeError, match="no attention-control session"):
        controller.set_step(0)
    with (
        controller.session([1]),
        pytest.raises(RuntimeError, match="already running"),
        controller.session([1]),
    ):
        pass
    with pytest.raises(ValueError, match="at least one pair"), controller.session([]):
        pass


# -- installation on a UNet ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return build_unet(in_channels=4, seed=0)


def _kinds(unet):
    return {
        name.removesuffix(".processor"): type(processor)
        for name, processor in unet.attn_processors.items()
    }


def test_install_controls_the_chosen_layers_and_keeps_sdpa_everywhere_else(unet):
    controlled = AttentionController(InjectionLayers()).install(unet)
    kinds = _kinds(unet)
    assert set(controlled) == {name for name in kinds if name.endswith(".attn1")}
    for name, kind in kinds.items():
        expected = PromptToPromptProcessor if name.endswith(".attn1") else AttnProcessor2_0
        assert kind is expected, name

    both = InjectionLayers(ALL_SELF_ATTENTION, ALL_CROSS_ATTENTION)
    assert len(AttentionController(both).install(unet)) == len(kinds)
    assert set(_kinds(unet).values()) == {PromptToPromptProcessor}

    one = InjectionLayers(r"up_blocks\.1\.attentions\.0\..*\.attn1", None)
    assert AttentionController(one).install(unet) == (
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
    )
    assert list(_kinds(unet).values()).count(AttnProcessor2_0) == len(kinds) - 1


def test_installed_processors_are_plain_sdpa_outside_a_session(unet):
    torch.manual_seed(3)
    latents, t = torch.randn(4, 4, 8, 8), torch.tensor(500)
    text = torch.randn(4, 7, TEXT_HIDDEN)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        plain = unet(latents, t, encoder_hidden_states=text).sample
        controller = AttentionController(InjectionLayers(ALL_SELF_ATTENTION, ALL_CROSS_ATTENTION))
        controller.install(unet)
        assert torch.equal(unet(latents, t, encoder_hidden_states=text).sample, plain)
        # Inside a session, but at a step where nothing is injected: still plain SDPA.
        with controller.session([1]):
            controller.set_step(1)
            assert torch.equal(unet(latents, t, encoder_hidden_states=text).sample, plain)
            controller.set_step(0)
            injected = unet(latents, t, encoder_hidden_states=text).sample
        assert not torch.allclose(injected, plain)
