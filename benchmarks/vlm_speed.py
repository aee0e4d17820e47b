"""Visual-token reduction in a LLaVA-1.5-7B-shaped model on the CPU: prefill time (= time to first token: the
tower, the projector, the reducer and the language model over the whole prompt), decode tokens/s after it, and
MACs, against K = 100 / 50 / 25 / 11 % of the 576 visual tokens, for the pooling baseline, DivPrune and ToMe inside
the tower, eager and sdpa attention, batch 1, fp32, random weights (time and MACs do not depend on them).

The shape is LLaVA-1.5-7B's (CLIP ViT-L/14 at 336 px: 24 layers, width 1024, 577 tokens; a two-layer GELU
projector; Llama-2-7B: width 4096, MLP 11 008, 32 heads, 32 000 words), built from its config. On two CPU cores the
full depth does not fit a benchmark run, so the timed model is a depth-reduced copy at the full width
(``--tower-layers`` and ``--text-layers``, default 6 and 2: the tower's feature layer is its second to last, as in
LLaVA) and the times are those of that copy (ToMe in a 6-layer tower merges within 5 layers, not 23); the MACs are counted for
the full depth: the whole 24-layer tower, and the 32 text layers from copies with 1 and 2 (every text layer costs
the same). A prompt of 40 text tokens around one image.

    python benchmarks/vlm_speed.py --threads 2     # -> benchmarks/results/vlm_speed.{json,md}
    python benchmarks/vlm_speed.py --model path/to/llava-folder --attention sdpa   # your weights, as they are
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenthrift as tt
from tokenthrift.apps.report import table

OUT = Path("benchmarks/results/vlm_speed")
TEXT = 40  # text tokens around the image
SHARES = (1.0, 0.5, 0.25, 0.11)
METHODS = ("pool", "divprune", "tower-merge")
FULL = {"tower": 24, "text": 32}


def llava(tower_layers: int, text_layers: int, attn: str, small: bool = False):
    """LLaVA-1.5-7B's shape at the given depths (``small``: a tiny one of the same layout, for smoke runs)."""
    import transformers as t

    width, text_width, mlp, heads = (32, 64, 128, 4) if small else (1024, 4096, 11008, 32)
    vision = t.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=tower_layers,
                                num_attention_heads=heads // 2, image_size=336, patch_size=14, hidden_act="quick_gelu",
                                projection_dim=768)
    text = t.LlamaConfig(hidden_size=text_width, intermediate_size=mlp, num_hidden_layers=text_layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                         max_position_embeddings=4096, pad_token_id=0)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, projector_hidden_act="gelu",
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           attn_implementation=attn)
    torch.manual_seed(0)
    return t.LlavaForConditionalGeneration(config).eval()


