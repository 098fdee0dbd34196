"""The inference server (`dreambooth serve`): many subjects on one base model, OpenAI Images API."""
