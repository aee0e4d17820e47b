"""A quality proxy for the visual-token reducers of tokenthrift.vlm: a tiny LLaVA trained here, on the CPU, to answer
one-word questions about Fashion-MNIST garments on a canvas, then scored with its visual tokens reduced.

What it is. Every sample is a 64 px grey canvas cut into a 2x2 layout; 1 to 4 garments of distinct classes stand in
distinct cells (Fashion-MNIST's training images for the training split, its test images for the test split), each
at one of four distinct sides (14, 20, 26, 32 px) and a random offset inside its cell. One question per sample, the
four kinds in equal shares, between them needing what, where, how many and how large:

    what   "what is at the top left ?"     -> a class, or "nothing" (an empty cell is asked about 15 % of the time)
    count  "how many garments ?"           -> 1, 2, 3 or 4
    large  "which garment is largest ?"    -> a class (the garment pasted at the largest side)
    where  "where is the sneaker ?"        -> top-left, top-right, bottom-left or bottom-right

The model is transformers' LlavaForConditionalGeneration built from a config (no hub): a 4-layer CLIP tower
(patch 8: an 8x8 grid, 64 visual tokens), LLaVA's projector and a 3-layer Llama decoder of width 96, trained from
scratch with vision_feature_layer=-2 and the "default" strategy (the LLaVA-1.5 layout tokenthrift.vlm takes). Words
are tokens of a word-level vocabulary defined below (no tokenizer): the prompt is [BOS, question..., <image> x 64,
SEP] (left-padded) and the loss is on the answer token only. The trained model is saved under runs/vlm_proxy/ and
reused; the test split is scored by top-1 accuracy (argmax of the logits at the answer position, over the whole
vocabulary) for the unreduced model and every reducer of tokenthrift.vlm.METHODS at keep ratios 0.5, 0.25 and 0.11
of the 64 tokens (pool at the nearest K whose a x b grid is no more than twice as long as wide; the K used is in
the table), two seeds for the reducers that sample (random), one for the others; per question kind too. The
"majority" row answers every question with its kind's most frequent training answer: the floor to beat.

What it is not. Not a pretrained VLM, not a benchmark of one: the reducers meet a tower and a language model trained
here for ~25 minutes, on synthetic images whose answers sit in a few garments. It ranks reducers on whether the tokens
they keep still carry what, where, how many and how large, and how accuracy falls as K shrinks; it says nothing
direct about LLaVA-1.5 on real images, whose numbers need the real model and data. The model is trained once on the
unreduced tokens and reduced only at test time (training-free reduction, as the reducers are used).

    python benchmarks/vlm_proxy.py            # ~30 min on a 2-core CPU (one thread): train (~25 min) or reuse, score
                                              # -> runs/vlm_proxy/<run>/, benchmarks/results/vlm_proxy.{json,md}
    python benchmarks/vlm_proxy.py --retrain  # train again even when the run exists
    python benchmarks/vlm_proxy.py --smoke    # the whole pipeline on tiny sizes in seconds (-> runs/vlm_proxy/smoke)

It trains at one torch thread by default: on a 2-core machine that another job also uses, 2 threads wait on each
other and ran 15x slower here (--threads 2 only on an idle machine). A run is named by its training settings
(runs/vlm_proxy/s<steps>-b<batch>-lr<lr>-n<train size>-seed<seed>), so other settings train a new one.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tokenthrift as tt
from tokenthrift import vlm
from tokenthrift.data import FashionMNIST
from tokenthrift.data.coco import _paste
from tokenthrift.vlm.reducers import pool_grid

OUT = Path("benchmarks/results/vlm_proxy")
RUNS = Path("runs/vlm_proxy")
COMMAND = "python benchmarks/vlm_proxy.py"

CANVAS, CELL, PATCH = 64, 32, 8  # a 2x2 layout of 32 px cells; an 8x8 grid of visual tokens
GRID = CANVAS // PATCH
N_TOKENS = GRID * GRID
SIDES = (14, 20, 26, 32)  # one per garment of an image, so "largest" has one answer
P_EMPTY = 0.2  # a "what" question asks about an empty cell this often, when the image has one
RATIOS = (0.5, 0.25, 0.11)
SAMPLING = ("random",)  # reducers whose choice depends on the seed: scored at two seeds
SEEDS = (0, 1)
KINDS = ("what", "count", "large", "where")

# ---------------------------------------------------------------------------------------------- vocabulary
SPECIAL = ("<pad>", "<bos>", "<sep>", "<image>")
CLASS_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # cells 0-3, row-major
NUMBERS = ("1", "2", "3", "4")
VOCAB = (*SPECIAL, "what", "is", "at", "the", "top", "bottom", "left", "right", "?", "how", "many", "garments",
         "which", "garment", "largest", "where", *CLASS_WORDS, "nothing", *NUMBERS, *POSITIONS)
ID = {word: i for i, word in enumerate(VOCAB)}
PAD, BOS, SEP, IMAGE = (ID[w] for w in SPECIAL)
QUESTION_LEN = 8  # BOS and the longest question ("what is at the top left ?")
PROMPT_LEN = QUESTION_LEN + N_TOKENS + 1


def ids(words: str) -> torch.Tensor:
    return torch.tensor([ID[w] for w in words.split()])


def words_for(table: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([ID[w] for w in table])


# ---------------------------------------------------------------------------------------------- data
def make_split(train: bool, count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` samples from Fashion-MNIST's training (``train``) or test images, deterministic in ``seed``:
    ``pixels`` (count, 64, 64) uint8, ``input_ids`` (count, PROMPT_LEN), ``answer`` (count,), ``kind`` (count,)."""
    garments = FashionMNIST(train=train)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # layout: per image k garments in slots 0..k-1; each slot has a cell, a class and a side, distinct in the image
    k = torch.randint(1, 5, (count,), generator=g)
    used = torch.arange(4) < k[:, None]  # (count, 4)
    cell = rand(count, 4).argsort(1)
    label = rand(count, 10).argsort(1)[:, :4]
    side = torch.tensor(SIDES)[rand(count, 4).argsort(1)]
    per_class = torch.bincount(garments.labels, minlength=10)
    first = per_class.cumsum(0) - per_class
    by_class = garments.labels.argsort(stable=True)  # image indices grouped by class
    image = by_class[first[label] + (rand(count, 4) * per_class[label]).long()]
    top = (cell // 2) * CELL + (rand(count, 4) * (CELL - side + 1)).long()  # anywhere inside its cell
    left = (cell % 2) * CELL + (rand(count, 4) * (CELL - side + 1)).long()

    # resize every garment drawn at side s in one call, then paste each image's garments on its own canvas
    resized = {s: F.interpolate(garments.images[image[used & (side == s)]].unsqueeze(1).float() / 255, size=(s, s),
                                mode="bilinear", antialias=True).squeeze(1).clamp(0, 1).numpy() for s in SIDES}
    rank = torch.zeros(count, 4, dtype=torch.long)  # each used slot's index among the garments of its side
    for s in SIDES:
        at = used & (side == s)
        rank[at] = torch.arange(int(at.sum()))
    pixels = np.zeros((count, CANVAS, CANVAS), np.uint8)
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    scratch = np.zeros((CANVAS, CANVAS), np.int32)  # _paste's owner map: not needed here (garments never overlap)
    for r, (n, sides, ranks, tops, lefts) in enumerate(zip(k.tolist(), side.tolist(), rank.tolist(), top.tolist(),
                                                           left.tolist())):
        canvas[:] = 0
        for j in range(n):
            _paste(canvas, scratch, resized[sides[j]][ranks[j]], tops[j], lefts[j], 1)
        pixels[r] = (canvas * 255).round()

    # the same layout per cell: the class standing there (-1: empty) and its side (0: empty)
    at_cell = torch.full((count, 4), -1).scatter(1, cell, torch.where(used, label, -1))
    side_at_cell = torch.zeros(count, 4, dtype=torch.long).scatter(1, cell, torch.where(used, side, 0))
    occupied = at_cell >= 0
    rows = torch.arange(count)
    class_word, position_word = words_for(CLASS_WORDS), words_for(POSITIONS)

    kind = rows % len(KINDS)  # equal shares, independent of the (random) layout
    question = torch.full((count, QUESTION_LEN), PAD)
    answer = torch.empty(count, dtype=torch.long)

    def put(mask: torch.Tensor, template: str, fill: dict[int, torch.Tensor] | None = None) -> None:
        """The template's tokens (BOS first), word i replaced by ``fill[i]`` (one token per row of ``mask``),
        right-aligned in the rows of ``mask``: every question ends where the image starts."""
        tokens = torch.cat([torch.tensor([BOS]), ids(template)]).repeat(int(mask.sum()), 1)
        for i, column in (fill or {}).items():
            tokens[:, i + 1] = column
        question[mask, QUESTION_LEN - tokens.shape[1]:] = tokens

    m = kind == 0  # what is at <cell>: mostly an occupied cell, an empty one P_EMPTY of the time
    want_empty = rand(count) < P_EMPTY
    asked = (rand(count, 4) + (occupied != want_empty[:, None]).float()).argmax(1)  # all occupied: any cell
    put(m, "what is at the top left ?", {4: torch.where(asked[m] // 2 == 0, ID["top"], ID["bottom"]),
                                         5: torch.where(asked[m] % 2 == 0, ID["left"], ID["right"])})
    there = at_cell[rows, asked][m]
    answer[m] = torch.where(there >= 0, class_word[there.clamp(min=0)], ID["nothing"])

    m = kind == 1
    put(m, "how many garments ?")
    answer[m] = words_for(NUMBERS)[k[m] - 1]

    m = kind == 2
    put(m, "which garment is largest ?")
    answer[m] = class_word[at_cell[rows, side_at_cell.argmax(1)][m]]

    m = kind == 3  # where is <class>: a garment of the image, at random
    sought = (rand(count, 4) + occupied.float()).argmax(1)
    put(m, "where is the bag ?", {3: class_word[at_cell[rows, sought][m]]})
    answer[m] = position_word[sought[m]]

    prompt = torch.cat([question, torch.full((count, N_TOKENS), IMAGE), torch.full((count, 1), SEP)], 1)
    return {"pixels": torch.from_numpy(pixels), "input_ids": prompt, "answer": answer, "kind": kind}


def pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 64, 64) -> the tower's input (B, 1, 64, 64) in [-1, 1]."""
    return pixels.unsqueeze(1).float().div(127.5).sub(1)


# ---------------------------------------------------------------------------------------------- model
def build_model():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=CANVAS, patch_size=PATCH, num_channels=1)
    text = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(VOCAB), max_position_embeddings=PROMPT_LEN + 8,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=N_TOKENS)
    return LlavaForConditionalGeneration(config)


