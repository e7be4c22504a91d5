"""The ``make run`` task: a small byte-level GPT on the Python standard library's own source.

Every machine with Python has the text: the ``*.py`` files at the top of the ``stdlib``
folder that :mod:`sysconfig` names (about 4.7 MB on CPython 3.11). Files are split, not
bytes: every tenth file (in sorted order) is held out, so the held-out loss is measured on
modules the model never saw. Tokens are raw bytes (vocabulary 256): no tokenizer to
install, and any text round-trips.

The model is a GPT-2-style decoder (pre-norm blocks, causal self-attention through
``scaled_dot_product_attention``, GELU MLP, learned positions). Pure torch, no Ray: Ray
workers import :func:`make_model`, :func:`loss` and the dataset from here by name.
"""
from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256  # bytes
HELD_OUT_EVERY = 10  # file i (sorted) is held out when i % 10 == 0


@dataclass(frozen=True)
class GPTConfig:
    """Model size; the defaults are what ``make run`` trains (~0.85M parameters)."""

    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = VOCAB

    def __post_init__(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "n_embd", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive int")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             f"use a multiple of {self.n_head}")


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.fc_proj = nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Decoder-only transformer over bytes; ``forward(idx)`` gives logits ``(B, T, vocab)``."""

    def __init__(self, c: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)  # untied: one tensor per name
        self.apply(_init)
        for block in self.blocks:  # GPT-2: residual projections scaled down by depth
            for proj in (block.proj, block.fc_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class ModelFactory:
    """A picklable zero-arg factory: ``ModelFactory(config)()`` builds a fresh :class:`GPT`."""

    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        self.config = config

    def __call__(self) -> GPT:
        return GPT(self.config)


make_model = ModelFactory()  # the default size, as ``make run`` trains it


def loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) of ``(inputs, targets)``."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class ByteWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``block_size + 1`` bytes; sample i is ``(x, y)``, y = x shifted by one.

    Args:
        data: the text as a 1-D ``uint8`` tensor.
        block_size: tokens per sample.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"data must be a 1-D uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
        if len(data) < block_size + 1:
            raise ValueError(f"{len(data)} bytes hold no window of block_size + 1 = {block_size + 1}")
        self.data, self.block_size = data, block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        w = self.data[i * self.block_size:(i + 1) * self.block_size + 1].long()
        return w[:-1], w[1:]


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``*.py`` files at the top of the standard library folder, sorted by name.

    Raises:
        FileNotFoundError: the folder holds no ``*.py`` file (a stripped Python install).
    """
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in {folder}: pass another folder of text (root=...)")
    return files


def split_text(files: list[Path], max_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` byte tensors: file i goes to held-out when ``i % 10 == 0``.

    Args:
        files: text files in a fixed order.
        max_bytes: stop reading once the two parts together hold this many bytes (None: all).
    """
    train: list[bytes] = []
    held_out: list[bytes] = []
    total = 0
    for i, path in enumerate(files):
        text = path.read_bytes()
        (held_out if i % HELD_OUT_EVERY == 0 else train).append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return _bytes_tensor(train), _bytes_tensor(held_out)


def _bytes_tensor(parts: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8) if parts else torch.empty(0, dtype=torch.uint8)


def datasets(block_size: int = GPTConfig.block_size, max_bytes: int | None = None,
             root: str | Path | None = None) -> tuple[ByteWindows, ByteWindows]:
    """Train and held-out :class:`ByteWindows` over the standard library's source."""
    train, held = split_text(stdlib_files(root), max_bytes)
    return ByteWindows(train, block_size), ByteWindows(held, block_size)


def eval_windows(data: ByteWindows, samples: int = 128) -> torch.utils.data.Subset:
    """``samples`` windows spread evenly through ``data``: the held-out set of every evaluation."""
    n = min(samples, len(data))
    return torch.utils.data.Subset(data, [i * len(data) // n for i in range(n)])


@torch.no_grad()
def evaluate(model: nn.Module, data: ByteWindows, samples: int = 128, batch: int = 32) -> float:
    """Mean loss over :func:`eval_windows` of ``data`` (the same ones every call)."""
    model.eval()
    windows = eval_windows(data, samples)
    total = 0.0
    for s in range(0, len(windows), batch):
        xs, ys = zip(*(windows[i] for i in range(s, min(s + batch, len(windows)))))
        total += loss(model, [torch.stack(xs), torch.stack(ys)]).item() * len(xs)
    return total / len(windows)


@torch.no_grad()
def generate(model: GPT, prompt: str, new_bytes: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Continue ``prompt`` by ``new_bytes`` sampled bytes; decoded as UTF-8 (bad bytes replaced)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long)
    for _ in range(new_bytes):
        logits = model(idx[:, -model.config.block_size:])[0, -1] / temperature
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")
