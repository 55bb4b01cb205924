"""Fast masked passes for the live-masking sliders and the ablation study (`study_passes`): what a mask does not
alter is kept from the unmasked pass and not computed again, so a slider change costs ≤ 2 s for 300 questions on
both embedded models, and a study condition a fraction of a full pass.

What is kept per batch of the unmasked pass (`record_prefill` around its `run_batch`, plus `prepare_batch`):
- the processor's outputs (input_ids, attention mask, pixel_values, ...): a change never re-processes the images;
- each decoder layer's prefill output (the residual stream) and the keyword arguments the model passed to each
  layer (attention mask, rotary embeddings, ...), up to a memory budget.

Then one slider position (or study condition) costs:
- dimensions zeroed at layer L only: the kept output of layer L with those dimensions zeroed (exactly what
  `ablation.DimensionAblation`'s hook does to the layer's output) runs through layers L+1.. with their kept
  arguments, then the final norm and unembedding at the answer position. Nothing before L can change, so nothing
  before L runs: no vision tower, no processor, no earlier layer.
- greyed patches (with or without dimensions): the kept pixel tensor greyed in tensor space (checked once per
  batch to equal greying the image then processing it; re-processed otherwise), one prefill (`generate` stopped
  after the first token), no capture.
Either way the result is the first answer token's logits, which give the confidence exactly (`max_answer_prob` is
read at the first answer position). Whether the answer is right depends on the first word only (lenient
normalisation), and on a word-level tokenizer (the embedded models) the first token is the first word: an
end-of-sequence, yes-word or no-word first token decides the answer, and every other row (e.g. "there ...") is
re-run with the full masked `generate`. Other tokenizers take the full pass for every row.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from vlmrel_core.engine.answers import NO_WORDS, YES_WORDS
from vlmrel_core.engine.capture import activate_intervention_owner, intervention_active
from vlmrel_core.engine.greedy import greedy_generate
from vlmrel_core.engine.layers import resolve_layers
from vlmrel_core.engine.run import _final_logit_softcap, _soft_capped
from vlmrel_core.engine.run import batch_inputs as prepare_batch  # the inputs `run_batch` builds (re-exported)
from vlmrel_core.interventions.masking import GREY, cell_edges, grey_cells
from vlmrel_core.signals.output import output_signals

#: Residual streams kept per model at most (all layers, all batches); above it dimension masks take the full pass.
DEFAULT_RESIDUAL_BUDGET_BYTES = 512 * 2**20
_DROPPED_LAYER_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


@dataclass
class KeptBatch:
    """One batch of the unmasked pass: the model inputs, and (within budget) every decoder layer's prefill output
    with the keyword arguments that layer was called with."""

    inputs: dict[str, torch.Tensor]
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    pixels_greyable: bool | None = None  # greying pixel_values equals greying the image (checked on first use)
    grey_checked: bool = False
    grey_fill: torch.Tensor | None = None  # the processed value of an all-grey image, (3, H, W)


@contextmanager
def record_prefill(loaded: Any, kept: KeptBatch, keep_outputs: bool) -> Iterator[None]:
    """Inside the block, the first call of each decoder layer made by this thread (the prefill) leaves its output
    (if ``keep_outputs``) and its keyword arguments in ``kept``; decode steps and other threads are ignored."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    owner = object()

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if not intervention_active(owner) or index in kept.layer_kwargs:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            kept.layer_kwargs[index] = {k: v for k, v in kwargs.items() if k not in _DROPPED_LAYER_KWARGS}
            if keep_outputs:
                kept.layer_outputs[index] = hidden.detach()

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with activate_intervention_owner(owner):
            yield
    finally:
        for handle in handles:
            handle.remove()


