"""Per-image captions: `photo.txt` beside `photo.jpg` gives that photo its own prompt.

A caption is the prompt itself (it must then name the token), or fills `data.caption_template`
(`a photo of {token} {caption}`). Photos without one use `data.instance_prompt`. Class images
always use `prior.class_prompt` (see `prompt_table`).
"""
from __future__ import annotations

from .config import contains_word
from .errors import UserInputError
from .storage import Storage

CAPTION_SUFFIX = ".txt"


def caption_key(image_key: str) -> str:
    """`dog/photo.jpg` -> `dog/photo.txt`."""
    return image_key.rsplit(".", 1)[0] + CAPTION_SUFFIX


def caption_prompt(caption: str, token: str, template: str | None, where: str) -> str:
    """The prompt a caption gives its photo; without a template the caption must name the token."""
    text = " ".join(caption.split())
    if template is not None:
        return " ".join(template.format(token=token, caption=text).split())
    if not contains_word(text, token):
        raise UserInputError(f"caption {where} must contain the token {token!r} (or set data.caption_template): {text[:80]!r}")
    return text


def read_caption_prompts(storage: Storage, image_keys: list[str], listing: list[str], token: str,
                         template: str | None) -> list[str | None]:
    """Each photo's caption prompt, None where no caption file sits beside it."""
    present = set(listing)
    prompts: list[str | None] = []
    for key in image_keys:
        text_key = caption_key(key)
        if text_key not in present:
            prompts.append(None)
            continue
        where = storage.describe(text_key)
        try:
            caption = storage.read_bytes(text_key).decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"caption {where} is not UTF-8 text") from None
        prompts.append(caption_prompt(caption, token, template, where))
    return prompts


def prompt_table(instance_prompt: str, class_prompt: str, image_prompts: list[str | None]) -> tuple[list[str], list[int]]:
    """The distinct prompts (instance_prompt, class_prompt, then captions in photo order) and each
    photo's index into them. Class images are all index 1: they stand for the class prompt's
    prior, which the subject's captions and the validation prompts are measured against."""
    table = {class_prompt: 1, instance_prompt: 0}
    prompts = [instance_prompt, class_prompt]
    indices = []
    for prompt in image_prompts:
        if prompt is None:
            indices.append(0)
            continue
        if prompt not in table:
            table[prompt] = len(prompts)
            prompts.append(prompt)
        indices.append(table[prompt])
    return prompts, indices
