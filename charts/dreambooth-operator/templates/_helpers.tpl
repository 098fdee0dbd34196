{{/* Chart name, shortened to fit a label value. */}}
{{- define "dreambooth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless it already holds it. */}}
{{- define "dreambooth-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for the life of a release (Deployment and Service selectors). */}}
{{- define "dreambooth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dreambooth-operator.labels" -}}
helm.sh/chart: {{ include "dreambooth-operator.chart" . }}
{{ include "dreambooth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dreambooth
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dreambooth-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository:tag (or @digest); usage: include "dreambooth-operator.image" (dict "registry" .. "repository" .. "tag" .. "digest" .. "default" ..) */}}
{{- define "dreambooth-operator.image" -}}
{{- $ref := .repository }}
{{- with .registry }}{{ $ref = printf "%s/%s" (trimSuffix "/" .) $ref }}{{ end }}
{{- if .digest }}
{{- printf "%s@%s" $ref .digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .default .tag) }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.operatorImage" -}}
{{- include "dreambooth-operator.image" (dict "registry" .Values.image.registry "repository" .Values.image.repository "tag" .Values.image.tag "digest" .Values.image.digest "default" .Chart.AppVersion) }}
{{- end }}

{{/* The storage endpoint the operator gives jobs by default: the configured one, else the bundled MinIO. */}}
{{- define "dreambooth-operator.storageEndpoint" -}}
{{- if .Values.defaults.storage.endpoint }}
{{- .Values.defaults.storage.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "%s-minio.%s.svc:9000" (include "dreambooth-operator.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.storageBucket" -}}
{{- if .Values.defaults.storage.bucket }}
{{- .Values.defaults.storage.bucket }}
{{- else if .Values.minio.enabled }}
{{- .Values.minio.bucket }}
{{- end }}
{{- end }}

{{- define "dreambooth-operator.minioSecret" -}}
{{- default (printf "%s-minio" (include "dreambooth-operator.fullname" .)) .Values.minio.existingSecret }}
{{- end }}

{{/*
The operator's permissions in the namespaces it serves: exactly what it calls
(dreambooth_operator.permissions is the list; tests/unit/test_rbac.py compares this template with
it, and docs/operator.md's table is generated from it; tests/chart measures it with `kubectl auth can-i`).
*/}}
{{- define "dreambooth-operator.namespacedRules" -}}
# The jobs: kopf watches them; a reconcile reads one fresh; kopf drops a finalizer left by an
# older version (patch); ttlSecondsAfterFinished deletes the job.
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion on what a job owns (OwnerReferencesPermissionEnforcement).
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs/finalizers"]
  verbs: ["update"]
# Storage credentials named by spec.storage.credentialsSecretRef and a shared server's token
# (serving.auth.tokenSecretRef, to ask the server): read, never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The trainer gang (Indexed Job): watched (label-filtered by the server), created, suspended, deleted on restart.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# A gang's pods: placement and failure causes; force-deleting one stuck on a lost node.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
# GET /v1/models/<job> on each ready pod of a shared server: ServingReady once it answers for the job.
- apiGroups: [""]
  resources: ["pods/proxy"]
  verbs: ["get"]
# The trainer config (replaced when it changes); a shared server's adapter registry is read and
# replaced whole, and deleted with its last adapter (or when a name collision undoes a step).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "update", "delete"]
# The headless worker Service and the inference Service.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
# The inference Deployment: watched (label-filtered), created, rolled on edits, removed.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
# One NetworkPolicy per job and per shared server (created, replaced when it changes; removed with their owner).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "update", "delete"]
# A gang's PodGroup with a gang policy (all pods placed or none), where the cluster serves scheduling.k8s.io/v1alpha2.
- apiGroups: ["scheduling.k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "create", "delete"]
# One Event per condition transition; a gang's Job's FailedCreate Events (why the cluster refused its pods).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# Kueue's Workloads of the gangs, watched: admitted or why not (the Queued condition), deactivated, its LocalQueue.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The kopf peering object replicas elect their leader in (--peering). */}}
{{- define "dreambooth-operator.peeringName" -}}
{{- include "dreambooth-operator.fullname" . }}
{{- end }}