def residual_bytes(inputs: dict[str, torch.Tensor], loaded: Any) -> int:
    """What keeping every layer's prefill output of this batch costs."""
    b, s = inputs["input_ids"].shape
    n_layers = len(loaded.adapter.decoder_layers(loaded.model))
    return b * s * int(loaded.hidden_size) * n_layers * torch.finfo(loaded.model.dtype).bits // 8


def can_resume(loaded: Any, kept: KeptBatch) -> bool:
    """Dimension masks can skip the layers before theirs: the layer outputs were kept, and the logits need no
    soft-capping (which `run_batch` applies on top of the model's own; the full pass keeps that exact)."""
    return bool(kept.layer_outputs) and not _final_logit_softcap(loaded)


def resumed_logits(
    loaded: Any, kept: KeptBatch, layer: int, dims: np.ndarray, values: np.ndarray | None = None
) -> torch.Tensor:
    """First-answer-token logits (b, V) with ``dims`` of decoder layer ``layer``'s output zeroed (or set to
    ``values``, one per entry of ``dims``: mean ablation): the kept output, so changed, through the later layers only.
    Equals the hooked full prefill (`ablate_dimensions`, mode zero or mean)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    (index,) = resolve_layers(len(layers), [layer])
    hidden = kept.layer_outputs[index].clone()
    where = torch.from_numpy(np.asarray(dims, dtype=np.int64)).to(hidden.device)
    if values is None:
        hidden[..., where] = 0
    else:  # as the ablation hook: float64 values cast to the stream's dtype
        hidden[..., where] = torch.from_numpy(np.asarray(values, dtype=np.float64)).to(hidden.device, hidden.dtype)
    with torch.inference_mode():
        for later in range(index + 1, len(layers)):
            output = layers[later](hidden, **kept.layer_kwargs[later])
            hidden = output[0] if isinstance(output, tuple) else output
        # left padding: the answer position is the last one of every row
        norm, head = loaded.adapter.final_norm(loaded.model), loaded.adapter.unembedding(loaded.model)
        return head(norm(hidden[:, -1])).float()


def first_token_logits(loaded: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """One prefill stopped after the first token (as `run_batch` calls it, without capture): the first answer
    token's logits (b, V), transformed as `run_batch` does, and the greedy tokens. Where `run_batch` decodes with
    `engine.greedy` (`loaded.plain_greedy`: the same logits as `generate`, tested) so does this, without
    `generate`'s ~2 ms of setup per call; otherwise `generate` itself."""
    with torch.inference_mode():
        if loaded.plain_greedy:
            generated: Any = greedy_generate(loaded.model, inputs, 1, loaded.tokenizer.pad_token_id)
        else:
            generated = loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True, pad_token_id=loaded.tokenizer.pad_token_id)
    logits = generated.logits[0].float()
    tokens = generated.sequences[:, -1].cpu().numpy()  # the chosen token (after any logits processor of generate's)
    return _soft_capped(logits, _final_logit_softcap(loaded)), tokens


