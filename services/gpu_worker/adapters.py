"""LoRA adapters on a loaded model: loaded on demand, a few kept, one active per batch.

`AdapterCache` sits on the engine's pipeline. A batch runs with one adapter (the adapter
is part of the batch key) or none; before it runs, `activate` makes that adapter the only
active one (loading it first, with diffusers' `load_lora_weights`, when it is not loaded)
or turns LoRA off for a base-model batch. At most `capacity` adapters stay loaded; the
least recently used is deleted (`delete_adapters`) to make room. The base model is never
reloaded: LoRA layers wrap the model's own modules, whose weights stay as they are, and a
disabled LoRA layer computes exactly what the bare module does.

Where an adapter's weights are comes from `resolve(adapter_id)`: `AdapterResolver` reads
the adapter store (services/common/adapters.py) and downloads `storage:` locations into a
local cache directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.adapters import WEIGHTS_FILE, AdapterStore, local_path

__all__ = [
    "AdapterCache",
    "AdapterResolver",
    "AdapterUnavailable",
    "ResolvedAdapter",
    "write_tiny_lora",
]

log = logging.getLogger(__name__)


class AdapterUnavailable(Exception):
    """The adapter cannot be used (not registered, weights missing or unreadable). Its
    message is for the client: it names the adapter id, never a server path."""

    def __init__(self, adapter_id: str, reason: str = "could not be loaded") -> None:
        self.adapter_id = adapter_id
        super().__init__(f"adapter {adapter_id!r} {reason}")


@dataclass(frozen=True)
class ResolvedAdapter:
    """Where an adapter's weights are on this machine, and which registration they are."""

    path: Path
    revision: str = "0"


Resolve = Callable[[str], ResolvedAdapter]


# The pipeline components diffusers' LoRA loaders act on.
_LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@contextlib.contextmanager
def _uncompiled(pipe) -> Iterator[None]:
    """The pipeline with its torch.compile'd components (the engine's compiled UNet)
    replaced by the modules they wrap, for diffusers' LoRA calls, which look for its own
    model classes. LoRA layers change the modules in place, so the compiled wrapper runs
    them: dynamo's guards see the change and it recompiles for each new adapter setup."""
    compiled = {}
    for name in _LORA_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "_orig_mod"):
            compiled[name] = module
            setattr(pipe, name, module._orig_mod)
    try:
        yield
    finally:
        for name, module in compiled.items():
            setattr(pipe, name, module)


def _no_resolver(adapter_id: str) -> ResolvedAdapter:
    raise AdapterUnavailable(adapter_id, "is unknown to this worker")


class AdapterCache:
    def __init__(self, pipe, capacity: int = 4, resolve: Resolve | None = None) -> None:
        self.pipe = pipe
        self.capacity = max(1, capacity)
        self.resolve: Resolve = resolve or _no_resolver
        # diffusers adapter names of the loaded adapters, least recently used first,
        # with the adapter id each belongs to.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self.active: str | None = None  # the active adapter's name; None: LoRA off
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        """The ids of the loaded adapters, least recently used first."""
        return list(self._loaded.values())

    def activate(self, adapter_id: str | None) -> None:
        """Make `adapter_id` the one adapter the model runs with (None: the base model).
        Raises AdapterUnavailable when it cannot be loaded."""
        with _uncompiled(self.pipe):
            self._activate(adapter_id)

    def _activate(self, adapter_id: str | None) -> None:
        if adapter_id is None:
            if self.active is not None:
                self.pipe.disable_lora()
                self.active = None
            return
        try:
            resolved = self.resolve(adapter_id)
        except AdapterUnavailable:
            raise
        except Exception as exc:
            log.warning("could not look up adapter %s: %s", adapter_id, exc)
            raise AdapterUnavailable(adapter_id) from exc
        name = f"{adapter_id}__{resolved.revision}"
        if name not in self._loaded:
            self._load(adapter_id, name, resolved.path)
        self._loaded.move_to_end(name)
        if self.active != name:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name])
            self.active = name

    def _load(self, adapter_id: str, name: str, path: Path) -> None:
        # An earlier registration of the same id is stale: drop it first.
        for stale in [n for n, i in self._loaded.items() if i == adapter_id]:
            self._delete(stale)
        while len(self._loaded) >= self.capacity:
            oldest = next(iter(self._loaded))
            self._delete(oldest)
            self.evictions += 1
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            log.warning("loading adapter %s from %s failed: %s", adapter_id, path, exc)
            # Whatever part of it was injected goes again.
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters(name)
            self._after_change()
            raise AdapterUnavailable(adapter_id) from exc
        self._loaded[name] = adapter_id
        self.loads += 1
        # Loading activates the new adapter; which one runs is set by `activate`.
        self.active = None
        log.info("loaded adapter %s (%d loaded)", adapter_id, len(self._loaded))

    def _delete(self, name: str) -> None:
        self.pipe.delete_adapters(name)
        del self._loaded[name]
        if self.active == name:
            self.active = None
        self._after_change()
        log.info("unloaded adapter %s", name)

    def _after_change(self) -> None:
        # Which adapters are active after a load or delete is diffusers' business: make it
        # ours again at the next `activate` (LoRA off until then).
        if self._loaded:
            self.pipe.disable_lora()
        self.active = None


class AdapterResolver:
    """Adapter id -> its weights on this machine: the store's record, and for a
    `storage:` location the weights downloaded into `cache_dir/<id>-<revision>/`."""

    def __init__(self, store: AdapterStore, storage=None, cache_dir: str | Path | None = None):
        self.store = store
        self.storage = storage
        self.cache_dir = Path(
            cache_dir or Path(tempfile.gettempdir()) / f"instructedit-adapters-{os.getuid()}"
        )

    def __call__(self, adapter_id: str) -> ResolvedAdapter:
        adapter = self.store.get(adapter_id)
        if adapter is None:
            raise AdapterUnavailable(adapter_id, "is not registered")
        prefix = adapter.storage_prefix
        if prefix is None:
            return ResolvedAdapter(local_path(adapter.location), adapter.revision)
        if self.storage is None:
            raise AdapterUnavailable(adapter_id)
        target = self.cache_dir / f"{adapter_id}-{adapter.revision}"
        weights = target / WEIGHTS_FILE
        if not weights.is_file():
            data = self.storage.get(f"{prefix}/{WEIGHTS_FILE}")
            target.mkdir(parents=True, exist_ok=True)
            partial = weights.with_suffix(f".part-{os.getpid()}")
            partial.write_bytes(data)
            partial.replace(weights)  # whole or absent, for other processes too
        return ResolvedAdapter(target, adapter.revision)


def write_tiny_lora(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A random LoRA of the tiny test model's UNet attention projections (lora_B non-zero,
    so it changes outputs), saved as diffusers saves LoRAs: `out_dir` holds
    pytorch_lora_weights.safetensors."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
    )
    return out_dir
