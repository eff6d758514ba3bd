"""Train the shipped models: LLaDA-format `starquant_plugin/assets/llada-tiny-arith` (the default)
and Dream-format `starquant_plugin/assets/dream-tiny-reverse` (`--family dream`, see below).

Deterministic (fixed seeds, one compute thread): the same command gives the same weights.
The task is 4-digit addition and subtraction with zero-padded numbers in a prompt -> answer
format (`"<bos>4170+3852="` -> `"08022"`, `"4170-3852="` -> `"0318"`), trained with LLaDA's SFT objective (answer tokens,
including end-of-text padding, masked at a ratio t ~ U(0, 1], loss weighted by 1/t).
It writes the hub layout (config.json with every LLaDA key, model.safetensors with hub
tensor names, tokenizer.json + tokenizer_config.json) plus the held-out evaluation set
`eval.jsonl` and a separate calibration set `calibration.jsonl`.

    python scripts/train_shipped_model.py [--output DIR] [--steps N]

The defaults give the shipped LLaDA model. The shipped Dream-format model is

    python scripts/train_shipped_model.py --family dream

its defaults (`DREAM_DEFAULTS`): task `reverse` (a string of 5-9 lowercase letters written
backwards, `"kxqbm="` -> `"mbqxk"`: longer answers than the arithmetic task, and each answer token
is read from a different prompt position), GQA (8 heads over 2 KV heads), bf16 weights in shards
with an index, Dream's hub layout (Qwen2 tensor names, `model_type: "Dream"`, the tokenizer's EOS
doubling as BOS and padding, `generation_config.json`) and Dream's logits shift in the loss (the
raw logits at position i - 1 predict token i). The architecture, operand width, vocabulary size (the
special tokens sit at its top) and the saved dtype / sharding are flags, so other
LLaDA-format checkpoints of the family (GQA, bf16, sharded, other special-token ids, longer
answers) can be trained the same way to check that recipes hold beyond the shipped model:

    python scripts/train_shipped_model.py --output /tmp/llada-gqa --digits 6 --d-model 192 --n-heads 6 \
        --n-kv-heads 2 --n-layers 4 --mlp-hidden-size 512 --vocab-size 40 --dtype bfloat16 --max-shard-size 2MB

The second Dream-format model, `examples/models/dream-arith-4d` (the Dream defaults on the
arithmetic task, where 4-bit activations cost round-to-nearest 30 points; 2061 s on one thread):

    python scripts/train_shipped_model.py --family dream --task arith --steps 6000 --output examples/models/dream-arith-4d
"""

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from starquant_plugin import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from starquant_plugin.diffusion import DiffusionSamplingConfig, diffusion_generate, hf_logits_fn, mask_positions
from starquant_plugin.models import family_of
from starquant_plugin.evaluation import exact_match
from starquant_plugin.models.char_tokenizer import build_char_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "starquant_plugin" / "assets"
DEFAULT_OUTPUT = ASSETS / "llada-tiny-arith"
CHARACTERS = "0123456789+-*=() "
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# `--family dream` changes these defaults (the shipped Dream-format model).
DREAM_DEFAULTS = {
    "output": ASSETS / "dream-tiny-reverse", "task": "reverse", "d_model": 256, "n_heads": 8, "n_kv_heads": 2,
    "n_layers": 4, "mlp_hidden_size": 512, "vocab_size": 48, "dtype": "bfloat16", "max_shard_size": "1MB",
    "steps": 4000,
}
DREAM_EOS, DREAM_MASK = "<|endoftext|>", "<|mask|>"
VOCAB_SIZE = 32
# Special tokens sit at the top of the vocabulary, as in LLaDA (ids are read from config/tokenizer).
BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"


def special_ids(vocab_size: int) -> dict[str, int]:
    return {BOS: vocab_size - 3, EOS: vocab_size - 2, MASK: vocab_size - 1}  # 29, 30, 31 when shipped
EVAL_SIZE, CALIBRATION_SIZE = 500, 256
MAX_EXTRA_EOS = 3
# Operand width. 3 digits was too easy: W4A4 round-to-nearest lost only 0.2 points of exact match.
DIGITS = 4


# The models were trained on bare prompts: their chat template is the last user message, as a
# prompt (with LLaDA's BOS, which a rendered template carries itself), so that /v1/chat/completions
# answers through it.
CHAT_TEMPLATE = (
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if not users -%}{{ raise_exception('a conversation needs a user message') }}{%- endif -%}"
    "{BOS}{{ users[-1]['content'] }}"
)


