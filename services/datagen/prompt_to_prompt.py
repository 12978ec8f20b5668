"""Prompt-to-Prompt attention injection as diffusers attention processors.

An image pair is denoised as two *branches* in one UNet batch: the input branch (input
caption) and the output branch (output caption), from the same initial noise. During the
first fraction p of the denoising steps the output branch does not use its own attention
maps but the input branch's, which keeps the two images' layout identical while the
output caption still changes what the image shows:

* **self-attention** (every ``attn1`` layer by default): InstructPix2Pix's dataset
  generation, "unlike the original Prompt-to-Prompt which uses cross-attention layers,
  we copy attention maps for self-attention layers";
* **cross-attention** (optional, off by default): Hertz et al.'s word swap and
  refinement, by token alignment (a diff of the two captions' token ids). Tokens the two
  captions share, and the start and end/padding tokens, take the input branch's map of
  their counterpart (refinement). Where the output caption replaces a run of tokens by a
  run of the same length ("red" -> "blue"), each new token takes the map of the token it
  replaces (word swap: the new word is drawn where the old one was). Inserted tokens, and
  replacements of another length, keep their own maps (refinement's rule for new words;
  the paper's averaging over differently tokenized words is not done).

Batch layout, for P pairs denoised together (index = guidance * 2P + 2 * pair + branch)::

    [uncond in_0, uncond out_0, ..., uncond in_P-1, uncond out_P-1,
     text   in_0, text   out_0, ..., text   in_P-1, text   out_P-1]

Self-attention is injected in both classifier-free-guidance halves, as in InstructPix2Pix
(its sampler flags every attention layer of the whole batch). Cross-attention, when on,
is injected in the conditional (text) half only: the unconditional half attends to the
same empty or negative prompt in both branches, so there is no caption word to carry
over, and it keeps its own maps. Each pair has its own p (and the cross-attention
fraction its own step count), so injection is decided per pair, layer kind and step.

Which steps: InstructPix2Pix's rule (``dataset_creation/generate_img_dataset.py``,
``prompt_to_prompt = p > i / (len(sigmas) - 2)`` over N = len(sigmas) - 1 steps): step i
(0-based) of N is injected iff p > i / (N - 1) (``injected_step_count``).

How the maps are injected. Self-attention maps are N x N (N = 4,096 positions at 512 px):
materialising them for every layer and step would cost gigabytes and time. Since
softmax(Q_in K_in^T) V_out is exactly "the output branch's values read with the input
branch's attention map", the processor gives the output rows the input rows' queries and
keys and runs PyTorch's fused scaled-dot-product attention (SDPA) once: the output branch
attends with the input branch's maps, never stored. Cross-attention maps (N x 77) are
small; injected cross-attention layers compute them explicitly to replace columns.
With ``record=True`` the controller instead computes every map of the controlled layers
explicitly at every step, injects by copying the input rows' probabilities into the
output rows, and keeps them (``AttentionRecord``) for inspection and tests.

Layers that are not controlled keep diffusers' ``AttnProcessor2_0`` (SDPA); controlled
layers fall through to it whenever nothing is injected or recorded at the current step,
and outside a generation session, so the pipeline still works as plain text-to-image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

__all__ = [
    "ALL_CROSS_ATTENTION",
    "ALL_SELF_ATTENTION",
    "AttentionController",
    "AttentionRecord",
    "InjectionLayers",
    "PromptToPromptProcessor",
    "TokenMap",
    "injected_step_count",
    "shared_token_map",
]

# Regular expressions over attention layer names ("down_blocks.0.attentions.0.
# transformer_blocks.0.attn1"), matched in full.
ALL_SELF_ATTENTION = r".*\.attn1"
ALL_CROSS_ATTENTION = r".*\.attn2"

GUIDANCE_HALVES = 2  # unconditional, text
BRANCHES = 2  # input, output


def injected_step_count(p: float, steps: int) -> int:
    """How many of the first denoising steps are injected for fraction ``p``:
    InstructPix2Pix's rule, step i (0-based) of N is injected iff p > i / (N - 1), that is
    iff i < p * (N - 1). So p = 0 injects nothing, any p > 0 injects step 0, and p = 1
    injects every step but the last. A single step (N = 1) is injected iff p > 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return int(p > 0)
    # Rounded first so that 0.3 * 10 counts as 3, not 3.0000000000000004 -> 4.
    return min(steps, math.ceil(round(p * (steps - 1), 9)))