def inputs(model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """One prompt: 5 text tokens, the image's placeholders (576 at 336 px, patch 14), 35 text tokens; the image
    (random), sized as the model's tower takes it."""
    vision = model.config.vision_config
    side = vision.image_size
    n = (side // vision.patch_size) ** 2
    words = min(model.config.text_config.vocab_size, 31000)
    ids = torch.randint(1, words, (1, TEXT + n), generator=torch.Generator().manual_seed(0))
    ids[ids == model.config.image_token_id] = 1  # text tokens never the placeholder
    ids[0, 5:5 + n] = model.config.image_token_id
    pixels = torch.randn(1, vision.num_channels, side, side, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


class Prefill(torch.nn.Module):
    """``model``'s prefill on fixed prompt ids as a module of the images (what ``tt.measure.macs`` takes)."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.model, self.ids, self.mask = model, ids, mask

    def forward(self, pixel_values: torch.Tensor):
        return self.model(input_ids=self.ids, attention_mask=self.mask, pixel_values=pixel_values, logits_to_keep=1)


@torch.no_grad()
def full_depth_macs(method: str | None, keep: int) -> float:
    """MACs of one prefill with LLaVA-1.5-7B's full tower (24 layers) and its 32 text layers: the text layers all
    cost the same, so copies with 1 and 2 of them give the cost of one (32 in fp32 do not fit this machine)."""
    from transformers.initialization import no_init_weights

    def count(text: int) -> float:
        with no_init_weights():  # what the weights hold changes no count; initialising 0.6 B of them takes minutes
            model = llava(FULL["tower"], text, "sdpa")  # MACs do not depend on the attention implementation
        with torch.no_grad():
            for p in model.parameters():  # finite values, so that every reducer runs as it would
                p.normal_(0, 0.02)
        if method is not None:
            tt.vlm.reduce(model, keep=keep, method=method)
        try:
            batch = inputs(model)
            return tt.measure.macs(Prefill(model, batch["input_ids"], batch["attention_mask"]), (3, 336, 336),
                                   example=batch["pixel_values"])
        finally:
            if method is not None:
                tt.vlm.remove(model)  # the handle refers to the model: without this the pair waits for the cycle GC
            del model
            gc.collect()

    one = count(1)
    return one + (count(2) - one) * (FULL["text"] - 1)


def speed_rows(model, batch: dict, attn: str, repeats: int, decode: int, sync=lambda: None,
               shares=SHARES, methods=METHODS) -> list[dict]:
    """Prefill time, time to first token and decode tokens/s of ``model`` on ``batch`` (one prompt with its image),
    unreduced and reduced by each method to each share of its visual tokens; ``sync`` waits for the device (CUDA).
    The GPU suite calls this too."""
    n = int((batch["input_ids"] == model.config.image_token_id).sum())
    rows, plain_prefill = [], None

    def clock(fn) -> float:
        def run():
            fn()
            sync()
        return timed(run, repeats)

    for share in shares:
        keep = round(n * share)
        for method in ([None] if share == 1.0 else methods):
            if method is not None:
                tt.vlm.reduce(model, keep=keep, method=method)
            try:
                with torch.no_grad():
                    prefill = clock(lambda: model(**batch, logits_to_keep=1))
                first = clock(lambda: model.generate(**batch, max_new_tokens=1, do_sample=False))
                longer = clock(lambda: model.generate(**batch, max_new_tokens=1 + decode, min_new_tokens=1 + decode,
                                                      do_sample=False))
                kept = tt.vlm.get_handle(model).last_positions.shape[1] if method else n
            except tt.errors.TokenthriftError as err:  # e.g. a tower too shallow to merge down to K
                rows.append({"attention": attn, "method": method, "visual_tokens": keep, "note": str(err)})
                continue
            finally:
                if method is not None:
                    tt.vlm.remove(model)
            plain_prefill = plain_prefill or prefill
            rows.append({"attention": attn, "method": method or f"none (all {n})", "visual_tokens": kept,
                         "share": kept / n, "prefill_s": prefill, "prefill_speedup": plain_prefill / prefill,
                         "ttft_s": first,  # generate's first token: the prefill and one sampling step
                         "decode_tok_s": decode / (longer - first) if longer > first else "-"})
    return rows


def main() -> None:
    from suite import write_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tower-layers", type=int, default=6)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--attention", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=8, help="tokens generated after the first for the decode rate")
    ap.add_argument("--no-macs", action="store_true", help="skip the full-depth MACs (slow: several model builds)")
    ap.add_argument("--model", help="a LlavaForConditionalGeneration save_pretrained folder to time instead of the "
                                    "random LLaVA-1.5-7B shape (its own depth; its MACs counted as it runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    counted: dict = {}
    for attn in args.attention:
        if args.model:  # a user's weights, as they are
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation=attn).eval()
        else:
            model = llava(args.tower_layers, args.text_layers, attn)  # the timed copy: full width, fewer layers
        new = speed_rows(model, inputs(model), attn, args.repeats, args.decode)
        for row in new:
            if args.model and not args.no_macs and "note" not in row:
                method = None if row["method"].startswith("none") else row["method"]
                if method is not None:
                    tt.vlm.reduce(model, keep=row["visual_tokens"], method=method)
                try:
                    batch = inputs(model)
                    row["TMACs"] = tt.measure.macs(Prefill(model, batch["input_ids"], batch["attention_mask"]),
                                                   tuple(batch["pixel_values"].shape[1:]),
                                                   example=batch["pixel_values"]) / 1e12
                finally:
                    if method is not None:
                        tt.vlm.remove(model)
            elif not args.no_macs and "note" not in row:
                key = (None if row["method"].startswith("none") else row["method"], row["visual_tokens"])
                if key not in counted:  # the same in both attention implementations
                    counted[key] = full_depth_macs(*key)
                row["full_depth_TMACs"] = counted[key] / 1e12
        print(table(new), flush=True)
        rows += new
        del model
        gc.collect()
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", batch=1, tower_layers=args.tower_layers,
                                   text_layers=args.text_layers, text_tokens=TEXT, repeats=args.repeats,
                                   command=" ".join(["python benchmarks/vlm_speed.py", *sys.argv[1:]]))
    print(write_result(OUT, meta, {"rows": rows}, rows))


if __name__ == "__main__":
    main()
