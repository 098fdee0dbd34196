"""Errors of the client. Each message is one line a user can act on; the CLI prints it and exits
with the error's code (2: bad input or environment, nothing was created; 1: the job failed)."""
from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class ClientError(RuntimeError):
    """Something the user can fix (photos, flags, cluster access, installation); exit code 2."""

    exit_code = EXIT_BAD_INPUT


class ClusterUnreachable(ClientError):
    """No Kubernetes API to talk to: no config, or the server does not answer."""


class AccessDenied(ClientError):
    """The API server answered 401/403 for something the command needs."""


class NotFound(ClientError):
    """A named object (job, Secret, ConfigMap) does not exist."""


class NoStorageDefaults(ClientError):
    """The installation publishes no storage defaults and none were given as flags."""


class StorageUnreachable(ClientError):
    """The object store cannot be reached (or refuses the credentials) from this machine."""


class JobFailed(ClientError):
    """The DreamboothJob ended Failed; the message carries its reason."""

    exit_code = EXIT_FAILED


class EndpointError(ClientError):
    """The inference endpoint refused a request or is not there (yet)."""

    exit_code = EXIT_FAILED


class LaunchInterrupted(KeyboardInterrupt):
    """Ctrl-C while a submit uploaded its photos or created its job; `created` says whether the
    API server made the job (None: it could not be asked), and so whether the photos stayed."""

    def __init__(self, namespace: str, name: str, photos_uri: str, created: bool | None) -> None:
        super().__init__(namespace, name, photos_uri, created)
        self.namespace, self.name, self.photos_uri, self.created = namespace, name, photos_uri, created

    def __str__(self) -> str:
        job = f"DreamboothJob {self.namespace}/{self.name}"
        if self.created:
            return (f"interrupted after the API server created {job}: it runs and keeps its photos at {self.photos_uri}; "
                    f"follow it: dreambooth jobs follow {self.name} -n {self.namespace}, or delete it: "
                    f"dreambooth jobs delete {self.name} -n {self.namespace} --purge")
        if self.created is None:
            return (f"interrupted: whether {job} was created could not be checked; its photos stay at {self.photos_uri} "
                    f"(see: dreambooth jobs list -n {self.namespace})")
        return f"interrupted: {job} was not created and the photos uploaded to {self.photos_uri} were deleted"


def connection_reason(error: BaseException) -> str:
    """'connection refused' rather than a urllib3 repr three lines long."""
    text = str(getattr(error, "reason", None) or error)
    for known in ("Connection refused", "timed out", "Name or service not known", "certificate verify failed",
                  "No route to host", "Temporary failure in name resolution"):
        if known.lower() in text.lower():
            return known.lower()
    return text.split(": ", 1)[-1][:200]
