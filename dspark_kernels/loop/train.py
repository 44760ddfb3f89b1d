"""Train the loop's models on the CPU: a byte-level target and a distilled DSpark drafter.

The corpus is text every machine with Python has: the standard library's ``.py``
files (sorted, a fixed byte budget, files joined by the EOS byte 0). The target
is trained by next-byte cross-entropy; the drafter by the DSpark losses against
the frozen target on the same text:

* CE: ``−Σ_v p_v log q_v`` with ``p`` the target's next-token distribution at the
  block position and ``q`` the drafter's (base + Markov head, previous token taken
  from the data, as drafting sees it once the prefix is accepted);
* TV: ``½ Σ_v |p_v − q_v|`` (one minus the acceptance probability);
* BCE of the confidence head against ``Σ_v min(p_v, q_v)``, the probability that
  speculative sampling accepts the position given its prefix was accepted.

``python -m dspark_kernels.loop.train`` trains both and writes the weights shipped
with the package (``weights/target.pt``, ``weights/drafter.pt``, fp16, with
``weights/settings.json``: every setting, the corpus hash, the seed, the held-out
bits per byte and each file's sha256, checked on load). The main job loads those;
models trained by ``load_or_train(..., retrain=True)`` or with other configs are
cached (``$DSPARK_CACHE`` or ``~/.cache/dspark_kernels``) under a key made of the
configs, the training settings and the corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import Drafter, DrafterConfig, Target, TargetConfig

EOS = 0   # the byte that ends a file (never inside Python source)


@dataclass(frozen=True)
class TrainConfig:
    corpus_bytes: int = 6_000_000
    seq_len: int = 256
    batch: int = 16
    target_steps: int = 400
    target_lr: float = 3e-3
    drafter_steps: int = 1500
    drafter_lr: float = 3e-3
    drafter_anchors: int = 16     # blocks per sequence per step
    drafter_gamma: int = 8
    seed: int = 0


def stdlib_corpus(max_bytes: int, root: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first ``max_bytes`` of the standard library's sorted ``.py`` files, EOS-joined (uint8)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    chunks, names, total = [], [], 0
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if EOS in data:
            continue
        chunks.append(data + bytes([EOS]))
        names.append(str(p.relative_to(root)))
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python source found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).clone(), names


def _batches(corpus: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    hi = corpus.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, hi, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        yield corpus[idx].long()


def _lr(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _optimize(params, steps: int, peak_lr: float, step_loss, log, label: str) -> list[float]:
    """AdamW (β 0.9 / 0.95, weight decay 0.01), warm-up then cosine, gradient norm clipped at 1.

    ``step_loss(step)`` returns the loss tensor and a dict of named scalars to log.
    Returns the loss per step.
    """
    params = list(params)
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.95))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, peak_lr)
        loss, parts = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == steps - 1):
            shown = "  ".join(f"{k} {float(v):.3f}" for k, v in parts.items())
            log(f"  {label} step {step:4d}/{steps}  {shown}  ({time.perf_counter() - t0:.0f} s)")
    return losses


def train_target(target: Target, corpus: torch.Tensor, tc: TrainConfig, log=print) -> list[float]:
    """Next-byte cross-entropy; returns the loss per step."""
    gen = torch.Generator().manual_seed(tc.seed)
    data = _batches(corpus, tc.seq_len, tc.batch, gen)

    def step_loss(_step):
        x = next(data)
        logits, _ = target.forward_dense(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return loss, {"loss (nats/byte)": loss.detach()}

    target.train()
    losses = _optimize(target.parameters(), tc.target_steps, tc.target_lr, step_loss, log, "target")
    target.eval()
    return losses


def distill_losses(drafter: Drafter, target: Target, x: torch.Tensor, anchors: torch.Tensor, gamma: int):
    """(CE, TV, BCE) of the drafter against the frozen target on tokens ``x [Bt, S]``."""
    with torch.no_grad():
        t_logits, hidden = target.forward_dense(x)
        pos = anchors[..., None] + torch.arange(gamma)                         # [Bt, A, γ]
        p = torch.softmax(t_logits.gather(1, pos.reshape(x.shape[0], -1, 1).expand(-1, -1, t_logits.shape[-1]))
                          .reshape(*pos.shape, -1).float(), -1)
    logits, conf = drafter.forward_train(x, hidden, anchors, gamma)
    logq = torch.log_softmax(logits.float(), -1)
    q = logq.exp()
    ce = -(p * logq).sum(-1).mean()
    tv = 0.5 * (p - q).abs().sum(-1).mean()
    accept = torch.minimum(p, q).sum(-1).detach().clamp(0, 1)
    bce = F.binary_cross_entropy(conf.clamp(1e-6, 1 - 1e-6), accept)
    return ce, tv, bce


def train_drafter(drafter: Drafter, target: Target, corpus: torch.Tensor, tc: TrainConfig, log=print) -> list[float]:
    """Distil the drafter from the frozen target (CE + TV + BCE); returns the loss per step."""
    gen = torch.Generator().manual_seed(tc.seed + 1)
    data = _batches(corpus, tc.seq_len - 1, tc.batch, gen)
    gamma = tc.drafter_gamma

    def step_loss(_step):
        x = next(data)
        anchors = torch.randint(0, x.shape[1] - gamma + 1, (x.shape[0], tc.drafter_anchors), generator=gen)
        ce, tv, bce = distill_losses(drafter, target, x, anchors, gamma)
        return ce + tv + bce, {"CE": ce.detach(), "TV": tv.detach(), "BCE": bce.detach()}

    target.eval()
    frozen = [prm for prm in target.parameters() if prm.requires_grad]
    for prm in frozen:
        prm.requires_grad_(False)
    drafter.train()
    try:
        losses = _optimize([p for p in drafter.parameters() if p.requires_grad], tc.drafter_steps, tc.drafter_lr,
                           step_loss, log, "drafter")
    finally:
        drafter.eval()
        for prm in frozen:
            prm.requires_grad_(True)
    return losses


def cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark_kernels"))


def _cache_key(target_cfg, drafter_cfg, train_cfg, corpus: torch.Tensor) -> str:
    desc = json.dumps([target_cfg.to_dict(), drafter_cfg.to_dict(), asdict(train_cfg),
                       hashlib.sha256(corpus.numpy().tobytes()).hexdigest(), torch.__version__.split("+")[0],
                       "v2"], sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def load_or_train(target_cfg: TargetConfig | None = None, drafter_cfg: DrafterConfig | None = None,
                  train_cfg: TrainConfig | None = None, *, retrain: bool = False, log=print):
    """The trained (target, drafter, info).

    With no configs given and ``retrain=False``: the weights shipped with the package
    (``load_shipped``, hashes checked). Otherwise from the cache, else trained now (with
    the shipped settings unless configs are given) and cached. ``info["held_out"]`` is
    the held-out text of this machine's standard library (the prompts come from there).
    """
    shipped = not retrain and target_cfg is None and drafter_cfg is None and train_cfg is None \
        and (WEIGHTS_DIR / "settings.json").exists()
    if shipped:
        target, drafter, settings = load_shipped()
        tc = _config_from_dict(TrainConfig, settings["train_config"])
        corpus, _ = stdlib_corpus(tc.corpus_bytes)
        info = {"target_loss": settings["final_losses"]["target_nats_per_byte"],
                "drafter_loss": settings["final_losses"]["drafter"], "held_out_bpb": settings["held_out_bits_per_byte"],
                "cached": f"the shipped weights ({WEIGHTS_DIR.name}/, sha256 checked)", "settings": settings,
                "same_corpus": hashlib.sha256(corpus.numpy().tobytes()).hexdigest() == settings["corpus"]["sha256"],
                "held_out": split_corpus(corpus)[1]}
        return target, drafter, info
    if (WEIGHTS_DIR / "settings.json").exists() and target_cfg is None and drafter_cfg is None and train_cfg is None:
        settings = json.loads((WEIGHTS_DIR / "settings.json").read_text())
        target_cfg = _config_from_dict(TargetConfig, settings["target_config"])
        drafter_cfg = _config_from_dict(DrafterConfig, settings["drafter_config"])
        train_cfg = _config_from_dict(TrainConfig, settings["train_config"])
    target_cfg = target_cfg or TargetConfig()
    drafter_cfg = drafter_cfg or DrafterConfig()
    train_cfg = train_cfg or TrainConfig()
    corpus, files = stdlib_corpus(train_cfg.corpus_bytes)
    train_text, held_out = split_corpus(corpus)
    split = train_text.numel()
    torch.manual_seed(train_cfg.seed)
    target = Target(target_cfg)
    drafter = Drafter(drafter_cfg, target)
    path = cache_dir() / f"loop-{_cache_key(target_cfg, drafter_cfg, train_cfg, corpus)}.pt"
    if path.exists() and not retrain:
        state = torch.load(path, map_location="cpu", weights_only=False)
        target.load_state_dict(state["target"])
        drafter.load_state_dict(state["drafter"])
        info = state["info"]
        info["cached"] = str(path)
    else:
        if log:
            log(f"training the loop's models on {len(files)} stdlib files ({split / 1e6:.1f} MB; cached at {path})")
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        t_losses = train_target(target, train_text, train_cfg, log)
        t1 = time.perf_counter()
        drafter.init_from_target()
        d_losses = train_drafter(drafter, target, train_text, train_cfg, log)
        t2 = time.perf_counter()
        info = {"target_loss": sum(t_losses[-20:]) / 20, "drafter_loss": sum(d_losses[-20:]) / 20,
                "target_train_s": t1 - t0, "drafter_train_s": t2 - t1, "threads": threads,
                "corpus_files": len(files), "corpus_bytes": int(corpus.numel())}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"target": target.state_dict(), "drafter": drafter.state_dict(), "info": info}, tmp)
        tmp.replace(path)
        info["cached"] = None
    info["held_out"] = held_out
    return target.eval(), drafter.eval(), info


# --------------------------------------------------------------------------- shipped weights

WEIGHTS_DIR = Path(__file__).with_name("weights")
WEIGHT_FILES = {"target": "target.pt", "drafter": "drafter.pt"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_corpus(corpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training text, held-out text): the last 5 % is held out (the main job's prompts come from there)."""
    split = int(corpus.numel() * 0.95)
    return corpus[:split], corpus[split:]