@dataclass(frozen=True, slots=True)
class InjectionLayers:
    """Which attention layers the output branch copies maps in (regex over layer names,
    matched in full; None = none)."""

    self_attention: str | None = ALL_SELF_ATTENTION
    cross_attention: str | None = None

    def controls(self, name: str, is_cross: bool) -> bool:
        pattern = self.cross_attention if is_cross else self.self_attention
        return pattern is not None and re.fullmatch(pattern, name) is not None


@dataclass(frozen=True, slots=True)
class TokenMap:
    """For each output-caption token position: the input-caption position whose
    cross-attention map it takes (``source``) and whether it takes one (``shared``; False:
    it keeps its own map)."""

    source: tuple[int, ...]
    shared: tuple[bool, ...]


def shared_token_map(
    input_ids: Sequence[int],
    output_ids: Sequence[int],
    end_token_id: int,
    *,
    word_swap: bool = True,
) -> TokenMap:
    """Align two padded token id sequences (start token, text, end token, padding).

    The start token maps to the start token; text tokens in blocks the two texts share
    (difflib's opcodes) map to their counterpart; with ``word_swap``, tokens of a replaced
    block as long as the block it replaces map position by position to the replaced
    tokens; the end token and the padding after it map to the input's end token and
    padding, position by position. Everything else (insertions, replacements of another
    length) maps to nothing.
    """
    if len(input_ids) != len(output_ids):
        raise ValueError("both token sequences must be padded to the same length")
    length = len(output_ids)

    def text_end(ids: Sequence[int]) -> int:
        for position in range(1, len(ids)):
            if ids[position] == end_token_id:
                return position
        return len(ids)

    end_in, end_out = text_end(input_ids), text_end(output_ids)
    source = list(range(length))
    shared = [False] * length
    shared[0] = True
    matcher = SequenceMatcher(None, input_ids[1:end_in], output_ids[1:end_out], autojunk=False)
    for tag, in_start, in_stop, out_start, out_stop in matcher.get_opcodes():
        swapped = tag == "replace" and word_swap and in_stop - in_start == out_stop - out_start
        if tag != "equal" and not swapped:
            continue
        for offset in range(out_stop - out_start):
            source[1 + out_start + offset] = 1 + in_start + offset
            shared[1 + out_start + offset] = True
    for position in range(end_out, length):
        counterpart = end_in + (position - end_out)
        if counterpart < length:
            source[position] = counterpart
            shared[position] = True
    return TokenMap(tuple(source), tuple(shared))


@dataclass(frozen=True, slots=True)
class AttentionRecord:
    """The attention maps one controlled layer used at one step (``record=True``)."""

    step: int
    layer: str
    is_cross: bool
    # (guidance half, P): which pairs' output branch used the input branch's maps at this
    # step, per half (cross-attention: never the unconditional half).
    injected: torch.Tensor
    # (guidance half, pair, branch, heads, queries, keys): the maps each row attended with.
    maps: torch.Tensor
    # (guidance half, pair, heads, queries, keys): the output branch's own maps, before
    # injection replaced them.
    own_output_maps: torch.Tensor


@dataclass(slots=True)
class _Session:
    injected_steps: tuple[int, ...]
    cross_injected_steps: tuple[int, ...]
    token_map: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device
    step: int = -1
    # (guidance half, P) injection masks of the current step.
    self_mask: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None
    # (4P,) the batch row whose queries and keys each row attends with.
    source_rows: torch.Tensor | None = None
    any_injected: bool = False
    any_cross_injected: bool = False
    records: list[AttentionRecord] = field(default_factory=list)


