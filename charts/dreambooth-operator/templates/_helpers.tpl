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
The operator's permissions in the namespaces it serves: exactly the calls of
dreambooth_operator.kube and kopf (watching, annotations, events). Keep in sync with
docs/operator.md; tests/chart measures them with `kubectl auth can-i`.
*/}}
{{- define "dreambooth-operator.namespacedRules" -}}
# The jobs themselves: kopf lists/watches and keeps its bookkeeping in annotations (patch);
# the operator reads one fresh per reconcile and deletes it after ttlSecondsAfterFinished.
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs/status"]
  verbs: ["patch"]
# Storage credentials named by spec.storage.credentialsSecretRef: read, never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# The trainer gang (Indexed Job): created, suspended/resumed, deleted on restart; watched for progress.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Counting a gang's pods that are still terminating.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# The trainer config and the headless worker Service (create-or-patch); the inference Service is deleted with serving.
# A shared server's adapter registry is read and replaced whole (update), and deleted with its last adapter.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch", "delete"]
# The inference Deployment: create-or-patch, readiness, removal.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# One NetworkPolicy per job and per shared server (create-or-patch; removed with their owner).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# Events on every condition change (kopf.event).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
