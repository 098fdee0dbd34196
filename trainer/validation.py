"""What rank 0 draws to show how training goes: validation grids and subject-fidelity figures.

- `samples/step-N.png` (and `samples/final.png`): the validation prompts (the instance prompt
  when none are set), `validation.num_images` seeds each.
- `samples/fidelity-step-N.png` (and `fidelity-final.png`): a row for the instance prompt and a
  row for the class prompt, the images the fidelity figures are measured on:
  `fidelity/instance_distance` (to the nearest subject photo, lower is closer, should fall),
  `fidelity/class_distance` (should stay high: prior preservation keeps the class generic),
  `fidelity/instance_similarity` (with `validation.fidelity_model`).
Images come out in the training precision, from seeds `validation.seed + i`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .callbacks import ValidationResult
from .config import TrainConfig
from .fidelity import EmbeddingModel, embedding_similarity, pixel_distance
from .generate import ImageRequest, generate_images, image_grid, png_bytes


def step_label(step: int | None) -> str:
    return "final" if step is None else f"step-{step:08d}"


@dataclass
class Validator:
    cfg: TrainConfig
    pipeline: object
    subject: list[Image.Image]
    precision: object  # a context manager: autocast to the training precision
    embedding: EmbeddingModel | None = None
    family: object | None = None  # the model's family (read from the pipeline when not given)

    def view(self, denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module]) -> object:
        """The family's pipeline with the modules being trained in place of the base ones."""
        from .export import as_list
        from .families import family_of_pipeline

        family = self.family or family_of_pipeline(self.pipeline)
        trained = as_list(text_encoders)
        base = family.components(self.pipeline).text_encoders
        return family.with_trained(self.pipeline, denoiser, trained + base[len(trained):])

    def draw(self, view: object, prompts: list[str]) -> list[Image.Image]:
        validation = self.cfg.validation
        requests = [ImageRequest(prompt, "", validation.seed + i) for prompt in prompts for i in range(validation.num_images)]
        with self.precision:
            return generate_images(view, requests, steps=validation.steps, guidance=validation.guidance_scale,  # None: the family's
                                   height=self.cfg.data.resolution, width=self.cfg.data.resolution)

    def __call__(self, denoiser: torch.nn.Module, text_encoders: torch.nn.Module | list[torch.nn.Module], step: int | None,
                 with_samples: bool = True) -> ValidationResult:
        """Draw and measure; `step` None means the end of the run."""
        was_training = denoiser.training
        denoiser.eval()
        try:
            return self._run(self.view(denoiser, text_encoders), step, with_samples)
        finally:
            denoiser.train(was_training)

    def _run(self, view: object, step: int | None, with_samples: bool) -> ValidationResult:
        cfg, label = self.cfg, step_label(step)
        columns = cfg.validation.num_images
        files: dict[str, bytes] = {}
        figures: dict[str, float] = {}
        if with_samples:
            prompts = cfg.validation.prompts or [cfg.data.instance_prompt]
            files[f"samples/{label}.png"] = png_bytes(image_grid(self.draw(view, prompts), columns=columns))
        if cfg.validation.fidelity:
            instance = self.draw(view, [cfg.data.instance_prompt])
            rows = list(instance)
            figures["fidelity/instance_distance"] = pixel_distance(instance, self.subject, cfg.data.resolution)
            if cfg.prior.enabled and cfg.prior.class_prompt:
                klass = self.draw(view, [cfg.prior.class_prompt])
                rows += klass
                figures["fidelity/class_distance"] = pixel_distance(klass, self.subject, cfg.data.resolution)
            if self.embedding is not None:
                figures["fidelity/instance_similarity"] = embedding_similarity(self.embedding, instance, self.subject)
            files[f"samples/fidelity-{label}.png"] = png_bytes(image_grid(rows, columns=columns))
        return ValidationResult(files, figures)


def load_embedding_model(source: str | None) -> EmbeddingModel | None:
    """`validation.fidelity_model`: a local folder or hf://org/name."""
    if not source:
        return None
    return EmbeddingModel.load(source.removeprefix("hf://"))