class AttentionController:
    """Owns the Prompt-to-Prompt processors of one UNet and tells them, step by step,
    which pairs' output branches copy the input branch's maps.

        controller = AttentionController(InjectionLayers())
        controller.install(unet)
        with controller.session(injected_steps=[12, 30], device=device):
            for step, t in enumerate(timesteps):
                controller.set_step(step)
                unet(batch_of_4_per_pair, t, ...)
    """

    def __init__(self, layers: InjectionLayers | None = None, *, record: bool = False) -> None:
        self.layers = layers or InjectionLayers()
        self.record = record
        self.controlled_layers: tuple[str, ...] = ()
        self._session: _Session | None = None
        self.records: list[AttentionRecord] = []

    # -- installation ------------------------------------------------------------------

    def install(self, unet) -> tuple[str, ...]:
        """Give every attention layer of ``unet`` its processor: a Prompt-to-Prompt one
        where ``layers`` says so, SDPA (``AttnProcessor2_0``) everywhere else."""
        processors = {}
        controlled = []
        for name, module in unet.named_modules():
            if not isinstance(module, Attention):
                continue
            is_cross = bool(module.is_cross_attention)
            if self.layers.controls(name, is_cross):
                processors[f"{name}.processor"] = PromptToPromptProcessor(self, name, is_cross)
                controlled.append(name)
            else:
                processors[f"{name}.processor"] = AttnProcessor2_0()
        unet.set_attn_processor(processors)
        self.controlled_layers = tuple(controlled)
        return self.controlled_layers

    # -- a generation --------------------------------------------------------------------

    @contextmanager
    def session(
        self,
        injected_steps: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        token_map: TokenMap | None = None,
        cross_injected_steps: Sequence[int] | None = None,
    ) -> Iterator[None]:
        """One denoising run of ``len(injected_steps)`` pairs; pair i's output branch is
        injected in self-attention (both guidance halves) during its first
        ``injected_steps[i]`` steps. Cross-attention layers are injected only when a
        ``token_map`` is given, in the conditional half only, during pair i's first
        ``cross_injected_steps[i]`` steps (default: ``injected_steps``)."""
        if self._session is not None:
            raise RuntimeError("an attention-control session is already running")
        if not injected_steps:
            raise ValueError("a session needs at least one pair")
        device = torch.device(device)
        tokens = None
        if token_map is not None:
            tokens = (
                torch.tensor(token_map.source, dtype=torch.long, device=device),
                torch.tensor(token_map.shared, dtype=torch.bool, device=device),
            )
        cross = tuple(injected_steps if cross_injected_steps is None else cross_injected_steps)
        if len(cross) != len(injected_steps):
            raise ValueError("cross_injected_steps needs one count per pair")
        self._session = _Session(tuple(injected_steps), cross, tokens, device)
        self.records = self._session.records
        try:
            yield
        finally:
            self._session = None

    def set_step(self, step: int) -> None:
        """Call before each UNet evaluation with the 0-based step index."""
        session = self._require_session()
        session.step = step
        flags = [step < count for count in session.injected_steps]
        cross_flags = [
            session.token_map is not None and step < count for count in session.cross_injected_steps
        ]
        session.any_injected = any(flags)
        session.any_cross_injected = any(cross_flags)
        device = session.device
        # Self-attention: both guidance halves; cross-attention: the conditional one only.
        session.self_mask = torch.tensor([flags, flags], dtype=torch.bool, device=device)
        session.cross_mask = torch.tensor(
            [[False] * len(cross_flags), cross_flags], dtype=torch.bool, device=device
        )
        # Row (half, pair, output) reads row (half, pair, input) when the pair is injected.
        rows = []
        for _half in range(GUIDANCE_HALVES):
            for injected in flags:
                input_row = len(rows)
                rows += [input_row, input_row if injected else input_row + 1]
        session.source_rows = torch.tensor(rows, dtype=torch.long, device=session.device)

    def _require_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("no attention-control session is running")
        return self._session

    # -- what the processors ask -----------------------------------------------------------

    def _mask_for(self, is_cross: bool) -> torch.Tensor | None:
        """The per-pair injection mask for a layer at the current step, or None when the
        layer can run plain SDPA (no session, nothing injected, nothing recorded)."""
        session = self._session
        if session is None or session.step < 0:
            return None
        if self.record:
            return session.cross_mask if is_cross else session.self_mask
        if is_cross:
            return session.cross_mask if session.any_cross_injected else None
        return session.self_mask if session.any_injected else None

    def _keep(self, record: AttentionRecord) -> None:
        self._require_session().records.append(record)


