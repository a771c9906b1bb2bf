"""The micro model's backbones, trained from nothing: a BPE tokenizer, a tiny open_clip ResNet and a tiny Llama.

Each step is a function of its config and seed and writes what a hub download would give: the tokenizer and LM as a
``save_pretrained`` folder, the CLIP as an open_clip model config (JSON) plus a state-dict file. Flamingo then loads
them through its ordinary loading code (``create_model_and_processor(vision_model=..., lang_model=...)``).

Example::

    tokenizer = train_tokenizer(out / "tokenizer")
    vision = train_clip(tokenizer, ClipRecipe(), out / "clip")       # {"name": "micro-resnet", "config", "weights"}
    train_lm(tokenizer, LMRecipe(), out / "lm")
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flamingo.micro.world import IMAGE_SIZE, SYLLABLES, captions, make_scene, render, rng_for
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_train.config import ScheduleConfig
from flamingo_train.optim import build_scheduler

from .texts import ARTICLE, KIND_TOKENS, lm_document, tokenizer_corpus

CLIP_NAME = "micro-resnet"
# open_clip's OpenAI normalisation, which FlamingoProcessor applies for open_clip towers.
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def train_tokenizer(out_dir: Path, *, vocab_size: int = 400, num_documents: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE learnt from the LM corpus, with bos added in front of every text (Llama-style).

    Every nonsense-word syllable is an added token (with and without a leading space), so each word, train or test,
    is exactly two tokens made of pieces the LM has seen: a test word is new as a word, never as tokens. Flamingo's
    ``<image>`` and ``<|endofchunk|>`` and the kind tokens (:data:`.texts.KIND_TOKENS`) are special tokens, since
    the LM reads its documents in Flamingo's layout.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(tokenizer_corpus(num_documents), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_tokens([AddedToken(" " + s, normalized=False) for s in SYLLABLES]
                         + [AddedToken(s, normalized=False) for s in SYLLABLES])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"extra_special_tokens": [END_OF_CHUNK_TOKEN, MEDIA_TOKEN, *KIND_TOKENS]},
                            replace_extra_special_tokens=False)
    fast.save_pretrained(out_dir)
    return fast


@dataclass
class ClipRecipe:
    """The tiny CLIP: a ResNet (open_clip's ModifiedResNet, as in CLIP's RN50, one bottleneck block per stage) over
    the 64-px scenes, and a 2-layer text transformer.

    Flamingo reads the feature map of stage 3 (``FlamingoRecipe.vision_feature_stage``): 4 x 4 positions of 256
    channels. A convolution's features are local, so each position says what the object around it is. Measured
    with a linear probe on frozen features of held-out scenes (the shape of the object at a position, chance 0.2):
    0.997 at stage 3 (0.86 at stage 2). The patch tokens of ViT towers trained the same way carried little shape
    (0.42 for 2 layers x 96, 0.59 for 4 layers; 0.38 is the patch's own pixels): the contrastive loss on their
    mean lets any patch hold any object's information, and the micro model's VQA stayed at 60-66%.
    """

    width: int = 16
    layers: tuple[int, ...] = (1, 1, 1, 1)
    embed_dim: int = 64
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    num_scenes: int = 8000
    # One-object scenes make shape the only thing telling apart the images of a colour and size in a batch; in
    # many-object scenes the colours alone nearly identify the caption, and shape is learnt slowly.
    single_object_share: float = 0.5
    seed: int = 0


def clip_model_config(recipe: ClipRecipe, vocab_size: int) -> dict:
    """The open_clip model config. The text vocabulary has one extra id, the end-of-text token that open_clip's
    argmax pooling looks for, above every real token id."""
    return {
        "embed_dim": recipe.embed_dim,
        "vision_cfg": {"image_size": IMAGE_SIZE, "width": recipe.width, "layers": list(recipe.layers)},
        "text_cfg": {"context_length": 32, "vocab_size": vocab_size + 1, "width": 128, "heads": 4, "layers": 2},
    }


def _pixels(image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (array - _MEAN) / _STD


def _caption_ids(tokenizer, texts: list[str], end_of_text: int) -> torch.Tensor:
    ids = torch.zeros(len(texts), 32, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:31] + [end_of_text]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def train_clip(tokenizer, recipe: ClipRecipe, out_dir: Path) -> dict:
    """Contrastive training on (scene, caption) pairs with open_clip's own model and loss.

    Returns ``{"name", "config", "weights"}``: register ``config`` with ``open_clip.add_model_config`` and
    ``open_clip.create_model(name, pretrained=weights)`` rebuilds the model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{CLIP_NAME}.json"
    config_path.write_text(json.dumps(clip_model_config(recipe, len(tokenizer)), indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(recipe.seed)
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    scenes = []
    for i in range(recipe.num_scenes):
        scene_rng = rng_for("train", "clip-scene", i)
        single = scene_rng.random() < recipe.single_object_share
        scenes.append(make_scene(scene_rng, num_shapes=1 if single else None))
    pixels = torch.stack([_pixels(render(s)) for s in tqdm(scenes, desc="clip: rendering", leave=False)])
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1)
    schedule = build_scheduler(optimizer, ScheduleConfig(kind="cosine", warmup_steps=50), max_steps=recipe.steps)
    rng = random.Random(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc="clip", leave=False)
    for _ in bar:
        batch = rng.sample(range(len(scenes)), recipe.batch_size)
        texts = [rng.choice(captions(scenes[i])) for i in batch]
        image_features, text_features, scale = model(pixels[batch], _caption_ids(tokenizer, texts, len(tokenizer)))
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    weights = out_dir / "open_clip_model.pt"
    torch.save(model.state_dict(), weights)
    return {"name": CLIP_NAME, "config": str(config_path), "weights": str(weights),
            "retrieval_top1": clip_retrieval(model, tokenizer)}


@torch.no_grad()
def clip_retrieval(model, tokenizer, num_scenes: int = 256) -> float:
    """Held-out image -> caption top-1 accuracy among ``num_scenes`` test scenes (chance ``1 / num_scenes``)."""
    model.eval()
    scenes = [make_scene(rng_for("test", "clip-scene", i)) for i in range(num_scenes)]
    images = model.encode_image(torch.stack([_pixels(render(s)) for s in scenes]), normalize=True)
    texts = model.encode_text(_caption_ids(tokenizer, [captions(s)[0] for s in scenes], len(tokenizer)),
                              normalize=True)
    return (images @ texts.T).argmax(1).eq(torch.arange(num_scenes)).float().mean().item()


@dataclass
class LMRecipe:
    """The tiny Llama and its pretraining on the micro world's text (:func:`flamingo_train.recipes.texts.lm_document`).

    From ``soft_kinds_from`` (a fraction of ``steps``) on, each kind token's input embedding is, with probability
    ``soft_kinds_share``, mixed with the embedding of `` a``: ``u * kind + (1 - u) * article``, ``u ~ U(0, 1)``
    (see :mod:`.texts`). The first half trains on hard tokens, so the copying circuit forms first (with soft tokens
    from the start, or with ``<image>`` in place of a third of the kind tokens, it did not form in 2000 steps).
    """

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 96
    lr: float = 1e-3
    soft_kinds_from: float = 0.5
    soft_kinds_share: float = 0.5
    seed: int = 0


def _token_stream(tokenizer, seq_len: int):
    """Pretraining documents, each followed by eos, packed into rows of ``seq_len`` tokens."""
    buffer: list[int] = []
    index = 0
    while True:
        buffer += tokenizer(lm_document(index))["input_ids"] + [tokenizer.eos_token_id]
        index += 1
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


def soften_kind_tokens(embeddings: torch.Tensor, input_ids: torch.Tensor, kind_ids: torch.Tensor,
                       article: torch.Tensor, share: float) -> torch.Tensor:
    """(b, l, d) input embeddings with a random ``share`` of the kind tokens moved towards ``article`` (d,) by a
    uniform random amount; ids (b, l), kind_ids (k,)."""
    soft = torch.isin(input_ids, kind_ids) & (torch.rand(input_ids.shape) < share)
    keep = torch.rand(*input_ids.shape, 1)
    return torch.where(soft[..., None], keep * embeddings + (1 - keep) * article, embeddings)


def train_lm(tokenizer, recipe: LMRecipe, out_dir: Path) -> LlamaForCausalLM:
    """Next-token training of a Llama from random init, with soft kind tokens in the second part (see
    :class:`LMRecipe`); saves model and tokenizer with ``save_pretrained``."""
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=3 * recipe.hidden_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = build_scheduler(optimizer, ScheduleConfig(kind="cosine", warmup_steps=100), max_steps=recipe.steps)
    stream = _token_stream(tokenizer, recipe.seq_len)
    kind_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(KIND_TOKENS)))
    (article_id,) = tokenizer(ARTICLE, add_special_tokens=False)["input_ids"]
    embed = model.get_input_embeddings()
    model.train()
    bar = tqdm(range(recipe.steps), desc="lm", leave=False)
    for step in bar:
        batch = torch.tensor([next(stream) for _ in range(recipe.batch_size)])
        embeddings = embed(batch)
        if step >= recipe.soft_kinds_from * recipe.steps:
            embeddings = soften_kind_tokens(embeddings, batch, kind_ids, embed.weight[article_id],
                                            recipe.soft_kinds_share)
        loss = model(inputs_embeds=embeddings, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "micro_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return model