def train(model, data: dict[str, torch.Tensor], steps: int, batch: int, lr: float, seed: int) -> dict:
    """AdamW, linear warm-up over the first 5 % of the steps then a cosine to 0, on the answer token only."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * max(0, s - warmup) / max(1, steps - warmup)))))
    n = len(data["answer"])
    order = torch.randperm(n, generator=g)
    cursor, loss_avg, acc_avg = 0, None, None
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step", dynamic_ncols=True)
    for _ in bar:
        if cursor + batch > n:  # a new epoch: a new order
            order, cursor = torch.randperm(n, generator=g), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        answer = data["answer"][idx]
        input_ids = torch.cat([data["input_ids"][idx], answer[:, None]], 1)  # the answer after SEP: the target
        labels = torch.full_like(input_ids, -100)
        labels[:, -1] = answer
        out = model(input_ids=input_ids, pixel_values=pixel_values(data["pixels"][idx]),
                    attention_mask=(input_ids != PAD).long(), labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        acc = (out.logits[:, -2].argmax(-1) == answer).float().mean().item()  # SEP's logits predict the answer
        loss_avg = out.loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * out.loss.item()
        acc_avg = acc if acc_avg is None else 0.98 * acc_avg + 0.02 * acc
        bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{100 * acc_avg:.1f}")
    model.eval()
    return {"train_loss_ema": loss_avg, "train_acc_ema": 100 * acc_avg,
            "train_minutes": (time.perf_counter() - start) / 60}


def trained_model(run_dir: Path, settings: dict, retrain: bool, make_train_split):
    """The run in ``run_dir`` when it exists (and ``retrain`` is off), else a model trained now and saved there."""
    from transformers import LlavaForConditionalGeneration

    info_file = run_dir / "proxy.json"
    if info_file.exists() and not retrain:
        info = json.loads(info_file.read_text())
        if info["vocab"] != list(VOCAB):
            raise SystemExit(f"{run_dir} was trained with another vocabulary than this script's; run again with "
                             "--retrain (or remove the folder)")
        print(f"reusing the trained proxy in {run_dir} (--retrain to train it again)", flush=True)
        return LlavaForConditionalGeneration.from_pretrained(run_dir).eval(), info
    torch.manual_seed(settings["seed"])
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"training the proxy ({params / 1e6:.2f} M parameters) -> {run_dir}", flush=True)
    data = make_train_split()
    log = train(model, data, settings["steps"], settings["batch"], settings["lr"], settings["seed"])
    info = {"vocab": list(VOCAB), "settings": settings, "parameters": params,
            "majority": dict(zip(KINDS, (VOCAB[i] for i in majority_answers(data)))), **log}
    model.save_pretrained(run_dir)
    info_file.write_text(json.dumps(info, indent=1))
    return model, info


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def correct(model, data: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Whether the top-1 answer of each sample is right, (count,) bool."""
    hits = []
    for start in range(0, len(data["answer"]), batch):
        part = slice(start, start + batch)
        input_ids = data["input_ids"][part]
        logits = model(input_ids=input_ids, pixel_values=pixel_values(data["pixels"][part]),
                       attention_mask=(input_ids != PAD).long(), logits_to_keep=1).logits[:, -1]
        hits.append(logits.argmax(-1) == data["answer"][part])
    return torch.cat(hits)