def build_tokenizer(vocab_size: int = VOCAB_SIZE, family: str = "llada"):
    ids = special_ids(vocab_size)
    if family == "dream":  # Qwen2's convention: no BOS prepended, EOS doubles as BOS and padding
        tokenizer = build_char_tokenizer(CHARACTERS + LETTERS, vocab_size, None, (DREAM_EOS, ids[EOS]), (DREAM_MASK, ids[MASK]))
        tokenizer.chat_template = CHAT_TEMPLATE.replace("{BOS}", "")
        return tokenizer
    tokenizer = build_char_tokenizer(CHARACTERS, vocab_size, (BOS, ids[BOS]), (EOS, ids[EOS]), (MASK, ids[MASK]))
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{BOS}", "{{ bos_token }}")
    return tokenizer


def make_example(rng: random.Random, digits: int = DIGITS, task: str = "arith") -> dict:
    """arith: zero-padded operands and answers (digits=4): `0042+6170=` -> `06212`, `6170-0042=` -> `6128`.
    reverse: 5-9 letters written backwards: `kxqbm=` -> `mbqxk`."""
    if task == "reverse":
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 9)))
        return {"prompt": f"{word}=", "answer": word[::-1], "task": "reverse"}
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    if rng.random() < 0.5:
        return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=", "answer": f"{a + b:0{digits + 1}d}", "task": "add"}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"{a:0{digits}d}-{b:0{digits}d}=", "answer": f"{a - b:0{digits}d}", "task": "sub"}


def held_out_sets(seed: int, digits: int = DIGITS, task: str = "arith") -> tuple[list[dict], list[dict]]:
    """Evaluation and calibration sets, disjoint from each other (and excluded from training)."""
    rng = random.Random(seed)
    seen, sets = set(), ([], [])
    for target, size in zip(sets, (EVAL_SIZE, CALIBRATION_SIZE)):
        while len(target) < size:
            example = make_example(rng, digits, task)
            if example["prompt"] not in seen:
                seen.add(example["prompt"])
                target.append(example)
    return sets


def training_batch(rng: random.Random, tokenizer, excluded: set[str], batch_size: int, digits: int = DIGITS,
                   task: str = "arith"):
    """Left-padded batch: [BOS] prompt answer EOS*k (k in 0..MAX_EXTRA_EOS), answer region maskable."""
    rows, regions = [], []
    while len(rows) < batch_size:
        example = make_example(rng, digits, task)
        if example["prompt"] in excluded:
            continue
        prompt = tokenizer(example["prompt"])["input_ids"]
        answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
        # Variable-length answers (reverse: 5-9) are decoded into the longest one's length: the
        # padding after a short answer is EOS up to the end of the generation.
        extra = MAX_EXTRA_EOS if task == "arith" else MAX_EXTRA_EOS + 4
        answer += [tokenizer.eos_token_id] * rng.randint(0, extra)
        rows.append(prompt + answer)
        regions.append(len(answer))
    width = max(map(len, rows))
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long)
    maskable = torch.zeros(batch_size, width, dtype=torch.bool)
    for i, (row, region) in enumerate(zip(rows, regions)):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
        maskable[i, width - region:] = True
    return input_ids, attention_mask, maskable


def evaluate(model, tokenizer, examples: list[dict], mask_token_id: int) -> float:
    model.eval()
    gen_length = max(len(tokenizer(e["answer"], add_special_tokens=False)["input_ids"]) for e in examples)
    config = DiffusionSamplingConfig(gen_length=gen_length)
    correct = 0
    for start in range(0, len(examples), 128):
        chunk = examples[start:start + 128]
        batch = tokenizer([e["prompt"] for e in chunk], return_tensors="pt", padding=True)
        output = diffusion_generate(
            hf_logits_fn(model), batch["input_ids"], mask_token_id, config, batch["attention_mask"]
        )
        texts = tokenizer.batch_decode(output.generated, skip_special_tokens=True)
        correct += sum(exact_match(t, e["answer"]) for t, e in zip(texts, chunk))
    model.train()
    return correct / len(examples)


