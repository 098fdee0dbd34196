"""The DreamboothJob API: one module per version (`dreambooth_api.v1alpha1`).

The contract between the operator, the client and the trainer: the spec and status models, their
defaults and CEL rules, the CRD generated from them, the labels every object carries, and the
lenient reading of stored objects. Imports pydantic and the standard library only; it imports none
of the packages that use it.
"""