@torch.no_grad()
def held_out_bits_per_byte(target: Target, held_out: torch.Tensor, seq_len: int = 256, batch: int = 32) -> float:
    """Mean next-byte cross-entropy in bits over ``held_out``, cut into windows of ``seq_len + 1`` bytes
    (each window starts without context: the number is a slight over-estimate of the model's rate)."""
    n = (held_out.numel() - 1) // seq_len
    windows = held_out[: n * seq_len + 1].long()
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[idx[i:i + batch]]
        logits, _ = target.forward_dense(x[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count / math.log(2)


@torch.no_grad()
def held_out_acceptance(drafter: Drafter, target: Target, held_out: torch.Tensor, gamma: int, seq_len: int = 256,
                        sequences: int = 32, seed: int = 1234) -> list[float]:
    """Per block position ``k``, the mean of ``Σ_v min(p_v, q_v)`` on held-out text: the chance that
    speculative sampling accepts draft ``k`` once its prefix is accepted."""
    gen = torch.Generator().manual_seed(seed)
    x = next(_batches(held_out, seq_len - 1, sequences, gen))
    anchors = torch.randint(0, x.shape[1] - gamma + 1, (x.shape[0], 8), generator=gen)
    t_logits, hidden = target.forward_dense(x)
    pos = anchors[..., None] + torch.arange(gamma)
    p = torch.softmax(t_logits.gather(1, pos.reshape(x.shape[0], -1, 1).expand(-1, -1, t_logits.shape[-1]))
                      .reshape(*pos.shape, -1).float(), -1)
    logits, _ = drafter.forward_train(x, hidden, anchors, gamma)
    q = torch.softmax(logits.float(), -1)
    return torch.minimum(p, q).sum(-1).mean((0, 1)).tolist()


def _round_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to ``dtype`` and back, so what is evaluated (and distilled from) is what is shipped."""
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(prm.to(dtype).to(prm.dtype))


def _config_from_dict(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_shipped(directory: Path | None = None):
    """(target, drafter, settings) from the weights shipped in the package, hashes checked.

    ``settings.json`` beside the weights records the configs, every training
    setting, the corpus, the seed, the held-out bits per byte and each file's
    sha256; a file whose hash differs raises (a corrupt or hand-edited checkpoint).
    """
    directory = Path(directory or WEIGHTS_DIR)
    settings = json.loads((directory / "settings.json").read_text())
    for name, fname in WEIGHT_FILES.items():
        got, want = _sha256(directory / fname), settings["sha256"][fname]
        if got != want:
            raise RuntimeError(f"{directory / fname}: sha256 {got} does not match settings.json ({want})")
    target = Target(_config_from_dict(TargetConfig, settings["target_config"]))
    drafter = Drafter(_config_from_dict(DrafterConfig, settings["drafter_config"]), target)
    for name, module in (("target", target), ("drafter", drafter)):
        state = torch.load(directory / WEIGHT_FILES[name], map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() for k, v in state.items()})
    return target.eval(), drafter.eval(), settings


def train_and_save(out: Path, target_cfg: TargetConfig, drafter_cfg: DrafterConfig, tc: TrainConfig,
                   dtype: torch.dtype = torch.float16, log=print, reuse_target: Path | None = None,
                   argv: list[str] | None = None) -> dict:
    """Train both models from the corpus and the seed, round them to ``dtype`` and write
    ``target.pt``, ``drafter.pt`` and ``settings.json`` into ``out``. Returns the settings.

    ``reuse_target``: a folder written by an earlier run with the same target config and
    target settings (corpus, seed, steps, lr); its target is loaded (hash checked) instead
    of trained again, which gives the same weights: the drafter's initial weights and
    data stream do not depend on the target's training."""
    out = Path(out)
    corpus, files = stdlib_corpus(tc.corpus_bytes)
    train_text, held_out = split_corpus(corpus)
    torch.manual_seed(tc.seed)
    target = Target(target_cfg)
    drafter = Drafter(drafter_cfg, target)
    threads = torch.get_num_threads()
    log(f"training on {len(files)} stdlib files ({train_text.numel() / 1e6:.2f} MB, {threads} threads) -> {out}")
    t0 = time.perf_counter()
    reused = None
    if reuse_target is not None:
        old = json.loads((Path(reuse_target) / "settings.json").read_text())
        keys = ("corpus_bytes", "seq_len", "batch", "target_steps", "target_lr", "seed")
        if old["target_config"] != json.loads(json.dumps(target_cfg.to_dict())) or any(old["train_config"][k] != asdict(tc)[k] for k in keys) \
                or old["dtype"] != str(dtype).removeprefix("torch."):
            raise ValueError(f"reuse_target: {reuse_target} was trained with other target settings")
        reused_target, _, _ = load_shipped(reuse_target)
        target.load_state_dict(reused_target.state_dict())
        t_losses = [old["final_losses"]["target_nats_per_byte"]]
        t_train_s = old["train_seconds"]["target"]
        reused = {"from": str(reuse_target), "target.pt sha256": old["sha256"]["target.pt"]}
        log(f"target: reused from {reuse_target} (trained in {t_train_s:.0f} s)")
    else:
        t_losses = train_target(target, train_text, tc, log)
        _round_to(target, dtype)
    t1 = time.perf_counter()
    if reused is None:
        t_train_s = t1 - t0
    bpb = held_out_bits_per_byte(target, held_out, tc.seq_len)
    log(f"target: held-out {bpb:.4f} bits/byte ({t1 - t0:.0f} s)")
    drafter.init_from_target()
    d_losses = train_drafter(drafter, target, train_text, tc, log)
    _round_to(drafter, dtype)
    t2 = time.perf_counter()
    accept = held_out_acceptance(drafter, target, held_out, tc.drafter_gamma)
    log("drafter: held-out acceptance per block position " + " ".join(f"{a:.3f}" for a in accept)
        + f" ({t2 - t1:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("target", target), ("drafter", drafter)):
        torch.save({k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()},
                   out / WEIGHT_FILES[name])
    settings = {
        "target_config": target_cfg.to_dict(), "drafter_config": drafter_cfg.to_dict(), "train_config": asdict(tc),
        "seed": tc.seed, "dtype": str(dtype).removeprefix("torch."),
        "corpus": {"what": "the Python standard library's sorted .py files (no site-packages, no test dirs), "
                           "EOS (byte 0)-joined, first corpus_bytes; last 5 % held out",
                   "python": sysconfig.get_python_version(), "files": len(files), "bytes": int(corpus.numel()),
                   "sha256": hashlib.sha256(corpus.numpy().tobytes()).hexdigest(),
                   "held_out_bytes": int(held_out.numel())},
        "held_out_bits_per_byte": bpb,
        "held_out_acceptance_per_position": accept,
        "final_losses": {"target_nats_per_byte": sum(t_losses[-20:]) / min(20, len(t_losses)),
                         "drafter": sum(d_losses[-20:]) / min(20, len(d_losses))},
        "train_seconds": {"target": t_train_s, "drafter": t2 - t1}, "threads": threads, "target_reused": reused,
        "torch": torch.__version__, "command": " ".join(["python -m dspark_kernels.loop.train"] + list(argv or [])),
        "sha256": {fname: _sha256(out / fname) for fname in WEIGHT_FILES.values()},
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    return settings


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dspark_kernels.loop.train",
                                 description="Train the loop's target and drafter and write the weights shipped "
                                             "with the package (settings.json beside them).")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help=f"output folder (default {WEIGHTS_DIR})")
    ap.add_argument("--target-steps", type=int, default=TrainConfig.target_steps)
    ap.add_argument("--drafter-steps", type=int, default=TrainConfig.drafter_steps)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reuse-target", default=None, metavar="DIR",
                    help="load the target from an earlier run's folder (same target settings) instead of training it")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(target_steps=args.target_steps, drafter_steps=args.drafter_steps, seed=args.seed)
    settings = train_and_save(Path(args.out), TargetConfig(), DrafterConfig(), tc,
                              reuse_target=Path(args.reuse_target) if args.reuse_target else None,
                              argv=sys.argv[1:] if argv is None else list(argv))
    print(json.dumps({k: settings[k] for k in ("held_out_bits_per_byte", "held_out_acceptance_per_position",
                                                "sha256")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
