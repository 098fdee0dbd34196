"""The DreamboothJob operator (kopf): `kopf run -m dreambooth_operator.handlers`.

Pure builders and conditions, one module that talks to the API (`kube`), one that reads
object storage (`store`), thin handlers. Never imports torch, diffusers or Lightning.
"""
