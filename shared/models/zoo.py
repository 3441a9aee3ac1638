"""The trained tiny models every lab reuses: ``load("target")`` and ``load("draft")``.

- target: 10 blocks, dim 128, GQA 4:2 (2.0 M parameters), trained with LayerSkip's early-exit
  loss at block 2, so ``target(tokens, n_layers=2)`` is a drafter sharing its weights.
  Validation loss 1.28 nats/byte (exit after block 2: 1.61).
- draft: 1 block, dim 128 (0.25 M parameters), trained alone on the same bytes: 1.50 nats/byte.

The checkpoints ship in shared/models/checkpoints/ (fp16 weights, 4 MB + 0.5 MB) so CI pays
nothing for training. Each records the recipe (model + training config) that made it; when the
recipe here changes, the shipped file no longer matches and ``load`` trains the new recipe once
into build/models/. Cost on this 2-core CPU (shared with other jobs, one torch thread): target
35 min, draft 4 min; on an idle machine roughly half. Regenerate the shipped files with
``python -m shared.models.zoo --ship --threads 1``. Training is seeded (tests/test_models.py
checks that a short run repeats exactly); bitwise-equal weights across machines additionally
need the same torch version, thread count and CPU kernels.

The corpus is this Python's standard library (shared/data.py), so the validation split moves
with the interpreter, and `held_out_tokens` refuses a machine whose corpus differs from the one
the checkpoints stored. Benchmarks that only need a few prompts read `held_out_prompts`: windows
cut once from the checkpoints' own split and shipped beside them (checkpoints/held-out.json,
2 KB, hash-checked), so any Python can run them on text the models never trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from shared.data import corpus_fingerprint, train_val_tokens
from shared.models.llama import Llama, LlamaConfig
from shared.paths import build_dir
from shared.train import TrainConfig, train

SHIPPED = Path(__file__).parent / "checkpoints"
HELD_OUT = SHIPPED / "held-out.json"
# The shipped sample: window i starts at i · (len // 8) of the split, 256 bytes (max_seq_len) each.
HELD_OUT_WINDOWS, HELD_OUT_LENGTH = 8, 256

RECIPES: dict[str, tuple[LlamaConfig, TrainConfig]] = {
    "target": (
        LlamaConfig(vocab_size=256, dim=128, n_layers=10, n_heads=4, n_kv_heads=2, ffn_dim=384,
                    max_seq_len=256),
        TrainConfig(steps=1500, batch_size=8, seq_len=256, lr=2e-3, warmup=100, seed=0,
                    exit_layer=2, exit_weight=0.5),
    ),
    "draft": (
        LlamaConfig(vocab_size=256, dim=128, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=384,
                    max_seq_len=256),
        TrainConfig(steps=1500, batch_size=8, seq_len=256, lr=3e-3, warmup=100, seed=0),
    ),
}


def recipe(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(RECIPES)}")
    model_cfg, train_cfg = RECIPES[name]
    return {"model": asdict(model_cfg), "train": asdict(train_cfg)}


def recipe_hash(name: str) -> str:
    return hashlib.sha256(json.dumps(recipe(name), sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_paths(name: str) -> list[Path]:
    """Where `load` looks, in order: the shipped file, then the build/ cache."""
    return [SHIPPED / f"{name}.pt", build_dir() / "models" / f"{name}-{recipe_hash(name)}.pt"]


def train_and_save(name: str, path: Path, *, progress: bool = True) -> dict:
    """Train `name`'s recipe from its seed and write the checkpoint (fp16 weights) to `path`."""
    model_cfg, train_cfg = RECIPES[name]
    train_tokens, val_tokens = train_val_tokens()
    torch.manual_seed(train_cfg.seed)
    model = Llama(model_cfg)
    result = train(model, train_tokens, val_tokens, train_cfg, progress=progress, desc=name)
    ckpt = {
        "recipe": recipe(name), "recipe_hash": recipe_hash(name),
        "state_dict": {k: v.half() for k, v in model.state_dict().items()},
        "losses": result.losses, "val_loss": result.val_loss,
        "val_loss_exit": result.val_loss_exit, "train_seconds": result.seconds,
        "corpus": corpus_fingerprint(), "torch": str(torch.__version__),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def checkpoint(name: str, *, train_if_missing: bool = True) -> dict:
    """The checkpoint dict of `name` whose recipe matches the current one (trains if none)."""
    for path in checkpoint_paths(name):
        if path.exists():
            ckpt = torch.load(path, weights_only=True)
            if ckpt["recipe_hash"] == recipe_hash(name):
                return ckpt
    if not train_if_missing:
        raise FileNotFoundError(f"no checkpoint of {name!r} for recipe {recipe_hash(name)}")
    return train_and_save(name, checkpoint_paths(name)[1])


def held_out_tokens(*names: str) -> torch.Tensor:
    """The validation split the models `names` were scored on, as 1-D int64 tokens, after
    checking that this machine's corpus is the one each checkpoint was trained on (the
    fingerprint it stores). The corpus is this Python's standard library: under another Python
    the split moves, and text cut from the "held-out" tail could be text a model trained on."""
    if not names:
        raise ValueError("names must list at least one model, e.g. held_out_tokens('target')")
    here = corpus_fingerprint()
    for name in names:
        stored = checkpoint(name)["corpus"]
        if stored != here:
            raise ValueError(f"corpus fingerprint {here} (this Python's stdlib) differs from the "
                             f"{stored} that {name!r} was trained on: its held-out split is not "
                             f"held out here; retrain with `python -m shared.models.zoo {name}`")
    return train_val_tokens()[1]


def _spread(val: torch.Tensor) -> list[torch.Tensor]:
    """The sample's windows of a validation split (one definition for writing and fallback)."""
    stride = len(val) // HELD_OUT_WINDOWS
    return [val[i * stride:i * stride + HELD_OUT_LENGTH] for i in range(HELD_OUT_WINDOWS)]


def _digest(windows: list[bytes]) -> str:
    return hashlib.sha256(b"".join(windows)).hexdigest()


def write_held_out(path: Path = HELD_OUT) -> dict:
    """Cut the held-out sample from this machine's split and write it to `path`. Refuses (via
    `held_out_tokens`) unless this corpus is the one every recipe's checkpoint was trained on."""
    val = held_out_tokens(*sorted(RECIPES))
    windows = [bytes(w.tolist()) for w in _spread(val)]
    sample = {"corpus": corpus_fingerprint(), "python": platform.python_version(),
              "held_out_tokens": len(val), "stride": len(val) // HELD_OUT_WINDOWS,
              "length": HELD_OUT_LENGTH, "sha256": _digest(windows),
              "windows": [w.decode("utf-8") for w in windows]}   # strict: exact bytes back
    path.write_text(json.dumps(sample, indent=1) + "\n")
    return sample


def held_out_sample(path: Path | None = None) -> tuple[str, list[torch.Tensor]]:
    """The shipped sample (or the one at `path`): (the corpus fingerprint it was cut from, its
    windows as int64 tokens), after checking the windows' SHA-256 against the recorded one."""
    path = path or HELD_OUT
    sample = json.loads(path.read_text())
    windows = [w.encode("utf-8") for w in sample["windows"]]
    if _digest(windows) != sample["sha256"] or len(windows) != HELD_OUT_WINDOWS or any(
            len(w) != HELD_OUT_LENGTH for w in windows):
        raise ValueError(f"{path}: its windows are not the {HELD_OUT_WINDOWS} × "
                         f"{HELD_OUT_LENGTH} bytes of SHA-256 {sample['sha256'][:12]} it records; "
                         f"regenerate it with `python -m shared.models.zoo --held-out`")
    return sample["corpus"], [torch.tensor(list(w), dtype=torch.long) for w in windows]


def held_out_prompts(count: int, length: int, *names: str) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens, spread evenly over the validation split the models
    `names` were scored on: windows 0, 8 / count, ... of the shipped sample (each 1-D int64).

    The sample is read whatever this machine's corpus is, provided it was cut from the corpus
    every model in `names` stored; models trained on another corpus (a new recipe) get the same
    windows cut from this machine's split instead, which `held_out_tokens` checks is theirs."""
    if not names:
        raise ValueError("names must list at least one model, e.g. held_out_prompts(2, 48, "
                         "'target')")
    if not isinstance(count, int) or count < 1 or HELD_OUT_WINDOWS % count:
        raise ValueError(f"count must divide {HELD_OUT_WINDOWS} (the shipped windows), got "
                         f"{count!r}")
    if not isinstance(length, int) or not 1 <= length <= HELD_OUT_LENGTH:
        raise ValueError(f"length must be in [1, {HELD_OUT_LENGTH}], got {length!r}")
    corpus, windows = held_out_sample()
    if any(checkpoint(name)["corpus"] != corpus for name in names):
        windows = _spread(held_out_tokens(*names))
    return [w[:length] for w in windows[::HELD_OUT_WINDOWS // count]]


def load(name: str, *, train_if_missing: bool = True) -> Llama:
    """The trained model `name` ("target" or "draft") in float32, eval mode, no grad needed."""
    ckpt = checkpoint(name, train_if_missing=train_if_missing)
    model = Llama(LlamaConfig(**ckpt["recipe"]["model"]))
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the zoo's models and cache them.")
    parser.add_argument("names", nargs="*", default=sorted(RECIPES))
    parser.add_argument("--ship", action="store_true",
                        help="write into shared/models/checkpoints/ (the committed files), "
                             "then the held-out sample cut from the split they were scored on")
    parser.add_argument("--held-out", action="store_true",
                        help="only rewrite the shipped held-out sample (checkpoints/held-out.json)"
                             " from this machine's corpus, which must be the checkpoints'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 trains faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.held_out:
        print(f"held-out sample of corpus {write_held_out()['corpus']} -> {HELD_OUT}")
        return
    for name in args.names:
        path = SHIPPED / f"{name}.pt" if args.ship else checkpoint_paths(name)[1]
        ckpt = train_and_save(name, path)
        print(f"{name}: val loss {ckpt['val_loss']:.3f} nats/byte (exit: "
              f"{ckpt['val_loss_exit']}), {ckpt['train_seconds']:.0f} s -> {path}")
    if args.ship:
        write_held_out()


if __name__ == "__main__":
    main()