def _pairs_view(x: torch.Tensor, pairs: int) -> torch.Tensor:
    """(4P, ...) -> (guidance half, pair, branch, ...)."""
    if x.shape[0] != GUIDANCE_HALVES * pairs * BRANCHES:
        raise RuntimeError(
            f"attention batch of {x.shape[0]} does not hold {pairs} pair(s) x "
            f"{BRANCHES} branches x {GUIDANCE_HALVES} guidance halves"
        )
    return x.unflatten(0, (GUIDANCE_HALVES, pairs, BRANCHES))


def _broadcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(guidance half, P) -> (half, P, 1, ...) matching a (guidance, pair, ...) tensor."""
    return mask.view(*mask.shape, *([1] * (like.ndim - 2)))


def _inject_rows(x: torch.Tensor, session: _Session) -> torch.Tensor:
    """``x`` with the output-branch rows of injected pairs replaced by their input-branch
    rows (one gather)."""
    _pairs_view(x, len(session.injected_steps))  # checks the batch layout
    return x.index_select(0, session.source_rows)


class PromptToPromptProcessor:
    """``AttnProcessor2_0`` with Prompt-to-Prompt injection for one controlled layer."""

    def __init__(self, controller: AttentionController, name: str, is_cross: bool) -> None:
        self.controller = controller
        self.name = name
        self.is_cross = is_cross
        self._sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        mask = self.controller._mask_for(self.is_cross)
        if mask is None:
            return self._sdpa(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return self._controlled(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, mask
        )

    def _controlled(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        # Everything around the attention itself is AttnProcessor2_0's, step for step.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.is_cross or self.controller.record:
            hidden_states = self._explicit(query, key, value, attention_mask, mask)
        else:
            # Output rows attend with the input rows' queries and keys: exactly the input
            # branch's maps, applied to the output branch's values, in one fused kernel.
            session = self.controller._require_session()
            hidden_states = F.scaled_dot_product_attention(
                _inject_rows(query, session),
                _inject_rows(key, session),
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _explicit(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention with materialised probabilities; the output branch's are replaced
        (whole maps for self-attention, the token map's columns for cross-attention)."""
        # SDPA's default scale, so both paths compute the same attention.
        scores = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = _pairs_view(scores.softmax(dim=-1), mask.shape[-1])
        source, own = probs[:, :, 0], probs[:, :, 1]
        pair_mask = _broadcast(mask, own)
        if self.is_cross:
            session = self.controller._require_session()
            if session.token_map is not None:
                token_source, token_shared = session.token_map
                replacement = source.index_select(-1, token_source)
                injected = torch.where(pair_mask & token_shared, replacement, own)
            else:
                injected = own
        else:
            injected = torch.where(pair_mask, source, own)
        probs = torch.stack((source, injected), dim=2)
        if self.controller.record:
            self.controller._keep(
                AttentionRecord(
                    step=self.controller._require_session().step,
                    layer=self.name,
                    is_cross=self.is_cross,
                    injected=mask.clone(),
                    maps=probs.detach().clone(),
                    own_output_maps=own.detach().clone(),
                )
            )
        return probs.flatten(0, 2).to(value.dtype) @ value
