"""What rank 0 draws to show how training goes: validation grids and subject-fidelity scores.

- `samples/step-N.png` (and `samples/final.png`): the validation prompts (the instance prompt
  when none are set), `validation.num_images` seeds each.
- `samples/fidelity-step-N.png` (and `fidelity-final.png`): a row for the instance prompt and a
  row for the class prompt: `fidelity/instance_distance` (to the nearest subject photo, lower is
  closer, should fall), `fidelity/class_distance` (should stay high: prior preservation keeps the
  class generic), and the prior drift scores (`fidelity/prior_similarity`, `fidelity/prior_diversity`).
- `samples/prompts-step-N.png` (and `prompts-final.png`): thumbnails of the prompt set's images
  (the DreamBooth paper's 25 prompts by default), scored with `fidelity/dino`, `fidelity/clip_i`
  and `fidelity/clip_t` when a backbone is there.
Images come out in the training precision, from seeds `validation.seed + i`; with EMA on, the
scores are of the averaged weights (what would be exported).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image

from .callbacks import ValidationResult
from .config import TrainConfig
from .fidelity import Backbones, PromptSet, class_noun_of, pixel_distance, prompt_set, subject_scores
from .generate import ImageRequest, generate_images, image_grid, png_bytes

# Images drawn per batch: 25 prompts at 1024 px in one batch would not fit a GPU.
DRAW_BATCH = 8
THUMBNAIL = 96  # side of the prompt set's thumbnails in samples/prompts-*.png
PROMPT_GRID_COLUMNS = 5


def step_label(step: int | None) -> str:
    return "final" if step is None else f"step-{step:08d}"


def fidelity_prompts(cfg: TrainConfig) -> PromptSet:
    """The prompts the scores are measured on: the job's, or the paper's with the class noun."""
    fidelity = cfg.validation.fidelity
    return prompt_set(list(fidelity.prompts), cfg.data.token, class_noun_of(cfg.prior.class_prompt, fidelity.class_noun, cfg.data.instance_prompt, cfg.data.token))


def thumbnails(images: list[Image.Image], side: int = THUMBNAIL) -> list[Image.Image]:
    return [image if image.width <= side else image.resize((side, side * image.height // image.width), Image.LANCZOS) for image in images]


@contextmanager
def averaged_weights(module: torch.nn.Module) -> Iterator[None]:
    """The EMA weights in place of the raw ones while validating (when the module keeps an EMA)."""
    ema = getattr(module, "ema", None)
    if ema is None:
        yield
        return
    parameters = module.ema_parameters()
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


@dataclass
class Validator:
    cfg: TrainConfig
    pipeline: object
    subject: list[Image.Image]
    precision: object  # a context manager: autocast to the training precision
    backbones: Backbones = field(default_factory=Backbones)
    family: object | None = None  # the model's family (read from the pipeline when not given)
    prompts: PromptSet | None = None  # the scores' prompt set (fidelity_prompts(cfg) when not given)

    def view(self, denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module]) -> object:
        """The family's pipeline with the modules being trained in place of the base ones."""
        from .export import as_list
        from .families import family_of_pipeline

        family = self.family or family_of_pipeline(self.pipeline)
        trained = as_list(text_encoders)
        base = family.components(self.pipeline).text_encoders
        return family.with_trained(self.pipeline, denoiser, trained + base[len(trained):])

    def draw(self, view: object, prompts: list[str], per_prompt: int | None = None) -> list[Image.Image]:
        return self.draw_sets(view, [(prompts, per_prompt or self.cfg.validation.num_images)])[0]

    def draw_sets(self, view: object, sets: list[tuple[list[str], int]]) -> list[list[Image.Image]]:
        """Images for several (prompts, images per prompt) sets, drawn together in batches of
        DRAW_BATCH (fewer denoiser calls than a set at a time); seeds validation.seed + i."""
        validation = self.cfg.validation
        requests = [ImageRequest(prompt, "", validation.seed + i) for prompts, count in sets for prompt in prompts for i in range(count)]
        images: list[Image.Image] = []
        with self.precision:
            for start in range(0, len(requests), DRAW_BATCH):
                images += generate_images(view, requests[start:start + DRAW_BATCH], steps=validation.steps,
                                          guidance=validation.guidance_scale,  # None: the family's
                                          height=self.cfg.data.resolution, width=self.cfg.data.resolution)
        drawn, start = [], 0
        for prompts, count in sets:
            drawn.append(images[start:start + len(prompts) * count])
            start += len(prompts) * count
        return drawn

    def __call__(self, denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module], step: int | None,
                 with_samples: bool = True, scored: bool = True) -> ValidationResult:
        """Draw and measure; `step` None means the end of the run."""
        was_training = denoiser.training
        denoiser.eval()
        try:
            return self._run(self.view(denoiser, text_encoders), step, with_samples, scored)
        finally:
            denoiser.train(was_training)

    def _run(self, view: object, step: int | None, with_samples: bool, scored: bool) -> ValidationResult:
        cfg, label = self.cfg, step_label(step)
        columns = cfg.validation.num_images
        files: dict[str, bytes] = {}
        figures: dict[str, float] = {}
        if with_samples:
            prompts = cfg.validation.prompts or [cfg.data.instance_prompt]
            files[f"samples/{label}.png"] = png_bytes(image_grid(self.draw(view, prompts), columns=columns))
        if not (scored and cfg.validation.fidelity.enabled):
            return ValidationResult(files, figures)
        prompts = (self.prompts or fidelity_prompts(cfg)) if self.backbones.any else None
        per_prompt = cfg.validation.fidelity.images_per_prompt
        sets = [([cfg.data.instance_prompt], columns)]
        if cfg.prior.class_prompt:
            sets.append(([cfg.prior.class_prompt], columns))
        if prompts is not None:
            sets.append((prompts.prompts, per_prompt))
        drawn = self.draw_sets(view, sets)
        instance = drawn[0]
        klass = drawn[1] if cfg.prior.class_prompt else []
        figures["fidelity/instance_distance"] = pixel_distance(instance, self.subject, cfg.data.resolution)
        if klass:
            figures["fidelity/class_distance"] = pixel_distance(klass, self.subject, cfg.data.resolution)
        files[f"samples/fidelity-{label}.png"] = png_bytes(image_grid(instance + klass, columns=columns))
        if prompts is not None:
            texts = [text for text in prompts.texts for _ in range(per_prompt)]
            figures.update(subject_scores(self.backbones, drawn[-1], texts, self.subject, klass))
            files[f"samples/prompts-{label}.png"] = png_bytes(image_grid(thumbnails(drawn[-1]), columns=PROMPT_GRID_COLUMNS * per_prompt))
        return ValidationResult(files, figures)