def accuracy_row(hits: torch.Tensor, kind: torch.Tensor, **head) -> dict:
    """Top-1 accuracy in percent, over all samples and per question kind."""
    row = {**head, "acc": 100 * hits.float().mean().item()}
    for i, name in enumerate(KINDS):
        row[name] = 100 * hits[kind == i].float().mean().item()
    return row


def majority_answers(data: dict[str, torch.Tensor]) -> list[int]:
    """The most frequent answer of each question kind."""
    counts = torch.zeros(len(KINDS), len(VOCAB), dtype=torch.long)
    counts.index_put_((data["kind"], data["answer"]), torch.ones_like(data["answer"]), accumulate=True)
    return counts.argmax(1).tolist()


def pool_keep(target: int) -> int:
    """The K nearest ``target`` that pooling reaches with an a x b grid (a, b <= the grid side) at most twice as long
    as wide; ties go to the squarer grid, then the smaller K."""
    def aspect(k: int) -> float:
        a, b = pool_grid((GRID, GRID), k)
        return max(a, b) / min(a, b)

    valid = [k for k in range(1, N_TOKENS + 1) if any(k % a == 0 and k // a <= GRID for a in range(1, GRID + 1))
             and aspect(k) <= 2]
    return min(valid, key=lambda k: (abs(k - target), aspect(k), k))


def settings_for(method: str, ratio: float) -> tuple[int, tuple[int, ...]]:
    target = max(1, round(N_TOKENS * ratio))
    return (pool_keep(target) if method == "pool" else target), (SEEDS if method in SAMPLING else (SEEDS[0],))


def shown(rows: list[dict]) -> list[dict]:
    """Rows for the markdown table: accuracies to 0.1 point, "-" where a setting does not apply."""
    return [{k: "-" if v is None else round(v, 1) if isinstance(v, float) and k != "ratio" else v
             for k, v in r.items()} for r in rows]


def pivot(rows: list[dict]) -> list[dict]:
    """Overall accuracy per reducer (rows) and keep ratio (columns), seeds averaged."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["ratio"] in RATIOS):
        row = {"method": method}
        for ratio in RATIOS:
            found = [r for r in rows if r["method"] == method and r["ratio"] == ratio and r["acc"] != "-"]
            row[f"r={ratio} (K)"] = f"{np.mean([r['acc'] for r in found]):.1f} ({found[0]['K']})" if found else "-"
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    from suite import write_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000,
                    help="training steps (5000 at batch 64: ~24 min at one thread, 0.28 s a step)")
    ap.add_argument("--batch", type=int, default=64, help="training batch")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    ap.add_argument("--train-size", type=int, default=100000, help="training samples (from Fashion-MNIST train)")
    ap.add_argument("--test-size", type=int, default=4000, help="test samples (from Fashion-MNIST test)")
    ap.add_argument("--eval-batch", type=int, default=250, help="evaluation batch")
    ap.add_argument("--methods", nargs="+", default=list(vlm.METHODS), choices=vlm.METHODS,
                    help="reducers to score (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="data and training seed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads: 1 by default, as 2 threads on a 2-core machine another job also uses "
                         "ran 15x slower here (the threads wait on each other)")
    ap.add_argument("--retrain", action="store_true", help="train again even when the run exists")
    ap.add_argument("--smoke", action="store_true",
                    help="the whole pipeline on tiny sizes in seconds; writes only under runs/vlm_proxy/smoke")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch, args.train_size, args.test_size, args.eval_batch = 4, 16, 128, 64, 64
        args.retrain = True
    for flag in ("steps", "batch", "train_size", "test_size", "eval_batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    torch.set_num_threads(args.threads)
    begun = time.perf_counter()

    settings = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "train_size": args.train_size,
                "seed": args.seed}
    name = "smoke" if args.smoke else f"s{args.steps}-b{args.batch}-lr{args.lr:g}-n{args.train_size}-seed{args.seed}"
    run_dir = RUNS / name

    def make_train_split() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        data = make_split(True, args.train_size, args.seed)
        print(f"training split: {args.train_size} samples in {time.perf_counter() - start:.1f} s", flush=True)
        return data

    model, info = trained_model(run_dir, settings, args.retrain, make_train_split)
    test = make_split(False, args.test_size, args.seed + 1)

    guess = torch.tensor([ID[info["majority"][name]] for name in KINDS])[test["kind"]]
    rows = [accuracy_row(guess == test["answer"], test["kind"], method="majority", ratio=None, K=0, seed=None)]
    full = accuracy_row(correct(model, test, args.eval_batch), test["kind"], method="none", ratio=1.0, K=N_TOKENS,
                        seed=None)
    rows.append(full)
    print(f"unreduced: {full['acc']:.1f} % (majority answer: {rows[0]['acc']:.1f} %)", flush=True)
    for method in args.methods:
        for ratio in RATIOS:
            keep, seeds = settings_for(method, ratio)
            for seed in seeds:
                start = time.perf_counter()
                vlm.reduce(model, keep=keep, method=method, seed=seed)
                try:
                    hits = correct(model, test, args.eval_batch)
                except tt.errors.TokenthriftError as err:  # e.g. ToMe in a 4-layer tower cannot reach K = 7
                    print(f"{method:>10} r={ratio:<5} K={keep:<3}: not reachable ({err})", flush=True)
                    rows.append({"method": method, "ratio": ratio, "K": keep, "seed": None,
                                 "acc": "-", "note": str(err).split(";")[0]})
                    continue
                finally:
                    vlm.remove(model)
                row = accuracy_row(hits, test["kind"], method=method, ratio=ratio, K=keep,
                                   seed=seed if method in SAMPLING else None)
                row["drop"] = full["acc"] - row["acc"]
                rows.append(row)
                print(f"{method:>10} r={ratio:<5} K={keep:<3} seed={row['seed']}: {row['acc']:.1f} % "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)

    out = run_dir / "vlm_proxy" if args.smoke else OUT  # the smoke run leaves benchmarks/results alone
    command = f"{COMMAND} --smoke" if args.smoke else COMMAND
    meta = tt.measure.run_metadata(device="cpu", dtype="fp32", command=command, run=str(run_dir),
                                   test_size=args.test_size, visual_tokens=N_TOKENS, kinds=list(KINDS),
                                   training={k: v for k, v in info.items() if k != "vocab"},
                                   minutes=(time.perf_counter() - begun) / 60)
    md = write_result(out, meta, {"rows": rows, "summary": pivot(rows)},
                      "Top-1 answer accuracy (%) on the test split, overall and per question kind; drop: points "
                      "below the unreduced model.", shown(rows),
                      "Overall accuracy (%) per reducer and keep ratio (K used).", pivot(rows))
    print(md)
    print(f"-> {out}.json, {out}.md")


if __name__ == "__main__":
    main()
