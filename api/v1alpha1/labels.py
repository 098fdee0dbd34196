"""Names other components select by: the labels and annotations on a job's objects and the
container names in its pods (the operator sets them; the client and dashboards read them)."""
from __future__ import annotations

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "dreambooth.dev/job-name"
LABEL_GANG = "dreambooth.dev/gang"
# The DreamboothJob's uid on its trainer pods: a job deleted and created again under the same name
# never shares its workers Service with the old job's still-terminating pods.
LABEL_JOB_UID = "dreambooth.dev/job-uid"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
TRAINER_CONTAINER = "trainer"
SERVER_CONTAINER = "server"
