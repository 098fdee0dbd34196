"""Subject fidelity: how close generated images come to the subject, scored as the DreamBooth paper does.

- DINO: mean cosine similarity over every (generated, real photo) pair of DINO embeddings (the paper:
  ViT-S/16, the CLS token), for the prompt set's images.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity of each generated image's CLIP embedding with its prompt's (the
  prompt without the identifier token, which means nothing to CLIP).
- Prior drift: the class prompt's images' mean similarity to the photos (prior preservation keeps
  it low) and their diversity, 1 - their mean pairwise similarity (the paper measured diversity
  with LPIPS; here it is the DINO backbone's, or CLIP's without DINO).
- `pixel_distance`: RMS pixel distance to the nearest photo, needing no backbone (the tiny models'
  tests and demo read it).

Backbones come from `validation.fidelity.models`: `tiny` (a random ViT or CLIP built in code from a
seed: no download; what tests and the tiny models use), hf://org/name[@revision], s3://bucket/prefix
or a folder. Each is recorded with its name, revision and scale, so a figure is only compared with
figures of the same backbone.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import to_pixels
from .errors import UserInputError

TINY = "tiny"
TINY_SEED = 0
TINY_SIDE = 32  # the random backbones' input size
TINY_DESIGN = "tiny-backbones-1"  # change when the same seed would build other weights
# Scores are raw cosine similarities (CLIPScore papers scale CLIP-T by 2.5 or 100; we do not).
RAW_COSINE = 1.0


def as_unit_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """An image as HWC floats in [0, 1] at `resolution`, cropped the way training crops photos."""
    pixels = to_pixels(image, resolution, center_crop=True, flip=False)
    return ((pixels.permute(1, 2, 0).numpy() + 1.0) / 2.0).astype(np.float32)


def pixel_distance(images: list[Image.Image], subject: list[Image.Image], resolution: int) -> float:
    """Mean over `images` of the RMS pixel distance to the nearest subject photo."""
    photos = [as_unit_pixels(photo, resolution) for photo in subject]
    distances = []
    for image in images:
        generated = as_unit_pixels(image, resolution)
        distances.append(min(float(np.sqrt(np.mean((generated - photo) ** 2))) for photo in photos))
    return float(np.mean(distances))


# -- backbones ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneInfo:
    """What a score was measured with: published next to every figure."""

    name: str
    revision: str
    scale: float = RAW_COSINE
    input_size: int | None = None

    def text(self) -> str:
        return f"{self.name}@{self.revision} (scale {self.scale:g})"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "scale": self.scale, "input_size": self.input_size}


@dataclass
class Backbone:
    """A vision model (DINO) or a vision-language model (CLIP), its preprocessing, and what it is."""

    info: BackboneInfo
    model: Any
    processor: Any = None  # a transformers image processor; None: resize to TINY_SIDE, scale to [-1, 1]
    tokenizer: Any = None  # CLIP only

    def to(self, device: torch.device | str) -> "Backbone":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        side = self.info.input_size or TINY_SIDE
        arrays = [np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0 for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixel_values = self.pixels(images).to(self.device)
        if hasattr(self.model, "get_image_features"):
            features = self.model.get_image_features(pixel_values=pixel_values)
            features = features if torch.is_tensor(features) else features.pooler_output
        else:  # DINO reads its CLS token (a ViT's pooler is not part of DINO's weights)
            features = self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(**ids)
        features = features if torch.is_tensor(features) else features.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


@dataclass
class Backbones:
    dino: Backbone | None = None
    clip: Backbone | None = None

    @property
    def any(self) -> bool:
        return self.dino is not None or self.clip is not None

    def infos(self) -> dict[str, dict[str, Any]]:
        return {kind: backbone.info.as_dict() for kind, backbone in (("dino", self.dino), ("clip", self.clip)) if backbone is not None}

    def to(self, device: torch.device | str) -> "Backbones":
        for backbone in (self.dino, self.clip):
            if backbone is not None:
                backbone.to(device)
        return self


def seeded_build(seed: int, build: Any) -> Any:
    from .tiny import seeded

    return seeded(seed, build)


def tiny_dino(seed: int = TINY_SEED) -> Backbone:
    """A random ViT shaped like DINO's (patches, CLS token), built in code: a stand-in for tests."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=TINY_SIDE, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = seeded_build(seed, lambda: ViTModel(config, add_pooling_layer=False)).eval()
    return Backbone(BackboneInfo(f"tiny-dino (random ViT, seed {seed})", TINY_DESIGN, RAW_COSINE, TINY_SIDE), model)