def _repository_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (the record is machine-independent)."""
    root = Path(__file__).resolve().parents[1]
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def argv_is_default(args, parser) -> bool:
    """True for the shipped model's settings (its TRAINING.json keeps its original fields)."""
    return all(getattr(args, k) == parser.get_default(k) for k in vars(args) if k != "output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llada", "dream"], default="llada",
                        help="checkpoint format; dream also changes the defaults (DREAM_DEFAULTS)")
    parser.add_argument("--task", choices=["arith", "reverse"], default="arith")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="compute threads (1 keeps runs bit-identical)")
    parser.add_argument("--digits", type=int, default=DIGITS, help="operand width (answers have digits + 1 tokens)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-kv-heads", type=int, default=4, help="< --n-heads: grouped-query attention")
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--mlp-hidden-size", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="special tokens take its top three ids")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved weights")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 2MB: several safetensors files + index")
    if parser.parse_known_args()[0].family == "dream":
        parser.set_defaults(**DREAM_DEFAULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.vocab_size, args.family)
    ids = special_ids(args.vocab_size)
    eval_set, calibration_set = held_out_sets(args.seed + 1, args.digits, args.task)
    excluded = {e["prompt"] for e in eval_set + calibration_set}
    if args.family == "dream":
        config = DreamConfig(
            hidden_size=args.d_model,
            num_attention_heads=args.n_heads,
            num_key_value_heads=args.n_kv_heads,
            num_hidden_layers=args.n_layers,
            intermediate_size=args.mlp_hidden_size,
            vocab_size=args.vocab_size,
            mask_token_id=ids[MASK],
            eos_token_id=ids[EOS],
            pad_token_id=ids[EOS],
            bos_token_id=ids[EOS],
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            architectures=["DreamModel"],
        )
        model = DreamModel(config)
    else:
        config = LLaDAConfig(
            d_model=args.d_model,
            n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads,
            n_layers=args.n_layers,
            mlp_hidden_size=args.mlp_hidden_size,
            mlp_ratio=2,
            vocab_size=args.vocab_size,
            embedding_size=args.vocab_size,
            mask_token_id=ids[MASK],
            eos_token_id=ids[EOS],
            pad_token_id=ids[EOS],
            bos_token_id=ids[BOS],
            max_sequence_length=512,
            rope_theta=10000.0,
            precision="fp32",
        )
        model = LLaDAModelLM(config)
    family = family_of(config)
    model.config._attn_implementation = "sdpa"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(1, args.steps + 1):
        input_ids, attention_mask, maskable = training_batch(
            rng, tokenizer, excluded, args.batch_size, args.digits, args.task
        )
        # Exact mask counts l ~ U{1..L} weighted by L / l: LLaDA's objective with lower variance
        # than Bernoulli masking at rate t weighted by 1 / t (answers here are only a few tokens).
        ratios = torch.rand(args.batch_size, generator=generator, dtype=torch.float64).clamp(min=1e-6)
        noisy, is_masked = mask_positions(input_ids, maskable, ratios, config.mask_token_id, generator, exact=True)
        # Row i predicts token i (Dream: its raw logits shifted by one, as decoding reads them).
        logits = family.predictions(model(input_ids=noisy, attention_mask=attention_mask).logits)
        token_loss = F.cross_entropy(logits[is_masked], input_ids[is_masked], reduction="none")
        weights = (maskable.sum(1) / is_masked.sum(1)).float()[:, None].expand_as(is_masked)[is_masked]
        loss = (token_loss * weights).sum() / maskable.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} {time.time() - started:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} held-out exact match {evaluate(model, tokenizer, eval_set, config.mask_token_id):.4f}", flush=True)

    output = args.output
    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.config._attn_implementation = None
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(staging, **({"max_shard_size": args.max_shard_size} if args.max_shard_size else {}))
    tokenizer.save_pretrained(staging)
    if args.family == "dream":
        # Dream's generation defaults, with this model's special ids (its `diffusion_generate` reads them).
        generation = {"alg": "entropy", "alg_temp": 0.0, "eps": 1e-3, "steps": 16, "temperature": 0.0,
                      "mask_token_id": config.mask_token_id, "bos_token_id": config.bos_token_id,
                      "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, rows in (("eval.jsonl", eval_set), ("calibration.jsonl", calibration_set)):
        with open(staging / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    (staging / "TRAINING.json").write_text(
        json.dumps({"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                    "threads": args.threads, "train_seconds": round(time.time() - started, 1),
                    **({} if argv_is_default(args, parser) else {"arguments": vars(args) | {"output": _repository_path(args.output)}})},
                   indent=1) + "\n"
    )
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    print(f"saved {output} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
