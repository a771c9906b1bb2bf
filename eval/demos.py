"""Choosing the in-context demos of each query: random from a fixed pool, or RICES (nearest CLIP image neighbours).

Both samplers are pure functions of ``(seed, query index)``: a query gets the same demos whichever process, batch or
resumed run evaluates it, which is what makes multi-process and resumed runs equal to a plain one.

RICES (Yang et al. 2022, used by OpenFlamingo): cosine similarity of CLIP image embeddings; the k most similar
support examples are the demos, the most similar placed last, nearest the query. Embeddings come from the
Flamingo model's own open_clip tower (its pooled, projected output) or from a separate open_clip model, and are
cached on disk in a safetensors file keyed by the example ids and the encoder's identity.

Episodic tasks (binding) draw no demos from a pool: ``flamingo_eval.binding.EpisodeDemos`` returns the query's own
episode's first k demos, through the same ``select`` call.

Example::

    sampler = RandomDemos(task_data.support, query_set_size=2048, seed=42)
    demos = sampler.select(query_index=7, query=task_data.query[7], k=4)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from flamingo.io import atomic_save_safetensors
from flamingo.processing import load_image


class RandomDemos:
    """k demos drawn without replacement from a pool of ``query_set_size`` support examples fixed by ``seed``."""

    def __init__(self, support: Sequence, *, query_set_size: int, seed: int):
        if not support:
            raise ValueError("The support (train) split is empty: there is nothing to draw demos from.")
        size = min(query_set_size, len(support))
        pool = np.random.default_rng(seed).choice(len(support), size=size, replace=False)
        self.pool = [support[i] for i in pool]
        self.seed = seed

    def select(self, *, query_index: int, query, k: int) -> list:
        if k > len(self.pool):
            raise ValueError(f"Asked for {k} demos but the demo pool has only {len(self.pool)} examples.")
        # One generator per (seed, query): independent of batching, process split and resumption.
        rng = np.random.default_rng([self.seed, query_index])
        return [self.pool[i] for i in rng.choice(len(self.pool), size=k, replace=False)]


class RicesDemos:
    """The k support examples most similar to the query image, least similar first.

    support_features: (N_support, D) and query_features: (N_query, D), L2-normalised, rows in example order.
    max_k: the most demos any call will ask for (e.g. the largest shot count), so the neighbours are searched once.

    The nearest ``max_k`` are found for a block of queries at a time with one matrix product and kept (N_query x
    max_k indices), so every shot count reuses them: one matrix-vector product per query and call would read the
    whole (N_support, D) matrix each time, hours for ImageNet's 1.28M training images.
    """

    def __init__(
        self, support: Sequence, support_features: torch.Tensor, query_features: torch.Tensor, *, max_k: int = 0
    ):
        if support_features.shape[0] != len(support):
            raise ValueError(f"Got {support_features.shape[0]} support features for {len(support)} support examples.")
        self.support = list(support)
        self.support_features = support_features.float()
        self.query_features = query_features.float()
        self.max_k = max_k
        self._nearest: dict[int, list[int]] = {}  # query index -> support indices, most similar first
        # Queries per block: a (block, N_support) similarity matrix of at most ~256 MB.
        self._block = max(1, min(1024, (64 << 20) // max(1, len(self.support))))

    def select(self, *, query_index: int, query, k: int) -> list:
        if k > len(self.support):
            raise ValueError(f"Asked for {k} demos but the support split has only {len(self.support)} examples.")
        nearest = self._nearest.get(query_index)
        if nearest is None or len(nearest) < k:
            self._search(query_index, max(k, min(self.max_k, len(self.support))))
            nearest = self._nearest[query_index]
        return [self.support[i] for i in reversed(nearest[:k])]

    def _search(self, query_index: int, k: int) -> None:
        start = query_index - query_index % self._block
        block = self.query_features[start : start + self._block]  # (b, D)
        nearest = (block @ self.support_features.T).topk(k, dim=-1).indices  # (b, k), most similar first
        for offset, row in enumerate(nearest.tolist()):
            self._nearest[start + offset] = row


class ImageEmbedder:
    """CLIP image embeddings for RICES: a callable (N, C, H, W) -> (N, D), its transform, and an identity string.

    Build with :meth:`from_flamingo` (the model's own tower; no extra weights) or :meth:`from_open_clip`.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], transform, identity: str, device):
        self.encode, self.transform, self.identity, self.device = encode, transform, identity, device

    @classmethod
    def from_flamingo(cls, model, processor) -> ImageEmbedder:
        visual = model.vision_encoder.visual

        def encode(images: torch.Tensor) -> torch.Tensor:
            return model.vision_encoder.embed(images.to(model.device))

        cfg = model.config
        return cls(
            encode, processor.image_transform, _identity(cfg.vision_model, cfg.vision_pretrained, visual), model.device
        )

    @classmethod
    def from_open_clip(cls, name: str, pretrained: str | None, device) -> ImageEmbedder:
        import open_clip

        clip, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        clip.eval()
        return cls(
            lambda x: clip.encode_image(x.to(device)), transform, _identity(name, pretrained, clip.visual), device
        )

    @torch.no_grad()
    def embed(self, paths: Sequence[Path], *, batch_size: int = 64, desc: str = "RICES features") -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of the image files, on the CPU."""
        chunks = []

        def load(path):
            return self.transform(load_image(path))

        # Decoding and resizing in one thread took hours for ImageNet's 1.28M training images (PIL releases the GIL).
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
                images = torch.stack(list(pool.map(load, paths[start : start + batch_size])))
                features = self.encode(images).float()
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def _identity(name: str | None, pretrained: str | None, visual: torch.nn.Module) -> str:
    # The name and tag alone could hide a retrained tower saved to the same path; a few weights pin it down cheaply.
    params = list(visual.parameters())
    digest = hashlib.sha256()
    for p in (params[0], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return f"{name}|{pretrained}|{digest.hexdigest()[:16]}"


def cached_features(
    examples: Sequence,
    embedder: ImageEmbedder,
    *,
    cache_dir: Path | None,
    batch_size: int = 64,
    desc: str = "RICES features",
) -> torch.Tensor:
    """Embeddings of ``examples``' images, (N, D), read from / written to ``cache_dir`` when given.

    The file name hashes the example ids, image paths and the embedder identity, so a different split, subset or
    encoder never reads stale features.
    """
    key_source = json.dumps([embedder.identity, [str(e.id) for e in examples], [str(e.image) for e in examples]])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:24]
    path = None if cache_dir is None else Path(cache_dir) / f"rices-{key}.safetensors"
    if path is not None and path.is_file():
        features = load_file(path)["features"]
        if features.shape[0] == len(examples):
            return features
    # VQAv2's 443k training questions ask about 83k images: embed each image file once.
    rows: dict[str, int] = {}
    for e in examples:
        rows.setdefault(str(e.image), len(rows))
    unique = embedder.embed([Path(image) for image in rows], batch_size=batch_size, desc=desc)
    features = unique[[rows[str(e.image)] for e in examples]] if len(rows) < len(examples) else unique
    if path is not None:
        atomic_save_safetensors(
            path, {"features": features}, metadata={"identity": embedder.identity, "count": str(len(examples))}
        )
    return features