def tiny_clip(seed: int = TINY_SEED) -> Backbone:
    """A random CLIP (text and vision towers) on the tiny tokenizer, built in code."""
    from transformers import CLIPConfig, CLIPModel

    from .tiny import tiny_clip_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = tiny_clip_config(tokenizer).to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": TINY_SIDE, "patch_size": 8, "projection_dim": 32}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = seeded_build(seed + 1, lambda: CLIPModel(config)).eval()
    return Backbone(BackboneInfo(f"tiny-clip (random CLIP, seed {seed})", TINY_DESIGN, RAW_COSINE, TINY_SIDE), model, tokenizer=tokenizer)


def weights_digest(folder: Path) -> str:
    """A short content digest of a model folder's weight files (its revision when no hub says one)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".safetensors", ".bin", ".json") and path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:12]


def load_backbone(kind: str, source: str) -> Backbone:
    """`kind` dino or clip, from `validation.fidelity.models.<kind>`."""
    if source == TINY:
        return tiny_dino() if kind == "dino" else tiny_clip()
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from .models import fetch_s3_folder, parse_hf_source
    from .storage import is_s3

    field_name = f"validation.fidelity.models.{kind}"
    revision: str | None = None
    if source.startswith("hf://"):
        path, revision = parse_hf_source(source)
        name = path
    else:
        folder = fetch_s3_folder(source, "config.json") if is_s3(source) else Path(source).expanduser()
        if not (folder / "config.json").exists():
            raise UserInputError(f"{field_name} {source}: no config.json there (not a transformers model folder)")
        path, name = str(folder), source
    try:
        model = AutoModel.from_pretrained(path, revision=revision).eval()
        processor = AutoImageProcessor.from_pretrained(path, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision) if kind == "clip" else None
    except (OSError, ValueError) as error:
        raise UserInputError(f"{field_name} {source} cannot be loaded: {error}") from None
    if kind == "clip" and not hasattr(model, "get_text_features"):
        raise UserInputError(f"{field_name} {source} is a {type(model).__name__}, not a CLIP model (no text tower for CLIP-T)")
    commit = getattr(model.config, "_commit_hash", None)
    resolved = revision or commit or (weights_digest(Path(path)) if not source.startswith("hf://") else "unknown")
    size = getattr(model.config, "image_size", None) or getattr(getattr(model.config, "vision_config", None), "image_size", None)
    return Backbone(BackboneInfo(name, str(resolved), RAW_COSINE, size), model, processor, tokenizer)


def backbone_sources(fidelity: Any, older_model: str | None, tiny_base: bool) -> dict[str, str]:
    """kind -> source: `validation.fidelity.models`, the older `validation.fidelity_model`, and
    the built-in random backbones for the built-in tiny models when nothing is named."""
    sources = {kind: value for kind, value in (("dino", fidelity.models.dino), ("clip", fidelity.models.clip)) if value}
    if older_model and not sources:
        sources["clip" if "clip" in older_model.lower() else "dino"] = older_model
    if not sources and tiny_base:
        sources = {"dino": TINY, "clip": TINY}
    return sources


def load_backbones(sources: dict[str, str]) -> Backbones:
    return Backbones(**{kind: load_backbone(kind, source) for kind, source in sources.items()})


# -- the prompt set ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSet:
    """What the scores are measured on: prompts with the token (to draw) and without (for CLIP-T)."""

    prompts: list[str]
    texts: list[str] = field(default_factory=list)
    source: str = "the job's own"


def paper_prompts() -> dict[str, Any]:
    return json.loads(resources.files("dreambooth_trainer").joinpath("resources/dreambooth_prompts.json").read_text())


def class_noun_of(class_prompt: str | None, named: str | None, instance_prompt: str = "", token: str = "") -> str | None:
    """`validation.fidelity.class_noun`, else the last word of the class prompt (`a photo of dog` ->
    dog), else (no prior preservation) the last word of the instance prompt after the token."""
    after_token = instance_prompt.split(token, 1)[1] if token and token in instance_prompt else ""
    return named or _last_word(class_prompt or "") or _last_word(after_token)


def _last_word(text: str) -> str | None:
    words = re.findall(r"[A-Za-z][A-Za-z_\-]*", text)
    return words[-1] if words else None


def without_token(prompt: str, token: str) -> str:
    return re.sub(r"\s+", " ", re.sub(rf"(?<![A-Za-z0-9_]){re.escape(token)}(?![A-Za-z0-9_])", "", prompt)).strip()


def prompt_set(templates: list[str], token: str, noun: str | None, field_name: str = "validation.fidelity.prompts") -> PromptSet:
    """The job's prompts, or the paper's 25 (live-subject prompts for dogs and cats)."""
    source = "the job's own"
    if not templates:
        if noun is None:
            raise UserInputError("validation.fidelity: the paper's prompts need a class noun: set prior.class_prompt or validation.fidelity.class_noun")
        data = paper_prompts()
        live = noun.lower() in data["live_classes"]
        templates = data["live" if live else "object"]
        source = f"DreamBooth paper, {'live-subject' if live else 'object'} prompts"
    if any("{class}" in t for t in templates) and noun is None:
        raise UserInputError(f"{field_name} use {{class}}: set prior.class_prompt or validation.fidelity.class_noun")
    try:
        prompts = [t.format(token=token, **{"class": noun or ""}) for t in templates]
    except (KeyError, IndexError, ValueError) as error:
        raise UserInputError(f"{field_name} may use only {{token}} and {{class}} ({error})") from None
    return PromptSet(prompts, [without_token(p, token) for p in prompts], source)


# -- the scores ----------------------------------------------------------------------------------

def mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every pair (rows are unit vectors)."""
    return float((a @ b.T).mean())