def grey_pixel_values(loaded: Any, kept: KeptBatch, images: Sequence[Image.Image], masks: Sequence[np.ndarray]) -> torch.Tensor:
    """The batch's pixel_values with the masked cells greyed in tensor space, or re-processed from the greyed
    images when the processor is not pixel-local for these images (resize, crop, tiling).

    Pixel-local is checked once per model and processed size (not per batch: the check and the grey fill
    cost two processor calls): every image already has the processed size, and greying the first image's cells
    then processing equals greying its kept tensor bit for bit."""
    pixels = kept.inputs.get("pixel_values")
    if kept.pixels_greyable is None:
        kept.pixels_greyable = (pixels is not None and pixels.ndim == 4 and pixels.shape[0] == len(images)
                                and all(image.size == (pixels.shape[-1], pixels.shape[-2]) for image in images))
    if not kept.pixels_greyable:
        return _processed_pixels(loaded, [grey_cells(image, mask) for image, mask in zip(images, masks)])
    height, width = pixels.shape[-2:]
    known = _GREYING.setdefault(loaded.model, {})
    if kept.grey_fill is None:
        kept.grey_fill, verdict = known.get((height, width), (None, None))
        if verdict is False:  # this size was found not pixel-local: re-process, as the check would conclude
            kept.pixels_greyable = False
            return _processed_pixels(loaded, [grey_cells(image, mask) for image, mask in zip(images, masks)])
        if kept.grey_fill is None:
            kept.grey_fill = _processed_pixels(loaded, [Image.new("RGB", (width, height), GREY)])[0]
        kept.grey_checked = verdict is True
    pixel_masks = torch.from_numpy(np.stack([_pixel_mask(mask, height, width) for mask in masks]))
    greyed = torch.where(pixel_masks[:, None].to(pixels.device), kept.grey_fill[None], pixels)
    if not kept.grey_checked:
        probe = _processed_pixels(loaded, [grey_cells(images[0], masks[0])])[0]
        kept.pixels_greyable = kept.grey_checked = bool(torch.equal(probe, greyed[0]))
        known[(height, width)] = (kept.grey_fill, kept.pixels_greyable)
        if not kept.pixels_greyable:
            return _processed_pixels(loaded, [grey_cells(image, mask) for image, mask in zip(images, masks)])
    return greyed


# model (loaded with one processor; its dtype and device) -> {processed (height, width): (the all-grey pixel
# tensor, whether greying is pixel-local)}
_GREYING: "weakref.WeakKeyDictionary[Any, dict[tuple[int, int], tuple[torch.Tensor, bool]]]" = (
    weakref.WeakKeyDictionary())


def _pixel_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (rows, cols) cell mask as an (height, width) pixel mask, with `masking.cell_edges`' cell borders."""
    ys, xs = cell_edges(height, width, *mask.shape)
    row_of = np.searchsorted(ys, np.arange(height), side="right") - 1
    col_of = np.searchsorted(xs, np.arange(width), side="right") - 1
    return mask[row_of][:, col_of]


def _processed_pixels(loaded: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """pixel_values of ``images`` (the processor's pixels do not depend on the prompt's words)."""
    return prepare_batch(loaded, images, ["what is in the image?"] * len(images))["pixel_values"]


def first_tokens(logits: torch.Tensor) -> np.ndarray:
    """Greedy first answer tokens."""
    return logits.argmax(dim=-1).cpu().numpy()


def word_level_tokenizer(tokenizer: Any) -> bool:
    """Every token is a whole word (tokenizers' WordLevel model): then the first token is the first word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def decided_answers(loaded: Any, tokens: np.ndarray) -> list[str | None]:
    """Per row the answer text its first token alone decides ("" for end-of-sequence, the yes/no word), else None
    (the row needs the full generate)."""
    tokenizer = loaded.tokenizer
    if not word_level_tokenizer(tokenizer):
        return [None] * len(tokens)
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    out: list[str | None] = []
    for token in tokens.tolist():
        if token in eos_ids:
            out.append("")
            continue
        with loaded.processor_lock:
            text = tokenizer.decode([token], skip_special_tokens=True).strip()
        out.append(text if text.lower() in YES_WORDS | NO_WORDS else None)
    return out


def answer_confidence(loaded: Any, logits: torch.Tensor) -> np.ndarray:
    """max_answer_prob of the first answer position (what `run_batch` reports as confidence)."""
    tokens = loaded.answer_tokens
    return np.asarray(output_signals(logits.cpu().numpy(), tokens.yes_ids, tokens.no_ids)["max_answer_prob"],
                      dtype=np.float64)


__all__ = ["DEFAULT_RESIDUAL_BUDGET_BYTES", "KeptBatch", "answer_confidence", "can_resume", "decided_answers",
           "first_token_logits", "first_tokens", "grey_pixel_values", "prepare_batch", "record_prefill",
           "residual_bytes", "resumed_logits", "word_level_tokenizer"]
