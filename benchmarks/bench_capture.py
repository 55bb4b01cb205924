"""Cost of one-pass capture: (prefill with every layer captured) / (plain prefill), and (all layers) / (one layer).

Prints ratios measured in ONE run, interleaving the three variants so machine drift hits them alike. Target:
all-layer capture costs at most 1.2x a plain forward.

    python benchmarks/bench_capture.py                      # the embedded late-fusion model
    python benchmarks/bench_capture.py --model sample_data/models/early_fusion
    python benchmarks/bench_capture.py --random-size medium # a random LLaVA closer to real proportions
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _random_llava(size: str) -> str:
    """A random-weight LLaVA of the real class at a chosen size, saved like a checkpoint (no training needed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmrel_core.demo_models.build import build_llava

    _, processor = build_llava()
    hidden, layers, image = {"small": (256, 8, 64), "medium": (768, 12, 128)}[size]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                       num_attention_heads=8, image_size=image, patch_size=8),
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                num_attention_heads=8, num_key_value_heads=8, vocab_size=len(processor.tokenizer),
                                max_position_embeddings=512),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image // 8) ** 2, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    processor.image_processor.size = {"shortest_edge": image}
    processor.image_processor.crop_size = {"height": image, "width": image}
    out = tempfile.mkdtemp(prefix=f"vlmrel_bench_{size}_")
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/models/late_fusion")
    parser.add_argument("--random-size", choices=["small", "medium"], default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmrel_core.engine.capture import TokenLayout, capture
    from vlmrel_core.engine.layers import POOLINGS
    from vlmrel_core.data.shapes import make_scene, render_scene
    from vlmrel_core.engine.loading import load_vlm

    source = _random_llava(args.random_size) if args.random_size else args.model
    loaded = load_vlm(source, attn_implementation="sdpa")
    size = loaded.processor.image_processor.crop_size["height"] if hasattr(loaded.processor.image_processor, "crop_size") else 64
    images = [render_scene(make_scene(i)).resize((size, size)) for i in range(args.batch_size)]
    questions = ["is there a red circle in the image?"] * args.batch_size
    inputs = loaded.adapter.prepare_inputs(loaded.processor, images, questions)
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    model, adapter = loaded.model, loaded.adapter

    def plain() -> None:
        model(**inputs)

    def all_layers() -> None:
        with capture(model, adapter, layout, None, POOLINGS):
            model(**inputs)

    def one_layer() -> None:
        with capture(model, adapter, layout, [-1], ("last_token",)):
            model(**inputs)

    variants = {"plain": plain, "all_layers": all_layers, "one_layer": one_layer}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "model": source, "n_layers": loaded.n_layers, "hidden_size": loaded.hidden_size,
        "batch_size": args.batch_size, "seq_len": int(inputs["input_ids"].shape[1]), "repeats": args.repeats,
        "median_seconds": {k: round(v, 5) for k, v in median.items()},
        "ratio_all_layers_over_plain": round(median["all_layers"] / median["plain"], 3),
        "ratio_all_layers_over_one_layer": round(median["all_layers"] / median["one_layer"], 3),
        "target_all_layers_over_plain": 1.2,
    }, indent=1))


if __name__ == "__main__":
    main()
