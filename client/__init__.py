"""dreambooth_client: submit and follow DreamboothJobs from a laptop or a notebook.

The only package besides the operator that talks to the Kubernetes API. `dreambooth submit` and
`dreambooth jobs ...` (and `kubectl dreambooth ...`) are faces over this SDK; see docs/client.md.
"""
from .defaults import StorageFlags, StorageSettings
from .errors import (
    AccessDenied, ClientError, ClusterUnreachable, EndpointError, JobFailed, NoStorageDefaults, NotFound,
    StorageUnreachable,
)
from .photos import Photo, PhotoProblems, check_photos
from .sdk import Client, Job, Submission
from .status import Condition, JobStatus, Progress

__all__ = [
    "AccessDenied", "Client", "ClientError", "ClusterUnreachable", "Condition", "EndpointError", "Job", "JobFailed",
    "JobStatus", "NoStorageDefaults", "NotFound", "Photo", "PhotoProblems", "Progress", "StorageFlags",
    "StorageSettings", "StorageUnreachable", "Submission", "check_photos",
]