def diversity(embeddings: torch.Tensor) -> float | None:
    """1 - the mean similarity between distinct images; None for fewer than two."""
    count = embeddings.shape[0]
    if count < 2:
        return None
    similarity = embeddings @ embeddings.T
    return float(1.0 - (similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def subject_scores(backbones: Backbones, images: list[Image.Image], texts: list[str], photos: list[Image.Image],
                   class_images: list[Image.Image]) -> dict[str, float]:
    """The paper's scores of `images` (drawn from the prompts whose token-free `texts` are given,
    one text per image) against the subject `photos`; prior drift from `class_images`."""
    figures: dict[str, float] = {}
    real: dict[str, torch.Tensor] = {}
    if backbones.dino is not None:
        real["dino"] = backbones.dino.embed_images(photos)
        figures["fidelity/dino"] = mean_pairwise(backbones.dino.embed_images(images), real["dino"])
    if backbones.clip is not None:
        real["clip"] = backbones.clip.embed_images(photos)
        generated = backbones.clip.embed_images(images)
        figures["fidelity/clip_i"] = mean_pairwise(generated, real["clip"])
        figures["fidelity/clip_t"] = float((generated * backbones.clip.embed_texts(texts)).sum(dim=-1).mean())
    prior_kind = "dino" if backbones.dino is not None else "clip"
    prior = backbones.dino or backbones.clip
    if prior is not None and class_images:
        embedded = prior.embed_images(class_images)
        figures["fidelity/prior_similarity"] = mean_pairwise(embedded, real[prior_kind])
        spread = diversity(embedded)
        if spread is not None:
            figures["fidelity/prior_diversity"] = spread
    return figures


def real_image_scores(backbones: Backbones, photos: list[Image.Image]) -> dict[str, float]:
    """The photos against each other (distinct pairs): the paper's "real images" row, the ceiling."""
    figures: dict[str, float] = {}
    for kind, backbone in (("dino", backbones.dino), ("clip_i", backbones.clip)):
        if backbone is not None:
            spread = diversity(backbone.embed_images(photos))
            if spread is not None:
                figures[f"fidelity/{kind}"] = 1.0 - spread
    return figures
