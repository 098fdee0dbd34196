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


def connection_reason(error: BaseException) -> str:
    """'connection refused' rather than a urllib3 repr three lines long."""
    text = str(getattr(error, "reason", None) or error)
    for known in ("Connection refused", "timed out", "Name or service not known", "certificate verify failed",
                  "No route to host", "Temporary failure in name resolution"):
        if known.lower() in text.lower():
            return known.lower()
    return text.split(": ", 1)[-1][:200]
