"""Several adapters on one base at once, chosen per row of a batch: the layer and the stacks it reads.

Every adapted linear becomes a MultiLoRALinear holding all adapters' A and B stacked, slot 0 being
the base (zeros): y = W x + (x A[i]) B[i] for the adapter i of each row. Ranks are padded with zeros
to the largest, which adds exact zeros; the scale is folded into B. Adapters that do not touch a
layer have zeros there too. Nothing is merged into the base, so switching costs nothing.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_lora.errors import UserError
from mlx_lora.formats.loader import apply_adapter, read_adapter
from mlx_lora.model import decoder
from mlx_lora.model.base import Base
from mlx_lora.model.lora import lora_layers, remove_lora

Part = tuple[mx.array, mx.array]  # A (in, r), scale·B (r, out)


class Rows:
    """Which adapter slot each row of the batch being computed uses; set before every forward."""

    def __init__(self):
        self.index = mx.array([0])  # (B,)


class MultiLoRALinear(nn.Module):
    """y = W x + (x A[i_b]) B[i_b] per row b; A (n, in, r_max), B (n, r_max, out) with the scale folded in."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array, rows: Rows):
        super().__init__()
        self.linear = base
        self.a = a
        self.b = b
        self.rows = rows

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (B, T, out)
        index = self.rows.index  # (B,)
        # (x A[i]) B[i] without copying the gathered (B, in, r_max) and (B, r_max, out) stacks
        z = mx.gather_mm(mx.gather_mm(x, self.a, rhs_indices=index), self.b, rhs_indices=index)  # (B, T, out)
        return y + z.astype(y.dtype)


def read_parts(base: Base, directory: Path) -> dict[str, Part]:
    """One adapter's (A, scale·B) per module path, read and checked the way `generate` reads it.

    The base must hold its plain layers while this runs (apply_adapter wraps them, we unwrap them).
    """
    config, weights = read_adapter(directory)
    if config.lora.dora:
        raise UserError(
            f"{directory}: DoRA adapters cannot share a batch (their weight norm is per adapter); "
            "fuse it with `mlx-lora fuse` and serve the fused model"
        )
    try:
        apply_adapter(base, config, weights, directory)
        parts = {path: (l.lora_a, l.scale * l.lora_b) for path, l in lora_layers(base.model).items()}
        mx.eval(parts)
    finally:
        remove_lora(base.model)
    return parts


class AdapterSlots:
    """Adapters by name, each in a slot of the stacks; slot 0 is the base. Slots are reused, never shifted,
    so a row's slot stays valid while other adapters come and go."""

    def __init__(self, base: Base):
        self.base = base
        self.rows = Rows()
        self.slots: list[str | None] = [None]  # slot -> adapter name (None: free, or the base at 0)
        self.parts: dict[str, dict[str, Part]] = {}  # name -> module path -> (A, scale·B)
        self.originals: dict[str, nn.Module] = {}  # module path -> the base's own layer

    @property
    def names(self) -> list[str]:
        return [n for n in self.slots if n is not None]

    def slot(self, name: str | None) -> int:
        return 0 if name is None else self.slots.index(name)

    def add(self, name: str, directory: Path) -> int:
        """Read the adapter in `directory` into a free slot under `name`; returns the slot."""
        if name in self.parts:
            raise UserError(f"an adapter named '{name}' is already loaded; delete it first or pick another name")
        self._uninstall()
        try:
            parts = read_parts(self.base, Path(directory))
        except BaseException:
            self._install()
            raise
        modules = dict(self.base.model.named_modules())  # the plain layers while uninstalled
        self.originals.update({p: modules[p] for p in parts if p not in self.originals})
        free = [i for i, n in enumerate(self.slots) if n is None and i > 0]
        slot = free[0] if free else len(self.slots)
        self.slots[slot : slot + 1] = [name]
        self.parts[name] = parts
        self._install()
        return slot

    def remove(self, name: str) -> None:
        """Forget the adapter; its slot holds zeros (the base) until another adapter takes it."""
        self.slots[self.slot(name)] = None
        del self.parts[name]
        self._install()

    def _uninstall(self) -> None:
        if self.originals:
            self.base.model.update_modules(tree_unflatten(list(self.originals.items())))

    def _install(self) -> None:
        """Put a MultiLoRALinear holding every slot's A and B at each path some adapter adapts."""
        self._uninstall()
        used = {p for parts in self.parts.values() for p in parts}
        layers = [(path, self._stacked(path)) for path in self.originals if path in used]
        if layers:
            self.base.model.update_modules(tree_unflatten(layers))
            mx.eval([layer.parameters() for _, layer in layers])
        decoder.forget(self.base.model)  # its products held the stacks replaced here

    def _stacked(self, path: str) -> MultiLoRALinear:
        present = [self.parts[n][path] for n in self.names if path in self.parts[n]]
        in_dims, out_dims = present[0][0].shape[0], present[0][1].shape[1]
        r_max = max(a.shape[1] for a, _ in present)
        dtype = present[0][0].dtype
        a_stack = mx.zeros((len(self.slots), in_dims, r_max), dtype=dtype)  # (n, in, r_max)
        b_stack = mx.zeros((len(self.slots), r_max, out_dims), dtype=dtype)  # (n, r_max, out)
        for slot, name in enumerate(self.slots):
            if name is not None and path in self.parts[name]:
                a, b = self.parts[name][path]
                a_stack[slot, :, : a.shape[1]] = a
                b_stack[slot, : b.shape[0], :] = b
        return MultiLoRALinear(self.originals[path], a_stack, b_stack, self.rows)


class RoutedModel:
    """The model as BatchGenerator sees it: token ids carry their row's slot as `id + slot·V`.

    mlx-lm's batches filter, split and extend their rows as requests come and go; an id that
    carries its slot travels with its row through all of that, so no row can be given another
    row's adapter. The per-row samplers add the slot back to every token they pick.
    """

    def __init__(self, model: nn.Module, rows: Rows, vocab: int):
        self.model = model
        self.rows = rows
        self.vocab = vocab

    def __call__(self, ids: mx.array, cache=None, **kwargs) -> mx.array:
        slots = (ids // self.vocab).max(axis=1)  # (B,); right padding is id 0, slot 0
        self.rows.index = slots
        return self.model(ids % self.vocab, cache=cache, **kwargs)

    def __getattr__(self, name):  # layers, make_cache … as the model has them
        return getattr(self.model, name)


def vocab_size(model: nn.Module) -> int:
    """How many logits the model gives per position."""
    return model(mx.array([[0]])).shape[-1]
